// Shared-memory top-k selection used by every search kernel.
//
// A candidate is one 64-bit key: the high word is the score's bits mapped so that unsigned order equals
// float order, the low word is (0xFFFFFFFF - index). A larger key is a better candidate: higher score,
// then smaller gallery index. Keys are unique per gallery row, so the result never depends on the order
// in which blocks or threads offer candidates. Key 0 is the empty-slot sentinel: no valid row maps to it
// (indices are < 2^31, so the low word of a valid key is >= 2^31).
//
// Per query ("group") a block keeps a list of P = power-of-two keys in shared memory: slots [0, k) hold
// the current best k (sorted, best first), slots [k, P) are an append buffer. A candidate is appended
// (atomicAdd on the group's count) only if it beats the current k-th key. Between tiles, a warp sorts a
// group's whole list when its buffer might not hold another tile ("flush"); afterwards [0, k) is again
// the best k seen so far. The Q x N score matrix never leaves the block.
#pragma once

#include <cstdint>

// The block's dynamic shared memory (see ZSBIR_LAUNCH in internal.cuh for why this is a macro).
#ifdef ZSBIR_EMULATE
#define ZSBIR_DYNAMIC_SMEM(name) unsigned char* name = ::zsbir_emu::dynamic_shared()
#else
#define ZSBIR_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

namespace zsbir {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

using skey_t = unsigned long long;

__device__ __forceinline__ uint32_t order_bits(float s) {
  if (s != s) s = -INFINITY;  // NaN ranks like -inf
  if (s == 0.0f) s = 0.0f;    // -0.0 ranks like +0.0
  const uint32_t b = __float_as_uint(s);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float order_bits_to_float(uint32_t o) {
  const uint32_t b = (o & 0x80000000u) ? (o & 0x7fffffffu) : ~o;
  return __uint_as_float(b);
}

__device__ __forceinline__ skey_t make_key(float score, uint32_t index) {
  return (static_cast<skey_t>(order_bits(score)) << 32) | static_cast<skey_t>(0xFFFFFFFFu - index);
}

__device__ __forceinline__ uint32_t key_index(skey_t key) {
  return 0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFull);
}

__device__ __forceinline__ float key_score(skey_t key) { return order_bits_to_float(static_cast<uint32_t>(key >> 32)); }

// Sort s[0, P) in descending order with one warp (P a power of two >= 2).
__device__ __forceinline__ void warp_bitonic_sort_desc(skey_t* s, int P, int lane) {
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = lane; i < (P >> 1); i += 32) {
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const skey_t a = s[lo];
        const skey_t b = s[hi];
        const bool desc = (lo & size) == 0;
        if (desc ? (a < b) : (a > b)) {
          s[lo] = b;
          s[hi] = a;
        }
      }
      __syncwarp();
    }
  }
}

// The same network for a compile-time P >= 128: each lane loads a batch of up to 4 of its P/64 pairs of a stage
// before comparing them, so a stage costs one shared-memory latency per batch instead of one per pair.
template <int P>
__device__ __forceinline__ void warp_bitonic_sort_desc_fixed(skey_t* s, int lane) {
  constexpr int J = P / 64;           // pairs per lane and stage
  constexpr int B = J < 4 ? J : 4;    // pairs per batch (registers: 4 keys each way)
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int j0 = 0; j0 < J; j0 += B) {
        skey_t a[B];
        skey_t b[B];
#pragma unroll
        for (int j = 0; j < B; ++j) {
          const int i = lane + 32 * (j0 + j);
          const int lo = 2 * i - (i & (stride - 1));
          a[j] = s[lo];
          b[j] = s[lo + stride];
        }
#pragma unroll
        for (int j = 0; j < B; ++j) {
          const int i = lane + 32 * (j0 + j);
          const int lo = 2 * i - (i & (stride - 1));
          const bool desc = (lo & size) == 0;
          if (desc ? (a[j] < b[j]) : (a[j] > b[j])) {
            s[lo] = b[j];
            s[lo + stride] = a[j];
          }
        }
      }
      __syncwarp();
    }
  }
}

__device__ __forceinline__ void warp_sort_desc(skey_t* s, int P, int lane) {
  switch (P) {
    case 256: warp_bitonic_sort_desc_fixed<256>(s, lane); break;
    case 512: warp_bitonic_sort_desc_fixed<512>(s, lane); break;
    case 1024: warp_bitonic_sort_desc_fixed<1024>(s, lane); break;
    case 2048: warp_bitonic_sort_desc_fixed<2048>(s, lane); break;
    default: warp_bitonic_sort_desc(s, P, lane); break;  // no kernel makes other lengths today
  }
}

// Per-block selection state, carved out of dynamic shared memory.
struct Selector {
  skey_t* lists;  // [groups][P]
  int* counts;   // [groups]
  int groups;
  int P;
  int k;
  int flush_at;  // flush a group when its count exceeds this (= P - k - max appends per tile)

  __device__ __forceinline__ skey_t* list(int g) const { return lists + static_cast<size_t>(g) * P; }

  // Everyone in the block: zero all lists and counts. Caller syncs afterwards.
  __device__ __forceinline__ void init() const {
    for (int i = threadIdx.x; i < groups * P; i += blockDim.x) lists[i] = 0ull;
    for (int i = threadIdx.x; i < groups; i += blockDim.x) counts[i] = 0;
  }

  // The key a candidate of group g must beat. Read only between flush phases.
  __device__ __forceinline__ skey_t threshold(int g) const { return list(g)[k - 1]; }

  // Append `key` to group g's buffer if it beats `thr`; true if the buffer is then above flush_at.
  __device__ __forceinline__ bool offer(int g, skey_t key, skey_t thr) const {
    if (key > thr) {
      const int pos = atomicAdd(&counts[g], 1);
      list(g)[k + pos] = key;
      return pos + 1 > flush_at;
    }
    return false;
  }

  // One warp: fold group g's buffer into its best-k.
  __device__ __forceinline__ void flush_group(int g, int lane) const {
    skey_t* s = list(g);
    const int c = counts[g];
    for (int i = k + c + lane; i < P; i += 32) s[i] = 0ull;
    __syncwarp();
    warp_sort_desc(s, P, lane);
    if (lane == 0) counts[g] = 0;
    __syncwarp();
  }

  // Whole block, between tiles: flush every group whose buffer is above `limit`.
  __device__ __forceinline__ void flush_all(int limit) const {
    __syncthreads();
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    for (int g = warp; g < groups; g += kWarps) {
      if (counts[g] > limit) flush_group(g, lane);
    }
    __syncthreads();
  }

  __device__ __forceinline__ void between_tiles() const { flush_all(flush_at); }
  __device__ __forceinline__ void finish() const { flush_all(0); }
};

// Carve a Selector out of shared memory at `base` (8-byte aligned); returns the first free byte.
__device__ __forceinline__ unsigned char* make_selector(unsigned char* base, int groups, int P, int k, int max_per_tile,
                                                        Selector* sel) {
  sel->lists = reinterpret_cast<skey_t*>(base);
  base += static_cast<size_t>(groups) * P * sizeof(skey_t);
  sel->counts = reinterpret_cast<int*>(base);
  base += ((static_cast<size_t>(groups) * sizeof(int) + 15) / 16) * 16;
  sel->groups = groups;
  sel->P = P;
  sel->k = k;
  sel->flush_at = P - k - max_per_tile;
  return base;
}

// Host + device: bytes the selector needs.
__host__ __device__ inline size_t selector_bytes(int groups, int P) {
  return static_cast<size_t>(groups) * P * sizeof(skey_t) + ((static_cast<size_t>(groups) * sizeof(int) + 15) / 16) * 16;
}

__host__ __device__ inline int next_pow2(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

// List length for k results with up to `per_tile` appends between flushes.
__host__ __device__ inline int list_len(int k, int per_tile) { return next_pow2(k + per_tile); }

// Write a block's best-k of group g to the workspace row (k keys).
__device__ __forceinline__ void store_keys(const Selector& sel, int g, skey_t* __restrict__ dst) {
  const skey_t* s = sel.list(g);
  for (int j = threadIdx.x & 31; j < sel.k; j += 32) dst[j] = s[j];
}

}  // namespace zsbir
