// Known-bad kernels that the emulator's checks must catch (tests/test_kernels_emu.py runs them): without
// these, a clean emulator run of the real kernels would say nothing about whether the checks work.
#include "cuda_emu.h"

#define ZSBIR_EMU_API extern "C" __attribute__((visibility("default")))

namespace {

// Thread t writes slot t, then reads slot t+1: correct only with the barrier between the two.
__global__ void neighbour_read(int* out, bool barrier) {
  int* s = reinterpret_cast<int*>(zsbir_emu::dynamic_shared());
  s[threadIdx.x] = static_cast<int>(threadIdx.x);
  if (barrier) __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Half of the block skips the barrier: hangs on a GPU.
__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < blockDim.x / 2) __syncthreads();
  out[threadIdx.x] = 1;
}

// Writes one int past the dynamic shared memory.
__global__ void shared_overrun(int* out, int n) {
  int* s = reinterpret_cast<int*>(zsbir_emu::dynamic_shared());
  if (threadIdx.x == 0) s[n] = 1;
  out[threadIdx.x] = 0;
}

// Butterfly exchange: lane l receives lane l ^ 1's value.
__global__ void shuffle(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x) * 10, 1);
}

}  // namespace

// which: 0 neighbour read with barrier, 1 without, 2 divergent barrier, 3 shared-memory overrun, 4 shuffle,
// 5 launch with gridDim.y = 65536, 6 launch with 64 KiB of shared memory without the opt-in attribute.
// `out` receives 256 ints. Returns the launch's cudaGetLastError() value.
ZSBIR_EMU_API int zsbir_emu_selftest(int which, int* out) {
  const size_t smem = 256 * sizeof(int);
  switch (which) {
    case 0:
    case 1:
      zsbir_emu::launcher(neighbour_read, dim3(1), dim3(256), smem, nullptr)(out, which == 0);
      break;
    case 2:
      zsbir_emu::launcher(divergent_barrier, dim3(1), dim3(256), 0, nullptr)(out);
      break;
    case 3:
      zsbir_emu::launcher(shared_overrun, dim3(1), dim3(256), smem, nullptr)(out, 256);
      break;
    case 4:
      zsbir_emu::launcher(shuffle, dim3(1), dim3(256), 0, nullptr)(out);
      break;
    case 5:
      zsbir_emu::launcher(shuffle, dim3(1, 65536), dim3(256), 0, nullptr)(out);
      break;
    case 6:
      zsbir_emu::launcher(neighbour_read, dim3(1), dim3(256), 64 * 1024, nullptr)(out, true);
      break;
    default:
      return -1;
  }
  return static_cast<int>(cudaGetLastError());
}
