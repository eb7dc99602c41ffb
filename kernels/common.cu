// Status messages, device queries, chunk planning and the cross-block merge kernel.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "internal.cuh"

namespace zsbir {

int device_info(DeviceInfo* info) {
  int dev = 0;
  int st = cuda_status(cudaGetDevice(&dev));
  if (st != ZSBIR_OK) return st;
  st = cuda_status(cudaDeviceGetAttribute(&info->sms, cudaDevAttrMultiProcessorCount, dev));
  if (st != ZSBIR_OK) return st;
  st = cuda_status(cudaDeviceGetAttribute(&info->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (st != ZSBIR_OK) return st;
  return cuda_status(cudaDeviceGetAttribute(&info->max_grid_y, cudaDevAttrMaxGridDimY, dev));
}

int keep_pool_memory() {
  static bool done[64] = {};
  int dev = 0;
  int st = cuda_status(cudaGetDevice(&dev));
  if (st != ZSBIR_OK) return st;
  if (dev >= 0 && dev < 64 && done[dev]) return ZSBIR_OK;
  cudaMemPool_t pool;
  st = cuda_status(cudaDeviceGetDefaultMemPool(&pool, dev));
  if (st != ZSBIR_OK) return st;
  uint64_t threshold = UINT64_MAX;
  st = cuda_status(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  if (st != ZSBIR_OK) return st;
  if (dev >= 0 && dev < 64) done[dev] = true;
  return ZSBIR_OK;
}

ChunkPlan plan_chunks(int64_t n, int k, int query_groups, int blocks_per_sm, int sms, int align) {
  ChunkPlan plan;
  if (n <= 0) {
    plan.nchunks = 0;
    plan.rows_per_chunk = 0;
    return plan;
  }
  const int64_t resident = static_cast<int64_t>(std::max(blocks_per_sm, 1)) * std::max(sms, 1);
  // Fill the resident slots once (no tail wave) across all query groups.
  int64_t want = std::max<int64_t>(1, resident / std::max(query_groups, 1));
  // Each chunk should scan a good number of rows, and the merge should not see too many candidates.
  const int64_t min_rows = std::max<int64_t>(4LL * align, 4LL * k);
  want = std::min<int64_t>(want, std::max<int64_t>(1, (n + min_rows - 1) / min_rows));
  const int64_t max_chunks = std::max<int64_t>(2LL * sms, 262144LL / k);
  want = std::min<int64_t>(want, max_chunks);
  int64_t rows = (n + want - 1) / want;
  rows = ((rows + align - 1) / align) * align;
  plan.rows_per_chunk = static_cast<int>(std::min<int64_t>(rows, kMaxRows));
  plan.nchunks = static_cast<int>((n + rows - 1) / rows);
  return plan;
}

constexpr int kMergeTile = kThreads;  // candidates offered per tile (one per thread)

// One block per query. Candidates are nchunks * k keys (already sorted per chunk; order does not matter).
__global__ void __launch_bounds__(kThreads) merge_kernel(const skey_t* __restrict__ ws, int nchunks, int k, int P,
                                                         float* __restrict__ out_scores,
                                                         int32_t* __restrict__ out_dist,
                                                         int64_t* __restrict__ out_idx, int mode) {
  ZSBIR_DYNAMIC_SMEM(smem);
  Selector sel;
  make_selector(smem, 1, P, k, kMergeTile, &sel);
  sel.init();
  __syncthreads();

  const int q = blockIdx.x;
  const int64_t m = static_cast<int64_t>(nchunks) * k;
  const skey_t* cand = ws + static_cast<int64_t>(q) * m;
  skey_t thr = sel.threshold(0);
  for (int64_t base = 0; base < m; base += kMergeTile) {
    const int64_t i = base + threadIdx.x;
    if (i < m) sel.offer(0, cand[i], thr);
    sel.between_tiles();
    thr = sel.threshold(0);
  }
  sel.finish();

  const skey_t* best = sel.list(0);
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    const skey_t key = best[j];
    const int64_t o = static_cast<int64_t>(q) * k + j;
    if (key == 0ull) {
      out_idx[o] = -1;
      if (mode == 0) {
        out_scores[o] = -INFINITY;
      } else {
        out_dist[o] = 2147483647;
      }
    } else {
      out_idx[o] = static_cast<int64_t>(key_index(key));
      const float s = key_score(key);
      if (mode == 0) {
        out_scores[o] = s;
      } else {
        out_dist[o] = static_cast<int32_t>(rintf(-s));
      }
    }
  }
}

int launch_merge(const skey_t* ws, int nq, int nchunks, int k, float* out_scores, int32_t* out_dist,
                 int64_t* out_idx, int mode, cudaStream_t stream) {
  if (nq == 0) return ZSBIR_OK;
  const int P = list_len(k, kMergeTile);
  const size_t smem = selector_bytes(1, P);
  int st = cuda_status(
      cudaFuncSetAttribute(merge_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  if (st != ZSBIR_OK) return st;
  ZSBIR_LAUNCH(merge_kernel, nq, kThreads, smem, stream)(ws, nchunks, k, P, out_scores, out_dist, out_idx, mode);
  return cuda_status(cudaGetLastError());
}

}  // namespace zsbir

extern "C" {

int zsbir_abi_version(void) { return ZSBIR_KERNELS_ABI_VERSION; }

const char* zsbir_status_string(int code) {
  switch (code) {
    case ZSBIR_OK:
      return "ok";
    case ZSBIR_ERR_NULL_POINTER:
      return "a required pointer is NULL";
    case ZSBIR_ERR_BAD_SHAPE:
      return "number of queries or gallery rows is negative or >= 2^31";
    case ZSBIR_ERR_BAD_DIM:
      return "dimension D must be in [1, 2048]";
    case ZSBIR_ERR_BAD_K:
      return "k must be in [1, 1024]";
    case ZSBIR_ERR_BAD_CODE_BYTES:
      return "code length must be a multiple of 8 bytes in [8, 128] (64 to 1024 bits)";
    case ZSBIR_ERR_BAD_DTYPE:
      return "unknown gallery dtype, or an int8 gallery without per-row scales";
    case ZSBIR_ERR_MISALIGNED:
      return "binary codes must be 8-byte aligned";
    case ZSBIR_ERR_UNSUPPORTED:
      return "the requested kernel path cannot serve this k (tensor-core path: k <= 256)";
    case ZSBIR_ERR_SHARED_MEMORY:
      return "the configuration needs more shared memory per block than the device offers";
    case ZSBIR_ERR_BAD_PATH:
      return "unknown kernel path (0 auto, 1 simt, 2 tensor, 3 tensor with 32-query tiles)";
    default:
      break;
  }
  if (code > ZSBIR_ERR_CUDA_BASE) {
    return cudaGetErrorString(static_cast<cudaError_t>(code - ZSBIR_ERR_CUDA_BASE));
  }
  return "unknown zsbir status code";
}

}  // extern "C"
