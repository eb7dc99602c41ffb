// Hamming top-k over packed binary codes (64..1024 bits) with popcount, fused with the shared-memory
// selection of select.cuh. Each thread streams 2 codes per tile (coalesced 8-byte words); up to 8
// queries per block share every gallery load. Score = -distance, so "best" = smallest distance, ties
// broken by the smaller index as everywhere else.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "internal.cuh"

namespace zsbir {
namespace {

constexpr int kHamRows = 2;                    // codes per thread per tile
constexpr int kHamTile = kThreads * kHamRows;  // 512 codes per tile
constexpr int kHamMaxQG = 8;

__global__ void __launch_bounds__(kThreads) hamming_kernel(const uint64_t* __restrict__ qcodes,
                                                           const uint64_t* __restrict__ codes, int nq, int n, int W,
                                                           int k, int P, int qg, int rows_per_chunk, int nchunks,
                                                           skey_t* __restrict__ ws) {
  ZSBIR_DYNAMIC_SMEM(smem);
  uint64_t* qsh = reinterpret_cast<uint64_t*>(smem);
  Selector sel;
  make_selector(smem + (static_cast<size_t>(qg) * W * sizeof(uint64_t) + 15) / 16 * 16, qg, P, k, kHamTile, &sel);
  const int q0 = blockIdx.y * qg;
  const int nqb = min(qg, nq - q0);
  sel.init();
  for (int i = threadIdx.x; i < qg * W; i += blockDim.x) {
    qsh[i] = (i < nqb * W) ? qcodes[static_cast<int64_t>(q0) * W + i] : 0ull;
  }
  __syncthreads();

  const int chunk = blockIdx.x;
  const int64_t start = static_cast<int64_t>(chunk) * rows_per_chunk;
  const int64_t end = min(static_cast<int64_t>(n), start + rows_per_chunk);
  skey_t thr[kHamMaxQG];
#pragma unroll
  for (int q = 0; q < kHamMaxQG; ++q) thr[q] = q < nqb ? sel.threshold(q) : 0ull;

  for (int64_t base = start; base < end; base += kHamTile) {
    int64_t rows[kHamRows];
    bool ok[kHamRows];
    int dist[kHamRows][kHamMaxQG];
#pragma unroll
    for (int r = 0; r < kHamRows; ++r) {
      rows[r] = base + r * kThreads + threadIdx.x;
      ok[r] = rows[r] < end;
#pragma unroll
      for (int q = 0; q < kHamMaxQG; ++q) dist[r][q] = 0;
    }
    for (int w = 0; w < W; ++w) {
      uint64_t x[kHamRows];
#pragma unroll
      for (int r = 0; r < kHamRows; ++r) x[r] = ok[r] ? __ldcs(codes + rows[r] * W + w) : 0ull;
#pragma unroll
      for (int q = 0; q < kHamMaxQG; ++q) {
        if (q < nqb) {
          const uint64_t qw = qsh[q * W + w];
#pragma unroll
          for (int r = 0; r < kHamRows; ++r) dist[r][q] += __popcll(x[r] ^ qw);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kHamMaxQG; ++q) {
      if (q < nqb) {
#pragma unroll
        for (int r = 0; r < kHamRows; ++r) {
          if (ok[r]) sel.offer(q, make_key(-static_cast<float>(dist[r][q]), static_cast<uint32_t>(rows[r])), thr[q]);
        }
      }
    }
    sel.between_tiles();
#pragma unroll
    for (int q = 0; q < kHamMaxQG; ++q) thr[q] = q < nqb ? sel.threshold(q) : 0ull;
  }
  sel.finish();
  const int warp = threadIdx.x >> 5;
  for (int g = warp; g < nqb; g += kWarps) {
    store_keys(sel, g, ws + (static_cast<int64_t>(q0 + g) * nchunks + chunk) * k);
  }
}

}  // namespace
}  // namespace zsbir

extern "C" int zsbir_hamming_topk(const void* query_codes, const void* codes, int64_t num_queries, int64_t num_codes,
                                  int64_t code_bytes, int64_t k, int32_t* out_distances, int64_t* out_indices,
                                  void* stream) {
  using namespace zsbir;
  if (num_queries < 0 || num_codes < 0 || num_queries > kMaxRows || num_codes > kMaxRows) return ZSBIR_ERR_BAD_SHAPE;
  if (code_bytes < 8 || code_bytes > 128 || code_bytes % 8 != 0) return ZSBIR_ERR_BAD_CODE_BYTES;
  if (k < 1 || k > kMaxK) return ZSBIR_ERR_BAD_K;
  if (num_queries == 0) return ZSBIR_OK;
  if (query_codes == nullptr || out_distances == nullptr || out_indices == nullptr) return ZSBIR_ERR_NULL_POINTER;
  if (num_codes > 0 && codes == nullptr) return ZSBIR_ERR_NULL_POINTER;
  if (reinterpret_cast<uintptr_t>(query_codes) % 8 != 0 || reinterpret_cast<uintptr_t>(codes) % 8 != 0) {
    return ZSBIR_ERR_MISALIGNED;
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int nq = static_cast<int>(num_queries);
  const int n = static_cast<int>(num_codes);
  const int kk = static_cast<int>(k);
  const int W = static_cast<int>(code_bytes / 8);
  if (n == 0) return launch_merge(nullptr, nq, 0, kk, nullptr, out_distances, out_indices, 1, s);

  DeviceInfo dev;
  int st = device_info(&dev);
  if (st != ZSBIR_OK) return st;
  const int P = list_len(kk, kHamTile);
  int qg = std::min(kHamMaxQG, nq);
  size_t smem = 0;
  for (;;) {
    smem = (static_cast<size_t>(qg) * W * 8 + 15) / 16 * 16 + selector_bytes(qg, P);
    if (smem <= static_cast<size_t>(dev.smem_optin) || qg == 1) break;
    --qg;
  }
  if (smem > static_cast<size_t>(dev.smem_optin)) return ZSBIR_ERR_SHARED_MEMORY;
  st = cuda_status(cudaFuncSetAttribute(hamming_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  if (st != ZSBIR_OK) return st;
  int bps = 0;
  st = cuda_status(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&bps, hamming_kernel, kThreads, smem));
  if (st != ZSBIR_OK) return st;
  if (bps < 1) return ZSBIR_ERR_SHARED_MEMORY;

  const uint64_t* qc = static_cast<const uint64_t*>(query_codes);
  const uint64_t* gc = static_cast<const uint64_t*>(codes);
  const int64_t slice = static_cast<int64_t>(qg) * dev.max_grid_y;  // one query group per gridDim.y
  for (int64_t q0 = 0; q0 < nq; q0 += slice) {
    const int snq = static_cast<int>(std::min<int64_t>(slice, nq - q0));
    const int groups = (snq + qg - 1) / qg;
    const ChunkPlan plan = plan_chunks(n, kk, groups, bps, dev.sms, kHamTile);
    Workspace ws;
    st = ws.alloc(static_cast<size_t>(snq) * plan.nchunks * kk * sizeof(skey_t), s);
    if (st != ZSBIR_OK) return st;
    skey_t* wsk = static_cast<skey_t*>(ws.ptr);
    const dim3 grid(plan.nchunks, groups);
    ZSBIR_LAUNCH(hamming_kernel, grid, kThreads, smem, s)(qc + q0 * W, gc, snq, n, W, kk, P, qg,
                                                          plan.rows_per_chunk, plan.nchunks, wsk);
    st = cuda_status(cudaGetLastError());
    if (st != ZSBIR_OK) return st;
    st = launch_merge(wsk, snq, plan.nchunks, kk, nullptr, out_distances + q0 * kk, out_indices + q0 * kk, 1, s);
    if (st != ZSBIR_OK) return st;
  }
  return ZSBIR_OK;
}
