// The CPU emulator's core: fibers for CUDA threads, barriers, launch checks and the runtime API subset
// declared in cuda_emu.h. See that header for what is emulated. Single-threaded by design: blocks and
// threads interleave only at barriers, in an order chosen by zsbir_emu_configure().
#include "cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define ZSBIR_EMU_ASAN 1
#else
#define ZSBIR_EMU_ASAN 0
#endif

#define ZSBIR_EMU_API extern "C" __attribute__((visibility("default")))

namespace zsbir_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 256;
constexpr unsigned char kSmemFill = 0xCD;   // shared memory starts as garbage, as on the device
constexpr unsigned char kWorkFill = 0xA5;   // so does workspace memory
constexpr unsigned char kGuardFill = 0x5A;  // guard bands after buffers, checked when they are released
constexpr int kMaxThreadsPerSm = 2048;
constexpr int kMaxBlocksPerSm = 32;
constexpr size_t kDefaultSmemLimit = 48 * 1024;

// How the threads of a block interleave (any of these is a legal execution on the device):
//  forward / reverse: warps in index order (or reversed); each warp runs ahead through its warp barriers until
//    it waits at __syncthreads, then the next warp runs (maximal skew between warps);
//  random: one phase (up to its next barrier) of a randomly chosen warp at a time, lanes in random order;
//  lockstep: every warp advances one phase per round (minimal skew).
enum class Order { kForward = 0, kReverse = 1, kRandom = 2, kLockstep = 3 };
enum class State { kRunnable, kBlockWait, kWarpWait, kDone };

struct Config {
  int sms = 132;              // H100 SXM
  int smem_optin = 232448;    // 227 KiB per block after opt-in (H100); 228 KiB per SM
  int max_grid_y = 65535;     // as on every GPU; tests lower it to exercise the query slicing
  Order order = Order::kForward;
};

struct Fiber {
  ucontext_t ctx{};
  void* stack = nullptr;
  uint3 tid{};
  State state = State::kRunnable;
  long long or_barriers = 0;  // __syncthreads_or episodes this thread has passed
#if ZSBIR_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

struct Stats {
  long long launches = 0;
  long long blocks = 0;
  dim3 last_grid{0, 0, 0};
  size_t last_smem = 0;
  size_t max_smem = 0;
  size_t max_workspace = 0;       // largest cudaMallocAsync request
  long long streamed_bytes = 0;   // bytes read with __ldcs
};

Config g_cfg;
std::mt19937 g_rng(1);
Stats g_stats;
std::map<const void*, int> g_func_smem;      // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
std::map<void*, size_t> g_allocations;       // cudaMallocAsync blocks and their sizes
cudaError_t g_last_error = cudaSuccess;
int g_faults = 0;
std::string g_first_fault;
bool g_launch_faulted = false;

// The block being run.
std::vector<Fiber> g_fibers;
ucontext_t g_sched{};
int g_current = -1;
int g_nthreads = 0;
uint3 g_bid{};
dim3 g_bdim;
dim3 g_gdim;
unsigned char* g_smem = nullptr;
const std::function<void()>* g_body = nullptr;
std::vector<unsigned char> g_slots;  // warp exchange: [warp][lane][8 bytes]
std::vector<double> g_scratch;       // per-warp scratch: [warp][512 doubles = 4 KiB]
int g_or_acc[3] = {0, 0, 0};         // __syncthreads_or accumulators, by episode mod 3
#if ZSBIR_EMU_ASAN
const void* g_sched_stack_bottom = nullptr;
size_t g_sched_stack_size = 0;
#endif

void record_fault(const std::string& what) {
  if (g_faults == 0) g_first_fault = what;
  ++g_faults;
  g_launch_faulted = true;
}

Fiber& me() { return g_fibers[static_cast<size_t>(g_current)]; }

// Fiber <-> scheduler switches, annotated for AddressSanitizer when it is on.
void to_scheduler(bool exiting) {
  Fiber& f = me();
#if ZSBIR_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, g_sched_stack_bottom, g_sched_stack_size);
#else
  (void)exiting;
#endif
  swapcontext(&f.ctx, &g_sched);
#if ZSBIR_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &g_sched_stack_bottom, &g_sched_stack_size);
#endif
}

void to_fiber(Fiber& f) {
#if ZSBIR_EMU_ASAN
  void* sched_fake = nullptr;
  __sanitizer_start_switch_fiber(&sched_fake, f.stack, kStackBytes);
#endif
  swapcontext(&g_sched, &f.ctx);
#if ZSBIR_EMU_ASAN
  __sanitizer_finish_switch_fiber(sched_fake, nullptr, nullptr);
#endif
}

void trampoline() {
#if ZSBIR_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_sched_stack_bottom, &g_sched_stack_size);
#endif
  (*g_body)();
  me().state = State::kDone;
  to_scheduler(true);
  std::abort();  // a finished fiber is never resumed
}

void wait(State why) {
  me().state = why;
  to_scheduler(false);
}

// 0..n-1 in the configured order (lanes of a warp, blocks of a grid).
template <typename I>
std::vector<I> run_order(I n) {
  std::vector<I> order(static_cast<size_t>(n));
  for (I i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
  if (g_cfg.order == Order::kReverse) std::reverse(order.begin(), order.end());
  if (g_cfg.order == Order::kRandom) std::shuffle(order.begin(), order.end(), g_rng);
  return order;
}

bool warp_runnable(int w) {
  const int hi = std::min(g_nthreads, w * 32 + 32);
  for (int i = w * 32; i < hi; ++i) {
    if (g_fibers[static_cast<size_t>(i)].state == State::kRunnable) return true;
  }
  return false;
}

// Run every runnable lane of warp w up to its next barrier; release the warp barrier once all its lanes are
// there. Returns whether any lane ran.
bool run_warp_phase(int w) {
  const int lo = w * 32;
  const int hi = std::min(g_nthreads, lo + 32);
  bool ran = false;
  for (const int j : run_order(hi - lo)) {
    Fiber& f = g_fibers[static_cast<size_t>(lo + j)];
    if (f.state != State::kRunnable) continue;
    g_current = lo + j;
    to_fiber(f);
    ran = true;
  }
  g_current = -1;
  bool all = true;
  for (int i = lo; i < hi; ++i) all = all && g_fibers[static_cast<size_t>(i)].state == State::kWarpWait;
  if (all) {
    for (int i = lo; i < hi; ++i) g_fibers[static_cast<size_t>(i)].state = State::kRunnable;
  }
  return ran;
}

void ensure_fibers(int n) {
  while (static_cast<int>(g_fibers.size()) < n) {
    Fiber f;
    f.stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (f.stack == MAP_FAILED) {
      std::fprintf(stderr, "zsbir emulator: cannot map a fiber stack\n");
      std::abort();
    }
    g_fibers.push_back(f);
  }
}

void run_block(uint3 bid, size_t smem_bytes) {
  const int bx = static_cast<int>(g_bdim.x);
  const int by = static_cast<int>(g_bdim.y);
  g_nthreads = static_cast<int>(g_bdim.x * g_bdim.y * g_bdim.z);
  g_bid = bid;
  ensure_fibers(g_nthreads);
  // The device's dynamic shared memory starts at a 128-byte aligned address (it is declared __align__(128)).
  const size_t total = (smem_bytes + kGuardBytes + 127) / 128 * 128;
  g_smem = static_cast<unsigned char*>(std::aligned_alloc(128, total));
  std::memset(g_smem, kSmemFill, smem_bytes);
  std::memset(g_smem + smem_bytes, kGuardFill, kGuardBytes);
#if ZSBIR_EMU_ASAN
  __asan_poison_memory_region(g_smem + smem_bytes, kGuardBytes);
#endif
  g_slots.assign(static_cast<size_t>((g_nthreads + 31) / 32) * 32 * 8, 0);
  g_scratch.assign(static_cast<size_t>((g_nthreads + 31) / 32) * 512, 0.0);
  g_or_acc[0] = g_or_acc[1] = g_or_acc[2] = 0;
  for (int i = 0; i < g_nthreads; ++i) {
    Fiber& f = g_fibers[static_cast<size_t>(i)];
    f.tid = uint3{static_cast<unsigned>(i % bx), static_cast<unsigned>((i / bx) % by),
                  static_cast<unsigned>(i / (bx * by))};
    f.state = State::kRunnable;
    f.or_barriers = 0;
#if ZSBIR_EMU_ASAN
    __asan_unpoison_memory_region(f.stack, kStackBytes);  // a fiber abandoned after a deadlock left poison
    f.fake_stack = nullptr;
#endif
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, trampoline, 0);
  }
  const int nwarps = (g_nthreads + 31) / 32;
  for (;;) {
    bool ran = false;
    if (g_cfg.order == Order::kRandom) {
      // One phase (up to the next barrier) of one randomly chosen warp at a time.
      std::vector<int> ready;
      for (int w = 0; w < nwarps; ++w) {
        if (warp_runnable(w)) ready.push_back(w);
      }
      if (!ready.empty()) {
        std::uniform_int_distribution<size_t> pick(0, ready.size() - 1);
        ran = run_warp_phase(ready[pick(g_rng)]);
      }
    } else {
      std::vector<int> warps(static_cast<size_t>(nwarps));
      for (int w = 0; w < nwarps; ++w) warps[static_cast<size_t>(w)] = w;
      if (g_cfg.order == Order::kReverse) std::reverse(warps.begin(), warps.end());
      for (const int w : warps) {
        if (g_cfg.order == Order::kLockstep) {
          ran = run_warp_phase(w) || ran;  // one phase per warp per round
        } else {
          while (run_warp_phase(w)) ran = true;  // this warp runs ahead until it waits for the block
        }
      }
    }
    if (ran) continue;
    int done = 0;
    int block_wait = 0;
    for (int i = 0; i < g_nthreads; ++i) {
      const State st = g_fibers[static_cast<size_t>(i)].state;
      done += st == State::kDone;
      block_wait += st == State::kBlockWait;
    }
    if (done == g_nthreads) break;
    if (block_wait == g_nthreads) {
      for (int i = 0; i < g_nthreads; ++i) g_fibers[static_cast<size_t>(i)].state = State::kRunnable;
      continue;
    }
    char msg[256];
    std::snprintf(msg, sizeof(msg),
                  "deadlock in block (%u,%u,%u): %d of %d threads exited, %d wait at __syncthreads, the rest at a "
                  "warp barrier that not all lanes reach",
                  bid.x, bid.y, bid.z, done, g_nthreads, block_wait);
    record_fault(msg);
    break;
  }
#if ZSBIR_EMU_ASAN
  __asan_unpoison_memory_region(g_smem + smem_bytes, kGuardBytes);
#endif
  for (size_t i = 0; i < kGuardBytes; ++i) {
    if (g_smem[smem_bytes + i] != kGuardFill) {
      record_fault("shared memory written past the launch's dynamic shared memory size");
      break;
    }
  }
  std::free(g_smem);
  g_smem = nullptr;
}

}  // namespace

const uint3& thread_idx() { return me().tid; }
const uint3& block_idx() { return g_bid; }
const dim3& block_dim() { return g_bdim; }
const dim3& grid_dim() { return g_gdim; }
unsigned char* dynamic_shared() { return g_smem; }

void fault(const char* what) { record_fault(what); }

void count_streamed(size_t bytes) { g_stats.streamed_bytes += static_cast<long long>(bytes); }

void* warp_scratch() { return &g_scratch[static_cast<size_t>(g_current / 32) * 512]; }

void sync_block() {
  if (g_current < 0) {
    record_fault("__syncthreads outside a kernel");
    return;
  }
  wait(State::kBlockWait);
}

int sync_block_or(int predicate) {
  // Episode e accumulates in slot e % 3; after it, every thread clears slot (e + 2) % 3, which episode e - 1
  // used (all its readers are past this barrier) and episode e + 2 will use (none of its writers can be).
  const long long e = me().or_barriers++;
  int& acc = g_or_acc[e % 3];
  if (predicate != 0) acc = 1;
  sync_block();
  const int result = acc;
  g_or_acc[(e + 2) % 3] = 0;
  return result;
}

void sync_warp(unsigned int mask) {
  if (g_current < 0) {
    record_fault("__syncwarp outside a kernel");
    return;
  }
  if (mask != 0xffffffffu) record_fault("only full-warp masks are emulated");
  wait(State::kWarpWait);
}

void warp_exchange(const void* mine, void* out, size_t bytes, int src, unsigned int mask) {
  const int lane = g_current % 32;
  const size_t warp_base = static_cast<size_t>(g_current / 32) * 32 * 8;
  std::memcpy(&g_slots[warp_base + static_cast<size_t>(lane) * 8], mine, bytes);
  sync_warp(mask);
  std::memcpy(out, &g_slots[warp_base + static_cast<size_t>(src) * 8], bytes);
  sync_warp(mask);
}

void launch(const void* func, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  if (g_current >= 0) {
    record_fault("kernel launched from inside a kernel");
    return;
  }
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads < 1 || threads > 1024 || block.z > 64 || grid.x < 1 || grid.y < 1 || grid.z < 1 ||
      grid.x > 2147483647u || grid.y > static_cast<unsigned>(g_cfg.max_grid_y) || grid.z > 65535u) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const auto attr = g_func_smem.find(func);
  const size_t allowed = std::max(kDefaultSmemLimit, attr == g_func_smem.end() ? 0 : static_cast<size_t>(attr->second));
  if (smem > allowed || smem > static_cast<size_t>(g_cfg.smem_optin)) {
    g_last_error = cudaErrorInvalidValue;
    return;
  }
  ++g_stats.launches;
  g_stats.last_grid = grid;
  g_stats.last_smem = smem;
  g_stats.max_smem = std::max(g_stats.max_smem, smem);
  g_bdim = block;
  g_gdim = grid;
  g_body = &body;
  g_launch_faulted = false;
  for (const long long b : run_order(1ll * grid.x * grid.y * grid.z)) {
    const uint3 bid{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                    static_cast<unsigned>(b / (1ll * grid.x * grid.y))};
    run_block(bid, smem);
    ++g_stats.blocks;
  }
  g_body = nullptr;
  if (g_launch_faulted) g_last_error = cudaErrorLaunchFailure;
}

}  // namespace zsbir_emu

// ---------------------------------------------------------------------------------------------------------
// Runtime API

using zsbir_emu::g_cfg;

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = g_cfg.sms;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = g_cfg.smem_optin;
      return cudaSuccess;
    case cudaDevAttrMaxGridDimY:
      *value = g_cfg.max_grid_y;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  *pool = reinterpret_cast<cudaMemPool_t>(&g_cfg);
  return cudaSuccess;
}

cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t pool, cudaMemPoolAttr attr, void* value) {
  if (pool == nullptr || value == nullptr || attr != cudaMemPoolAttrReleaseThreshold) return cudaErrorInvalidValue;
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (func == nullptr || attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidDeviceFunction;
  if (value < 0 || value > g_cfg.smem_optin) return cudaErrorInvalidValue;
  zsbir_emu::g_func_smem[func] = value;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* func, int block_size,
                                                          size_t dynamic_smem) {
  if (func == nullptr) return cudaErrorInvalidDeviceFunction;
  if (block_size < 1 || block_size > 1024) return cudaErrorInvalidValue;
  // Shared memory per SM = opt-in limit + the 1 KiB the system reserves per block (as on sm_80..sm_90).
  const size_t per_sm = static_cast<size_t>(g_cfg.smem_optin) + 1024;
  const int by_smem = static_cast<int>(per_sm / (dynamic_smem + 1024));
  const int by_threads = zsbir_emu::kMaxThreadsPerSm / block_size;
  *blocks = std::min({by_smem, by_threads, zsbir_emu::kMaxBlocksPerSm});
  return cudaSuccess;
}

cudaError_t cudaMallocAsync(void** ptr, size_t bytes, cudaStream_t /*stream*/) {
  using namespace zsbir_emu;
  auto* p = static_cast<unsigned char*>(std::malloc(bytes + kGuardBytes));
  if (p == nullptr) return cudaErrorMemoryAllocation;
  std::memset(p, kWorkFill, bytes);
  std::memset(p + bytes, kGuardFill, kGuardBytes);
  g_allocations[p] = bytes;
  g_stats.max_workspace = std::max(g_stats.max_workspace, bytes);
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaFreeAsync(void* ptr, cudaStream_t /*stream*/) {
  using namespace zsbir_emu;
  if (ptr == nullptr) return cudaSuccess;
  const auto it = g_allocations.find(ptr);
  if (it == g_allocations.end()) return cudaErrorInvalidValue;
  const auto* p = static_cast<const unsigned char*>(ptr);
  for (size_t i = 0; i < kGuardBytes; ++i) {
    if (p[it->second + i] != kGuardFill) {
      record_fault("workspace written past its cudaMallocAsync size");
      g_last_error = cudaErrorLaunchFailure;
      break;
    }
  }
  g_allocations.erase(it);
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = zsbir_emu::g_last_error;
  zsbir_emu::g_last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction:
      return "invalid device function";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure (emulator fault: see zsbir_emu_faults)";
  }
  return "unrecognized error code";
}

// ---------------------------------------------------------------------------------------------------------
// Emulator controls (C ABI, for tests)

// Device and schedule: SM count, opt-in shared memory per block (bytes), thread order 0 forward / 1 reverse /
// 2 random (seeded) / 3 lockstep (see Order). Returns 0, or 1 for a bad value.
ZSBIR_EMU_API int zsbir_emu_configure(int sms, int smem_optin, int order, unsigned int seed) {
  if (sms < 1 || smem_optin < 1024 || order < 0 || order > 3) return 1;
  g_cfg.sms = sms;
  g_cfg.smem_optin = smem_optin;
  g_cfg.order = static_cast<zsbir_emu::Order>(order);
  g_cfg.max_grid_y = 65535;
  zsbir_emu::g_rng.seed(seed);
  zsbir_emu::g_func_smem.clear();
  return 0;
}

// Lower the device's gridDim.y limit (default 65535; reset by zsbir_emu_configure) so that tests reach the
// host code's query slicing with a few queries. Returns 0, or 1 for a bad value.
ZSBIR_EMU_API int zsbir_emu_set_max_grid_y(int limit) {
  if (limit < 1 || limit > 65535) return 1;
  g_cfg.max_grid_y = limit;
  return 0;
}

// Number of faults since the last reset; the first one's message is copied into buf.
ZSBIR_EMU_API int zsbir_emu_faults(char* buf, int len) {
  if (buf != nullptr && len > 0) std::snprintf(buf, static_cast<size_t>(len), "%s", zsbir_emu::g_first_fault.c_str());
  return zsbir_emu::g_faults;
}

ZSBIR_EMU_API void zsbir_emu_reset() {
  zsbir_emu::g_faults = 0;
  zsbir_emu::g_first_fault.clear();
  zsbir_emu::g_last_error = cudaSuccess;
  zsbir_emu::g_stats = zsbir_emu::Stats{};
}

// Statistics since the last reset, into out[10]: launches, blocks, last grid (x, y, z), last and largest
// dynamic shared memory, live workspace allocations, largest workspace allocation, bytes read with __ldcs.
ZSBIR_EMU_API void zsbir_emu_stats(long long* out) {
  const zsbir_emu::Stats& s = zsbir_emu::g_stats;
  out[0] = s.launches;
  out[1] = s.blocks;
  out[2] = s.last_grid.x;
  out[3] = s.last_grid.y;
  out[4] = s.last_grid.z;
  out[5] = static_cast<long long>(s.last_smem);
  out[6] = static_cast<long long>(s.max_smem);
  out[7] = static_cast<long long>(zsbir_emu::g_allocations.size());
  out[8] = static_cast<long long>(s.max_workspace);
  out[9] = s.streamed_bytes;
}
