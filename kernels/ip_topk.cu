// Fused inner-product top-k: scores are computed tile by tile and reduced to per-query top-k in shared
// memory (select.cuh); only k keys per (query, gallery chunk) reach device memory, then merge_kernel
// combines the chunks.
//
// Two stage-1 kernels:
//  * ip_simt_kernel  - small Q (and any k): a GEMV-like stream over the gallery. 8 lanes share a row,
//                      each loading 16 bytes (8 fp16 / 8 int8 as 8 bytes) per step; 4 rows per lane group
//                      are in flight; up to 8 queries per block share each gallery load.
//  * ip_wmma_kernel  - Q >= 16 and k <= 256: 16x16x16 fp16 tensor-core tiles (fp32 accumulate) of
//                      QT queries x 128 gallery rows, D consumed 64 at a time through shared memory.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "internal.cuh"

namespace zsbir {
namespace {

constexpr int kSimtLanes = 8;                              // lanes per gallery row
constexpr int kSimtRows = 4;                               // rows per lane group per tile
constexpr int kSimtGroups = kThreads / kSimtLanes;         // 32 lane groups
constexpr int kSimtTile = kSimtGroups * kSimtRows;         // 128 rows per tile
constexpr int kMaxQG = 8;                                  // queries per SIMT block

constexpr int kTensorTile = 128;  // gallery rows per tensor-core tile
constexpr int kTensorKC = 64;     // D consumed per shared-memory step
constexpr int kLdh = kTensorKC + 8;
constexpr int kTensorMaxK = 256;

__device__ __forceinline__ float2 half2_bits_to_float2(unsigned int w) {
  __half2 h;
  memcpy(&h, &w, sizeof(h));
  return __half22float2(h);
}

__device__ __forceinline__ void unpack8(const uint4& u, float (&v)[8]) {
  const float2 a = half2_bits_to_float2(u.x);
  const float2 b = half2_bits_to_float2(u.y);
  const float2 c = half2_bits_to_float2(u.z);
  const float2 d = half2_bits_to_float2(u.w);
  v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y, v[4] = c.x, v[5] = c.y, v[6] = d.x, v[7] = d.y;
}

__device__ __forceinline__ void unpack8(const uint2& u, float (&v)[8]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    v[j] = static_cast<float>(static_cast<int8_t>((u.x >> (8 * j)) & 0xffu));
    v[4 + j] = static_cast<float>(static_cast<int8_t>((u.y >> (8 * j)) & 0xffu));
  }
}

// 8 consecutive gallery elements from global memory (streaming load), as floats.
__device__ __forceinline__ void load8_global(const __half* p, float (&v)[8]) {
  unpack8(__ldcs(reinterpret_cast<const uint4*>(p)), v);
}
__device__ __forceinline__ void load8_global(const int8_t* p, float (&v)[8]) {
  unpack8(__ldcs(reinterpret_cast<const uint2*>(p)), v);
}

__device__ __forceinline__ float load1(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load1(const int8_t* p) { return static_cast<float>(*p); }

__device__ __forceinline__ __half to_half(__half x) { return x; }
__device__ __forceinline__ __half to_half(int8_t x) { return __int2half_rn(static_cast<int>(x)); }

__device__ __forceinline__ unsigned int pack_half2(__half lo, __half hi) {
  const __half2 h = __halves2half2(lo, hi);
  unsigned int w;
  memcpy(&w, &h, sizeof(w));
  return w;
}

// 8 consecutive elements as 8 halves packed in a uint4 (for the tensor-core shared tiles).
__device__ __forceinline__ uint4 load8_as_half(const __half* p) { return *reinterpret_cast<const uint4*>(p); }
// 8 int8 values (as two 32-bit words) to 8 halves packed in a uint4 (exact: |x| <= 128).
__device__ __forceinline__ uint4 half8_from_int8x8(const uint2& u) {
  __half h[8];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    h[j] = __int2half_rn(static_cast<int>(static_cast<int8_t>((u.x >> (8 * j)) & 0xffu)));
    h[4 + j] = __int2half_rn(static_cast<int>(static_cast<int8_t>((u.y >> (8 * j)) & 0xffu)));
  }
  return make_uint4(pack_half2(h[0], h[1]), pack_half2(h[2], h[3]), pack_half2(h[4], h[5]), pack_half2(h[6], h[7]));
}
__device__ __forceinline__ uint4 load8_as_half(const int8_t* p) {
  return half8_from_int8x8(*reinterpret_cast<const uint2*>(p));
}

__device__ __forceinline__ size_t align16(size_t x) { return (x + 15) / 16 * 16; }

// ---------------------------------------------------------------------------------------------------
// Stage 1, small Q: streaming kernel on CUDA cores.
// grid = (nchunks, query groups of qg <= QMAX); block = 256 threads.
template <typename T, bool VEC, int QMAX>
__global__ void __launch_bounds__(kThreads) ip_simt_kernel(const __half* __restrict__ queries,
                                                           const void* __restrict__ gallery_raw,
                                                           const float* __restrict__ scales, int nq, int n, int d,
                                                           int k, int P, int qg, int rows_per_chunk, int nchunks,
                                                           skey_t* __restrict__ ws) {
  ZSBIR_DYNAMIC_SMEM(smem);
  const T* __restrict__ gallery = static_cast<const T*>(gallery_raw);
  const int q0 = blockIdx.y * qg;
  const int nqb = min(qg, nq - q0);
  const int dp = (d + 7) & ~7;
  __half* qs = reinterpret_cast<__half*>(smem);
  Selector sel;
  make_selector(smem + align16(static_cast<size_t>(qg) * dp * sizeof(__half)), qg, P, k, kSimtTile, &sel);
  sel.init();
  for (int i = threadIdx.x; i < qg * dp; i += blockDim.x) {
    const int q = i / dp;
    const int c = i - q * dp;
    qs[i] = (q < nqb && c < d) ? queries[static_cast<int64_t>(q0 + q) * d + c] : __float2half(0.0f);
  }
  __syncthreads();

  const int chunk = blockIdx.x;
  const int64_t start = static_cast<int64_t>(chunk) * rows_per_chunk;
  const int64_t end = min(static_cast<int64_t>(n), start + rows_per_chunk);
  const int group = threadIdx.x / kSimtLanes;
  const int sub = threadIdx.x % kSimtLanes;
  skey_t thr = sub < nqb ? sel.threshold(sub) : 0ull;

  for (int64_t base = start; base < end; base += kSimtTile) {
    float acc[kSimtRows][QMAX];
    int64_t rows[kSimtRows];
    bool ok[kSimtRows];
#pragma unroll
    for (int r = 0; r < kSimtRows; ++r) {
      rows[r] = base + r * kSimtGroups + group;
      ok[r] = rows[r] < end;
#pragma unroll
      for (int q = 0; q < QMAX; ++q) acc[r][q] = 0.0f;
    }
    if (VEC) {
      for (int c = sub * 8; c < d; c += kSimtLanes * 8) {
        float gv[kSimtRows][8];
#pragma unroll
        for (int r = 0; r < kSimtRows; ++r) {
          if (ok[r]) {
            load8_global(gallery + rows[r] * d + c, gv[r]);
          } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) gv[r][j] = 0.0f;
          }
        }
#pragma unroll
        for (int q = 0; q < QMAX; ++q) {
          if (q < nqb) {
            float qv[8];
            unpack8(*reinterpret_cast<const uint4*>(qs + q * dp + c), qv);
#pragma unroll
            for (int r = 0; r < kSimtRows; ++r) {
#pragma unroll
              for (int j = 0; j < 8; ++j) acc[r][q] = fmaf(gv[r][j], qv[j], acc[r][q]);
            }
          }
        }
      }
    } else {
      for (int c = sub; c < d; c += kSimtLanes) {
        float gv[kSimtRows];
#pragma unroll
        for (int r = 0; r < kSimtRows; ++r) gv[r] = ok[r] ? load1(gallery + rows[r] * d + c) : 0.0f;
#pragma unroll
        for (int q = 0; q < QMAX; ++q) {
          if (q < nqb) {
            const float qv = __half2float(qs[q * dp + c]);
#pragma unroll
            for (int r = 0; r < kSimtRows; ++r) acc[r][q] = fmaf(gv[r], qv, acc[r][q]);
          }
        }
      }
    }
    // Sum the 8 partial dot products of each lane group (lanes 8g..8g+7).
#pragma unroll
    for (int q = 0; q < QMAX; ++q) {
      if (q < nqb) {
#pragma unroll
        for (int r = 0; r < kSimtRows; ++r) {
          float v = acc[r][q];
          v += __shfl_xor_sync(0xffffffffu, v, 4);
          v += __shfl_xor_sync(0xffffffffu, v, 2);
          v += __shfl_xor_sync(0xffffffffu, v, 1);
          acc[r][q] = v;
        }
      }
    }
    // Lane `sub` of each group offers the scores of query `sub`.
    if (sub < nqb) {
#pragma unroll
      for (int r = 0; r < kSimtRows; ++r) {
        if (ok[r]) {
          float s = 0.0f;
#pragma unroll
          for (int q = 0; q < QMAX; ++q) s = (q == sub) ? acc[r][q] : s;
          if (scales != nullptr) s *= scales[rows[r]];
          sel.offer(sub, make_key(s, static_cast<uint32_t>(rows[r])), thr);
        }
      }
    }
    sel.between_tiles();
    if (sub < nqb) thr = sel.threshold(sub);
  }
  sel.finish();
  const int warp = threadIdx.x >> 5;
  for (int g = warp; g < nqb; g += kWarps) {
    store_keys(sel, g, ws + (static_cast<int64_t>(q0 + g) * nchunks + chunk) * k);
  }
}

// ---------------------------------------------------------------------------------------------------
// Stage 1, larger Q: tensor cores (WMMA 16x16x16, fp16 in, fp32 accumulate).

// rows x 64 tile of src (row stride d) starting at (row0, c0) into shared dst (row stride kLdh) as fp16,
// zero outside [0, nrows) x [0, d).
template <typename T, bool VEC>
__device__ __forceinline__ void load_tile(__half* __restrict__ dst, const T* __restrict__ src, int64_t row0,
                                          int64_t nrows, int d, int c0, int rows) {
  if (VEC) {
    constexpr int kVecPerRow = kTensorKC / 8;
    for (int i = threadIdx.x; i < rows * kVecPerRow; i += blockDim.x) {
      const int r = i / kVecPerRow;
      const int cv = (i - r * kVecPerRow) * 8;
      const int64_t row = row0 + r;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (row < nrows && c0 + cv < d) v = load8_as_half(src + row * d + c0 + cv);
      *reinterpret_cast<uint4*>(dst + r * kLdh + cv) = v;
    }
  } else {
    for (int i = threadIdx.x; i < rows * kTensorKC; i += blockDim.x) {
      const int r = i / kTensorKC;
      const int c = i - r * kTensorKC;
      const int64_t row = row0 + r;
      dst[r * kLdh + c] = (row < nrows && c0 + c < d) ? to_half(src[row * d + c0 + c]) : __float2half(0.0f);
    }
  }
}

// The next gallery step's 128 x 64 tile, held in registers while the current step is computed (software
// pipelining: the global loads are in flight during the tensor-core math and the selection). VEC: 4 x 16-byte
// (fp16) or 4 x 8-byte (int8, converted when stored) loads per thread; otherwise the loads happen at store.
template <typename T, bool VEC>
struct TilePrefetch;

template <typename T>
struct TilePrefetch<T, true> {
  using Raw = typename std::conditional<sizeof(T) == 2, uint4, uint2>::type;
  static constexpr int kVecPerRow = kTensorKC / 8;
  static constexpr int kPer = kTensorTile * kVecPerRow / kThreads;
  Raw v[kPer];

  __device__ __forceinline__ void load(const T* __restrict__ src, int64_t row0, int64_t nrows, int d, int c0) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int i = threadIdx.x + j * kThreads;
      const int r = i / kVecPerRow;
      const int cv = (i - r * kVecPerRow) * 8;
      const int64_t row = row0 + r;
      v[j] = Raw{};
      if (row < nrows && c0 + cv < d) v[j] = *reinterpret_cast<const Raw*>(src + row * d + c0 + cv);
    }
  }
  __device__ __forceinline__ void store(__half* __restrict__ dst) const {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int i = threadIdx.x + j * kThreads;
      const int r = i / kVecPerRow;
      const int cv = (i - r * kVecPerRow) * 8;
      *reinterpret_cast<uint4*>(dst + r * kLdh + cv) = as_half8(v[j]);
    }
  }
  __device__ __forceinline__ static uint4 as_half8(const uint4& u) { return u; }
  __device__ __forceinline__ static uint4 as_half8(const uint2& u) { return half8_from_int8x8(u); }
};

template <typename T>
struct TilePrefetch<T, false> {  // scalar fallback (D not a multiple of 8, or a misaligned gallery)
  const T* src = nullptr;
  int64_t row0 = 0;
  int64_t nrows = 0;
  int d = 0;
  int c0 = 0;
  __device__ __forceinline__ void load(const T* __restrict__ s, int64_t r0, int64_t nr, int dd, int c) {
    src = s, row0 = r0, nrows = nr, d = dd, c0 = c;
  }
  __device__ __forceinline__ void store(__half* __restrict__ dst) const {
    load_tile<T, false>(dst, src, row0, nrows, d, c0, kTensorTile);
  }
};

// Shared memory of the tensor kernel besides the selector: query tiles and gallery tiles, two of each (the
// next step's are written while the current ones are read), and the per-query pre-filter thresholds.
template <int QT>
__host__ __device__ constexpr size_t wmma_fixed_bytes() {
  return 2 * static_cast<size_t>(QT) * kLdh * 2 + 2 * static_cast<size_t>(kTensorTile) * kLdh * 2 +
         (static_cast<size_t>(QT) * 4 + 15) / 16 * 16;
}

constexpr uint32_t kNegInfOrder = 0x007FFFFFu;  // order_bits(-inf)

__device__ __forceinline__ float quiet_nan() { return __uint_as_float(0x7FC00000u); }

// The raw score a candidate of a list whose k-th key is `kth` must reach: `!(s < t)` is then a superset of
// "its key beats the k-th key". NaN (every comparison false, so everything goes on to the exact key test)
// while the list is not full or its k-th score is -inf.
__device__ __forceinline__ float prefilter_threshold(skey_t kth) {
  const uint32_t o = static_cast<uint32_t>(kth >> 32);
  return o <= kNegInfOrder ? quiet_nan() : order_bits_to_float(o);
}

// grid = (nchunks, query groups of QT); block = 256 threads (8 warps: QT/16 query blocks x 128/COLS columns).
// Steps: one per (gallery tile of 128 rows, 64-wide slice of D), double-buffered: while a step's tiles are
// multiplied, the next step's are written to the other buffers and the one after is loaded into registers,
// so one barrier per step suffices and global loads are in flight for a whole step.
// After a tile's last step each warp holds FR 16 x 16 score fragments in registers. Which tile element each
// register holds is not specified by WMMA, so a probe MMA at the start finds out (16 r + c for element (r, c)).
// Each score is compared in registers with the pre-filter threshold of its query; only the rare score that
// can enter the top-k becomes a key and is appended to the query's list (select.cuh). A barrier that also
// ORs "some list needs a flush" ends each tile.
template <typename T, int QT, bool VEC>
__global__ void __launch_bounds__(kThreads, QT == 32 ? 2 : 1) ip_wmma_kernel(const __half* __restrict__ queries,
                                                           const void* __restrict__ gallery_raw,
                                                           const float* __restrict__ scales, int nq, int n, int d,
                                                           int k, int P, int /*qg*/, int rows_per_chunk,
                                                           int nchunks, skey_t* __restrict__ ws) {
  using namespace nvcuda;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  constexpr int QB = QT / 16;           // 16-row query blocks
  constexpr int WPQ = kWarps / QB;      // warps per query block
  constexpr int COLS = kTensorTile / WPQ;
  constexpr int FR = COLS / 16;         // accumulator fragments per warp
  constexpr int NE = Acc::num_elements;
  static_assert(QB * WPQ == kWarps && FR * 16 * WPQ == kTensorTile, "bad tensor tile shape");

  ZSBIR_DYNAMIC_SMEM(smem);
  const T* __restrict__ gallery = static_cast<const T*>(gallery_raw);
  __half* qs = reinterpret_cast<__half*>(smem);           // [2][QT][kLdh]
  __half* gs = qs + 2 * QT * kLdh;                          // [2][kTensorTile][kLdh]
  float* thr_s = reinterpret_cast<float*>(gs + 2 * kTensorTile * kLdh);  // [QT] pre-filter thresholds
  Selector sel;
  make_selector(smem + wmma_fixed_bytes<QT>(), QT, P, k, kTensorTile, &sel);

  const int q0 = blockIdx.y * QT;
  const int nqb = min(QT, nq - q0);
  const int chunk = blockIdx.x;
  const int64_t start = static_cast<int64_t>(chunk) * rows_per_chunk;
  const int64_t end = min(static_cast<int64_t>(n), start + rows_per_chunk);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int qb = warp % QB;
  const int col0 = (warp / QB) * COLS;
  const bool q_resident = d <= kTensorKC;
  const int ksteps = (d + kTensorKC - 1) / kTensorKC;
  const int64_t ntiles = end > start ? (end - start + kTensorTile - 1) / kTensorTile : 0;
  const int64_t nsteps = ntiles * ksteps;
  const __half* qsrc = queries + static_cast<int64_t>(q0) * d;

  // Probe: A row r = (r, 1, 0, ...), B column c = (16, c, 0, ...), so D(r, c) = 16 r + c (exact).
  sel.init();
  for (int i = threadIdx.x; i < 2 * 256; i += blockDim.x) {
    const int m = i & 255;
    const int r = m >> 4;   // A: row-major [r][kk]; B: column-major [c][kk]
    const int kk = m & 15;
    float v = 0.0f;
    if (i < 256) {
      v = kk == 0 ? static_cast<float>(r) : (kk == 1 ? 1.0f : 0.0f);
    } else {
      v = kk == 0 ? 16.0f : (kk == 1 ? static_cast<float>(r) : 0.0f);
    }
    gs[i] = __float2half(v);
  }
  for (int g = threadIdx.x; g < QT; g += blockDim.x) {
    thr_s[g] = g >= nqb ? INFINITY : quiet_nan();  // padding queries never pass; empty lists let all through
  }
  __syncthreads();
  int pos[NE];
  {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b;
    Acc probe;
    wmma::load_matrix_sync(a, gs, 16);
    wmma::load_matrix_sync(b, gs + 256, 16);
    wmma::fill_fragment(probe, 0.0f);
    wmma::mma_sync(probe, a, b, probe);
#pragma unroll
    for (int i = 0; i < NE; ++i) pos[i] = static_cast<int>(probe.x[i]);
  }
  float thr_e[NE];
  const bool prefilter = scales == nullptr;  // int8: scores are scaled per row; the exact test sees them all
#pragma unroll
  for (int i = 0; i < NE; ++i) thr_e[i] = prefilter ? thr_s[qb * 16 + (pos[i] >> 4)] : quiet_nan();
  __syncthreads();  // the probe is read before the first gallery tile overwrites it

  // Prologue: step 0's tiles into buffer 0, step 1's gallery tile into registers.
  TilePrefetch<T, VEC> pf;
  int64_t ld_base = start;  // the step whose gallery tile `pf` holds
  int ld_kc = 0;
  if (nsteps > 0) {
    pf.load(gallery, ld_base, n, d, 0);
    load_tile<__half, VEC>(qs, qsrc, 0, nqb, d, 0, QT);
    pf.store(gs);
    if (++ld_kc == ksteps) ld_kc = 0, ld_base += kTensorTile;
    if (nsteps > 1) pf.load(gallery, ld_base, n, d, ld_kc * kTensorKC);
  }
  __syncthreads();

  Acc acc[FR];
  int64_t base = start;
  int kc = 0;
  for (int64_t step = 0; step < nsteps; ++step) {
    const int buf = static_cast<int>(step & 1);
    const __half* qt = qs + (q_resident ? 0 : buf) * QT * kLdh;
    const __half* gt = gs + buf * kTensorTile * kLdh;
    const int c0 = kc * kTensorKC;
    if (kc == 0) {
#pragma unroll
      for (int f = 0; f < FR; ++f) wmma::fill_fragment(acc[f], 0.0f);
    }
#pragma unroll
    for (int kk = 0; kk < kTensorKC; kk += 16) {
      if (c0 + kk < d) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
        wmma::load_matrix_sync(a, qt + qb * 16 * kLdh + kk, kLdh);
#pragma unroll
        for (int f = 0; f < FR; ++f) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b;
          wmma::load_matrix_sync(b, gt + (col0 + 16 * f) * kLdh + kk, kLdh);
          wmma::mma_sync(acc[f], a, b, acc[f]);
        }
      }
    }
    const bool tile_end = kc + 1 == ksteps;
    bool need_flush = false;
    if (tile_end) {
#pragma unroll
      for (int f = 0; f < FR; ++f) {
        bool any = false;  // one branch per fragment on the common path
#pragma unroll
        for (int i = 0; i < NE; ++i) any |= !(acc[f].x[i] < thr_e[i]);
        if (!any) continue;
#pragma unroll
        for (int i = 0; i < NE; ++i) {
          const float v = acc[f].x[i];
          if (!(v < thr_e[i])) {  // rare once the lists have filled
            const int g = qb * 16 + (pos[i] >> 4);
            const int64_t row = base + col0 + 16 * f + (pos[i] & 15);
            if (g < nqb && row < end) {
              const float s = scales != nullptr ? v * scales[row] : v;
              need_flush |= sel.offer(g, make_key(s, static_cast<uint32_t>(row)), sel.threshold(g));
            }
          }
        }
      }
    }
    // The next step's tiles go to the other buffers (last read in the previous step, before its barrier).
    if (step + 1 < nsteps) {
      if (!q_resident) load_tile<__half, VEC>(qs + (buf ^ 1) * QT * kLdh, qsrc, 0, nqb, d, ld_kc * kTensorKC, QT);
      pf.store(gs + (buf ^ 1) * kTensorTile * kLdh);
      if (++ld_kc == ksteps) ld_kc = 0, ld_base += kTensorTile;
      if (step + 2 < nsteps) pf.load(gallery, ld_base, n, d, ld_kc * kTensorKC);
    }
    if (!tile_end) {
      __syncthreads();
      ++kc;
      continue;
    }
    if (__syncthreads_or(need_flush)) {  // every offer of this tile is in
      // A flush phase stops the whole block, so it also folds every buffer that is half full: fewer phases.
      const int limit = sel.flush_at / 2;
      for (int g = warp; g < nqb; g += kWarps) {
        if (sel.counts[g] > limit) {
          sel.flush_group(g, lane);
          if (lane == 0 && prefilter) thr_s[g] = prefilter_threshold(sel.threshold(g));
        }
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < NE; ++i) thr_e[i] = prefilter ? thr_s[qb * 16 + (pos[i] >> 4)] : quiet_nan();
    }
    base += kTensorTile;
    kc = 0;
  }
  sel.finish();
  for (int g = warp; g < nqb; g += kWarps) {
    store_keys(sel, g, ws + (static_cast<int64_t>(q0 + g) * nchunks + chunk) * k);
  }
}

// Both stage-1 kernels share this signature (the tensor kernel ignores qg: its QT is a template argument).
using StageKernel = void (*)(const __half*, const void*, const float*, int, int, int, int, int, int, int, int,
                             skey_t*);

bool aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

template <typename T>
int run_ip(const __half* queries, const T* gallery, const float* scales, int64_t nq64, int64_t n64, int d, int k,
           float* out_scores, int64_t* out_idx, int path, cudaStream_t stream) {
  const int nq = static_cast<int>(nq64);
  const int n = static_cast<int>(n64);
  if (n == 0) return launch_merge(nullptr, nq, 0, k, out_scores, nullptr, out_idx, 0, stream);

  DeviceInfo dev;
  int st = device_info(&dev);
  if (st != ZSBIR_OK) return st;

  const size_t galign = sizeof(T) == 2 ? 16 : 8;
  const bool vec = (d % 8 == 0) && aligned(queries, 16) && aligned(gallery, galign);
  bool tensor = false;
  if (path == ZSBIR_PATH_TENSOR || path == ZSBIR_PATH_TENSOR_QT32) {
    if (k > kTensorMaxK) return ZSBIR_ERR_UNSUPPORTED;
    tensor = true;
  } else if (path == ZSBIR_PATH_AUTO) {
    tensor = nq >= 16 && k <= kTensorMaxK;
  }

  StageKernel kernel = nullptr;
  int qg = 0;
  int P = 0;
  int tile = 0;
  size_t smem = 0;
  if (tensor) {
    tile = kTensorTile;
    P = list_len(k, kTensorTile);
    qg = 64;
    smem = wmma_fixed_bytes<64>() + selector_bytes(64, P);
    // auto takes 32-query tiles: two blocks per SM (H100, k <= 128) measured faster than one of 64 queries
    // (benchmarks/results/gpu_h100_2026-11-22); `path=tensor` keeps 64 where it fits.
    if (smem > static_cast<size_t>(dev.smem_optin) || path == ZSBIR_PATH_TENSOR_QT32 || path == ZSBIR_PATH_AUTO) {
      qg = 32;
      smem = wmma_fixed_bytes<32>() + selector_bytes(32, P);
    }
    if (smem > static_cast<size_t>(dev.smem_optin)) {
      if (path != ZSBIR_PATH_AUTO) return ZSBIR_ERR_SHARED_MEMORY;
      tensor = false;  // auto: this device's shared memory is too small for the tensor tiles at this k
    }
  }
  if (tensor) {
    if (qg == 64) {
      kernel = vec ? ip_wmma_kernel<T, 64, true> : ip_wmma_kernel<T, 64, false>;
    } else {
      kernel = vec ? ip_wmma_kernel<T, 32, true> : ip_wmma_kernel<T, 32, false>;
    }
  } else {
    tile = kSimtTile;
    P = list_len(k, kSimtTile);
    const int dp = (d + 7) & ~7;
    qg = std::min(kMaxQG, nq);
    for (;;) {
      smem = (static_cast<size_t>(qg) * dp * 2 + 15) / 16 * 16 + selector_bytes(qg, P);
      if (smem <= static_cast<size_t>(dev.smem_optin) || qg == 1) break;
      --qg;
    }
    if (smem > static_cast<size_t>(dev.smem_optin)) return ZSBIR_ERR_SHARED_MEMORY;
    if (qg == 1) {  // one query per block: a 1-wide accumulator keeps registers (and occupancy) free
      kernel = vec ? ip_simt_kernel<T, true, 1> : ip_simt_kernel<T, false, 1>;
    } else {
      kernel = vec ? ip_simt_kernel<T, true, kMaxQG> : ip_simt_kernel<T, false, kMaxQG>;
    }
  }
  const void* kernel_ptr = reinterpret_cast<const void*>(kernel);
  st = cuda_status(
      cudaFuncSetAttribute(kernel_ptr, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  if (st != ZSBIR_OK) return st;
  int bps = 0;
  st = cuda_status(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&bps, kernel_ptr, kThreads, smem));
  if (st != ZSBIR_OK) return st;
  if (bps < 1) return ZSBIR_ERR_SHARED_MEMORY;

  // gridDim.y is limited (65535): run the queries in slices of at most that many query groups.
  const int64_t slice = static_cast<int64_t>(qg) * dev.max_grid_y;
  for (int64_t qs = 0; qs < nq; qs += slice) {
    const int snq = static_cast<int>(std::min<int64_t>(slice, nq - qs));
    const int groups = (snq + qg - 1) / qg;
    const ChunkPlan plan = plan_chunks(n, k, groups, bps, dev.sms, tile);
    Workspace ws;
    st = ws.alloc(static_cast<size_t>(snq) * plan.nchunks * k * sizeof(skey_t), stream);
    if (st != ZSBIR_OK) return st;
    skey_t* wsk = static_cast<skey_t*>(ws.ptr);
    const __half* qptr = queries + qs * d;
    const dim3 grid(plan.nchunks, groups);
    ZSBIR_LAUNCH(kernel, grid, kThreads, smem, stream)(qptr, gallery, scales, snq, n, d, k, P, qg,
                                                       plan.rows_per_chunk, plan.nchunks, wsk);
    st = cuda_status(cudaGetLastError());
    if (st != ZSBIR_OK) return st;
    st = launch_merge(wsk, snq, plan.nchunks, k, out_scores + qs * k, nullptr, out_idx + qs * k, 0, stream);
    if (st != ZSBIR_OK) return st;
  }
  return ZSBIR_OK;
}

}  // namespace
}  // namespace zsbir

extern "C" int zsbir_topk_ip(const void* queries, const void* gallery, const float* scales, int gallery_dtype,
                             int64_t num_queries, int64_t num_gallery, int64_t dim, int64_t k, float* out_scores,
                             int64_t* out_indices, int path, void* stream) {
  using namespace zsbir;
  if (num_queries < 0 || num_gallery < 0 || num_queries > kMaxRows || num_gallery > kMaxRows) {
    return ZSBIR_ERR_BAD_SHAPE;
  }
  if (dim < 1 || dim > kMaxDim) return ZSBIR_ERR_BAD_DIM;
  if (k < 1 || k > kMaxK) return ZSBIR_ERR_BAD_K;
  if (gallery_dtype != ZSBIR_GALLERY_F16 && gallery_dtype != ZSBIR_GALLERY_I8) return ZSBIR_ERR_BAD_DTYPE;
  if (path < ZSBIR_PATH_AUTO || path > ZSBIR_PATH_TENSOR_QT32) return ZSBIR_ERR_BAD_PATH;
  if ((path == ZSBIR_PATH_TENSOR || path == ZSBIR_PATH_TENSOR_QT32) && k > kTensorMaxK) return ZSBIR_ERR_UNSUPPORTED;
  if (num_queries == 0) return ZSBIR_OK;
  if (queries == nullptr || out_scores == nullptr || out_indices == nullptr) return ZSBIR_ERR_NULL_POINTER;
  if (num_gallery > 0 && gallery == nullptr) return ZSBIR_ERR_NULL_POINTER;
  if (gallery_dtype == ZSBIR_GALLERY_I8 && num_gallery > 0 && scales == nullptr) return ZSBIR_ERR_BAD_DTYPE;
  if (gallery_dtype == ZSBIR_GALLERY_F16 && scales != nullptr) return ZSBIR_ERR_BAD_DTYPE;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const __half* q = static_cast<const __half*>(queries);
  const int d = static_cast<int>(dim);
  const int kk = static_cast<int>(k);
  if (gallery_dtype == ZSBIR_GALLERY_F16) {
    return run_ip<__half>(q, static_cast<const __half*>(gallery), nullptr, num_queries, num_gallery, d, kk, out_scores,
                          out_indices, path, s);
  }
  return run_ip<int8_t>(q, static_cast<const int8_t*>(gallery), scales, num_queries, num_gallery, d, kk, out_scores,
                        out_indices, path, s);
}
