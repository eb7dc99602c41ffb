// Host-side helpers shared by the search entry points (not part of the C ABI).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "select.cuh"
#include "zsbir_kernels.h"

// Every kernel launch and every dynamic shared-memory declaration goes through these two macros, so the same
// sources also build for the CPU emulator (kernels/emu, -DZSBIR_EMULATE), which runs them on the host to test
// their logic where no GPU is present.
#ifdef ZSBIR_EMULATE
#define ZSBIR_LAUNCH(kernel, grid, block, smem, stream) ::zsbir_emu::launcher(kernel, grid, block, smem, stream)
#else
#define ZSBIR_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif

namespace zsbir {

constexpr int64_t kMaxRows = 2147483647LL;  // Q, N < 2^31
constexpr int kMaxK = 1024;
constexpr int kMaxDim = 2048;

inline int cuda_status(cudaError_t e) { return e == cudaSuccess ? ZSBIR_OK : ZSBIR_ERR_CUDA_BASE + static_cast<int>(e); }

struct DeviceInfo {
  int sms = 0;
  int smem_optin = 0;  // max dynamic shared memory per block after opt-in
  int max_grid_y = 0;  // gridDim.y limit (65535 on every GPU so far); queries are run in slices under it
};

int device_info(DeviceInfo* info);

// How the gallery is cut into chunks, one block (per query group) per chunk.
struct ChunkPlan {
  int nchunks = 1;
  int rows_per_chunk = 0;
};

// blocks_per_sm: occupancy of the stage-1 kernel; query_groups: gridDim.y; align: rows per tile.
ChunkPlan plan_chunks(int64_t n, int k, int query_groups, int blocks_per_sm, int sms, int align);

// Stage 2: per query, merge nchunks sorted lists of k keys (ws[q][c][0..k)) into the final top-k.
// mode 0 writes float scores, mode 1 Hamming distances (score = -distance). ws may be NULL if nchunks == 0.
int launch_merge(const skey_t* ws, int nq, int nchunks, int k, float* out_scores, int32_t* out_dist,
                 int64_t* out_idx, int mode, cudaStream_t stream);

// Let the current device's default memory pool keep freed memory (instead of returning it to the driver
// at every synchronisation), so the per-call workspace costs no driver allocation after the first call.
int keep_pool_memory();

// Stream-ordered temporary buffer.
struct Workspace {
  void* ptr = nullptr;
  cudaStream_t stream = nullptr;
  ~Workspace() {
    if (ptr != nullptr) cudaFreeAsync(ptr, stream);
  }
  int alloc(size_t bytes, cudaStream_t s) {
    stream = s;
    if (bytes == 0) return ZSBIR_OK;
    const int st = keep_pool_memory();
    if (st != ZSBIR_OK) return st;
    return cuda_status(cudaMallocAsync(&ptr, bytes, s));
  }
};

}  // namespace zsbir
