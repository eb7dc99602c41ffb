// A CPU emulator for the subset of CUDA C++ that the zsbir kernels use, so that the very same kernel
// sources (kernels/*.cu, compiled as C++ with -DZSBIR_EMULATE) can be run and tested where no GPU exists.
//
// What is emulated, and how faithfully:
//  * Every CUDA thread of a block is a fiber (ucontext) with its own stack; blocks run one after another.
//    Between two synchronisation points a fiber runs without interruption. How warps interleave is a
//    setting (emu.cpp, Order): each warp running ahead until it waits for the block (warps forward or
//    reversed), a seeded random walk over warps, or all warps in lockstep; blocks and lanes run forward,
//    reversed or shuffled likewise. A kernel whose result depends on the setting has a race; running each
//    test under several settings is how the emulator finds one.
//  * __syncthreads() is a block barrier, __syncwarp() a warp barrier (full mask only), __shfl_xor_sync() an
//    exchange through the warp with a barrier on each side, and the WMMA calls are warp-collective (each
//    lane computes the whole 16x16 tile in float from fp16 inputs, as the tensor cores do up to the order
//    of the fp32 sums). A barrier that not every thread of its scope reaches is reported as a deadlock.
//  * Dynamic shared memory is a fresh heap buffer of exactly the launch size, filled with a garbage pattern
//    and followed by a guard band that is checked after the block; workspace from cudaMallocAsync is
//    poisoned and guarded the same way. Built with -fsanitize=address, out-of-bounds reads of any buffer
//    are caught too, and UBSan's alignment check catches a misaligned vector load or store (the device
//    would fault; x86 would not).
//  * Launch checks follow the CUDA rules the host code relies on: grid.y and grid.z <= 65535, at most
//    1024 threads per block, more than 48 KiB of dynamic shared memory only after
//    cudaFuncSetAttribute(MaxDynamicSharedMemorySize), and never more than the device's opt-in limit.
//    The device (SM count, opt-in shared memory) is configurable; its defaults are an H100 SXM's.
//  * "Device memory" is host memory: callers pass host pointers. Streams are accepted and ignored (every
//    call completes before it returns).
// Not emulated: timing, the memory model beyond barriers, warp-level reconvergence, register limits.
#pragma once

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) alignas(n)

// ---------------------------------------------------------------------------------------------------------
// Vector types

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }

// ---------------------------------------------------------------------------------------------------------
// Runtime API subset (values as in the CUDA headers)

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;
typedef struct CUmemPoolHandle_st* cudaMemPool_t;
enum cudaDeviceAttr {
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaMemPoolAttr { cudaMemPoolAttrReleaseThreshold = 4 };

cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int device);
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t pool, cudaMemPoolAttr attr, void* value);
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value);
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* func, int block_size,
                                                          size_t dynamic_smem);
cudaError_t cudaMallocAsync(void** ptr, size_t bytes, cudaStream_t stream);
cudaError_t cudaFreeAsync(void* ptr, cudaStream_t stream);
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t error);

template <typename T>
cudaError_t cudaFuncSetAttribute(T* func, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(func), attr, value);
}
template <typename T>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, T* func, int block_size, size_t smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, reinterpret_cast<const void*>(func), block_size,
                                                       smem);
}

// ---------------------------------------------------------------------------------------------------------
// The emulator's core (emu.cpp)

namespace zsbir_emu {

const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
unsigned char* dynamic_shared();
void sync_block();
// __syncthreads_or: a block barrier that returns non-zero iff some thread passed a non-zero predicate.
int sync_block_or(int predicate);
void sync_warp(unsigned int mask);
// Exchange `bytes` (<= 8) through the calling warp: every lane passes its value and gets lane `src`'s.
void warp_exchange(const void* mine, void* out, size_t bytes, int src, unsigned int mask);
// Record a fault (bad alignment, unsupported use): the launch then reports cudaErrorLaunchFailure.
void fault(const char* what);
// Add to the count of bytes read with streaming loads (__ldcs).
void count_streamed(size_t bytes);
// 4 KiB of scratch memory per warp (for warp-collective operations that compute once per warp).
void* warp_scratch();
// Warp-collective: fault unless every lane passes the same value (e.g. a WMMA pointer).
inline void require_warp_uniform(const void* p, const char* what) {
  const void* lane0 = p;
  warp_exchange(&p, &lane0, sizeof(p), 0, 0xffffffffu);
  if (lane0 != p) fault(what);
}

// Run `body` for every thread of every block of the grid (blocking). Checks the launch configuration first.
void launch(const void* func, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

template <typename F>
struct Launcher {
  F func;
  dim3 grid;
  dim3 block;
  size_t smem;
  template <typename... A>
  void operator()(A... args) const {
    const F f = func;
    launch(reinterpret_cast<const void*>(f), grid, block, smem, [f, args...]() { f(args...); });
  }
};

template <typename F>
Launcher<F> launcher(F func, dim3 grid, dim3 block, size_t smem, cudaStream_t /*stream*/) {
  return Launcher<F>{func, grid, block, smem};
}

}  // namespace zsbir_emu

#define threadIdx (::zsbir_emu::thread_idx())
#define blockIdx (::zsbir_emu::block_idx())
#define blockDim (::zsbir_emu::block_dim())
#define gridDim (::zsbir_emu::grid_dim())

// ---------------------------------------------------------------------------------------------------------
// Device intrinsics

inline void __syncthreads() { zsbir_emu::sync_block(); }
inline int __syncthreads_or(int predicate) { return zsbir_emu::sync_block_or(predicate); }
inline void __syncwarp(unsigned int mask = 0xffffffffu) { zsbir_emu::sync_warp(mask); }

template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
  if (width != 32) zsbir_emu::fault("__shfl_xor_sync: only width 32 is emulated");
  const int lane = static_cast<int>(threadIdx.x % 32);
  T out = value;
  zsbir_emu::warp_exchange(&value, &out, sizeof(T), (lane ^ lane_mask) & 31, mask);
  return out;
}

// Warp vote, built from the emulated shuffle so that every lane must take part, as on the device.
inline int __any_sync(unsigned int mask, int predicate) {
  int v = predicate != 0 ? 1 : 0;
  for (int m = 16; m > 0; m >>= 1) v |= __shfl_xor_sync(mask, v, m);
  return v;
}

inline int atomicAdd(int* address, int value) {  // fibers of a block never run at the same time
  const int old = *address;
  *address = old + value;
  return old;
}

// Streaming loads are how the kernels read the gallery: the emulator counts their bytes (zsbir_emu_stats), so
// tests can check that a search reads each gallery byte as often as the design says (once for Q <= 8).
template <typename T>
T __ldcs(const T* p) {  // the device faults on a misaligned vector load; x86 would not
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) {
    zsbir_emu::fault("__ldcs: misaligned global load");
    return T{};
  }
  zsbir_emu::count_streamed(sizeof(T));
  return *p;
}

inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }

template <typename T>
T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
T max(T a, T b) {
  return a < b ? b : a;
}

// ---------------------------------------------------------------------------------------------------------
// float16 (cuda_fp16.h subset), round-to-nearest-even like the device conversions

struct __half {
  unsigned short bits;
};
struct __half2 {
  __half x, y;
};

inline __half __float2half(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  __half r;
  std::memcpy(&r.bits, &h, sizeof(r.bits));
  return r;
}
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, sizeof(v));
  return static_cast<float>(v);
}
inline __half __int2half_rn(int i) {
  const _Float16 h = static_cast<_Float16>(i);
  __half r;
  std::memcpy(&r.bits, &h, sizeof(r.bits));
  return r;
}
inline __half2 __halves2half2(__half lo, __half hi) { return __half2{lo, hi}; }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }

// ---------------------------------------------------------------------------------------------------------
// WMMA (mma.h subset): 16x16x16, fp16 inputs, fp32 accumulators

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// matrix_a / matrix_b: every lane holds the whole tile, element (r, c) at x[r * cols + c] (accumulators: below).
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = rows * cols;
  T x[rows * cols];
};

// Accumulators are spread over the warp like on the device (num_elements per lane, every tile element held by
// exactly one lane), but in a scrambled order: element i of lane L holds tile position acc_pos(L, i) (row-major).
// The device's distribution is not specified by the WMMA API, so kernels must find positions out (e.g. with a
// probe MMA) instead of assuming one; a kernel that assumes the device's would fail here.
template <int M, int N, int K>
struct fragment<accumulator, M, N, K, float, void> {
  static constexpr int num_elements = M * N / 32;
  float x[num_elements];
};

namespace detail {
constexpr int acc_pos(int lane, int i, int size) { return ((lane * (size / 32) + i) * 37 + 11) % size; }
inline bool aligned32(const void* p) { return reinterpret_cast<uintptr_t>(p) % 32 == 0; }
inline float to_float(__half h) { return __half2float(h); }
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const T& value) {
  for (int i = 0; i < fragment<Use, M, N, K, T, Layout>::num_elements; ++i) f.x[i] = value;
}

template <typename Use, int M, int N, int K, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, __half, Layout>& f, const __half* p, unsigned int ldm) {
  using Frag = fragment<Use, M, N, K, __half, Layout>;
  zsbir_emu::require_warp_uniform(p, "wmma::load_matrix_sync: lanes pass different pointers");
  if (!detail::aligned32(p)) zsbir_emu::fault("wmma::load_matrix_sync: pointer not 32-byte aligned");
  if (ldm % 8 != 0) zsbir_emu::fault("wmma::load_matrix_sync: ldm not a multiple of 8 halves");
  for (int r = 0; r < Frag::rows; ++r) {
    for (int c = 0; c < Frag::cols; ++c) {
      f.x[r * Frag::cols + c] = std::is_same<Layout, row_major>::value ? p[r * ldm + c] : p[c * ldm + r];
    }
  }
  zsbir_emu::sync_warp(0xffffffffu);
}

template <int M, int N, int K>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, __half, row_major>& a,
              const fragment<matrix_b, M, N, K, __half, col_major>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  // The lanes gather C in the warp scratch; lane 0 (whose a and b hold the whole tiles: loads are uniform)
  // computes D there once for the warp; every lane takes back its own elements.
  using Acc = fragment<accumulator, M, N, K, float>;
  static_assert(sizeof(float) * M * N <= 4096, "tile larger than the warp scratch");
  float* tile = static_cast<float*>(zsbir_emu::warp_scratch());
  const int lane = static_cast<int>(threadIdx.x % 32);
  zsbir_emu::sync_warp(0xffffffffu);
  for (int i = 0; i < Acc::num_elements; ++i) tile[detail::acc_pos(lane, i, M * N)] = c.x[i];
  zsbir_emu::sync_warp(0xffffffffu);
  if (lane == 0) {
    float af[M * K];
    float bf[K * N];
    for (int i = 0; i < M * K; ++i) af[i] = detail::to_float(a.x[i]);
    for (int i = 0; i < K * N; ++i) bf[i] = detail::to_float(b.x[i]);
    for (int m = 0; m < M; ++m) {
      for (int n = 0; n < N; ++n) {
        float s = tile[m * N + n];
        for (int kk = 0; kk < K; ++kk) s += af[m * K + kk] * bf[kk * N + n];
        tile[m * N + n] = s;
      }
    }
  }
  zsbir_emu::sync_warp(0xffffffffu);
  for (int i = 0; i < Acc::num_elements; ++i) d.x[i] = tile[detail::acc_pos(lane, i, M * N)];
  zsbir_emu::sync_warp(0xffffffffu);
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned int ldm, layout_t layout) {
  zsbir_emu::require_warp_uniform(p, "wmma::store_matrix_sync: lanes pass different pointers");
  if (!detail::aligned32(p)) zsbir_emu::fault("wmma::store_matrix_sync: pointer not 32-byte aligned");
  if (ldm % 4 != 0) zsbir_emu::fault("wmma::store_matrix_sync: ldm not a multiple of 4 floats");
  // Every lane writes the elements it holds (disjoint parts of the tile, as on the device).
  const int lane = static_cast<int>(threadIdx.x % 32);
  for (int i = 0; i < fragment<accumulator, M, N, K, float>::num_elements; ++i) {
    const int pos = detail::acc_pos(lane, i, M * N);
    const int m = pos / N;
    const int n = pos % N;
    if (layout == mem_row_major) {
      p[m * ldm + n] = f.x[i];
    } else {
      p[n * ldm + m] = f.x[i];
    }
  }
  zsbir_emu::sync_warp(0xffffffffu);
}

}  // namespace wmma
}  // namespace nvcuda
