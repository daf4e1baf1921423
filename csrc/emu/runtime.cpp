// The emulator's scheduler (see hetlora_emu.h): CUDA threads as ucontext fibers.
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "hetlora_emu.h"

namespace hetlora_emu {
namespace {

// Kernel frames are small; the pages are only touched as far as a thread's frames reach.
constexpr size_t kStackBytes = 64 * 1024;

enum class State { Ready, WarpWait, BlockWait, Done };

struct Fiber {
  ucontext_t ctx;
  uint3 tid{0, 0, 0};
  int warp = 0, lane = 0;
  State state = State::Ready;
  unsigned wait_gen = 0;
};

struct Warp {
  int size = 0;     // threads of the block in this warp: 32, fewer in a partial last warp
  int arrived = 0;  // lanes waiting at the current step of a shuffle
  int exited = 0;
  unsigned gen = 0;
  uint64_t slot[32] = {};
};

// One block in flight.
struct Run {
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int live = 0;
  int block_arrived = 0;
  unsigned block_gen = 0;
  int current = -1;
  ucontext_t sched;
  bool failed = false;
  std::string error;
};

Run* g_run = nullptr;
uint3 g_block_idx{0, 0, 0};
dim3 g_grid, g_block;
std::vector<std::unique_ptr<char[]>> g_stacks;

cudaError_t g_last = cudaSuccess;
std::string g_message;
int g_schedule = 0;  // 0 ascending, 1 descending, 2 seeded random
uint64_t g_seed = 0;
uint64_t g_launches = 0, g_blocks = 0, g_threads = 0;

void set_error(cudaError_t err, const std::string& msg) {
  if (g_last == cudaSuccess) g_last = err;
  if (g_message.empty()) g_message = msg;
}

Run& run_here(const char* what) {
  if (g_run == nullptr || g_run->current < 0) {
    std::fprintf(stderr, "hetlora_emu: %s called outside a kernel\n", what);
    std::abort();
  }
  return *g_run;
}

std::string where(const Fiber& f) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u) [warp %d lane %d]: ", g_block_idx.x,
                g_block_idx.y, g_block_idx.z, f.tid.x, f.tid.y, f.tid.z, f.warp, f.lane);
  return buf;
}

// Stops the block: records why and returns to the scheduler for good.
[[noreturn]] void fail(Run& r, const std::string& msg) {
  Fiber& f = r.fibers[r.current];
  if (!r.failed) {
    r.failed = true;
    r.error = where(f) + msg;
  }
  swapcontext(&f.ctx, &r.sched);
  std::abort();  // a failed block is never resumed
}

void yield(Run& r, Fiber& f) { swapcontext(&f.ctx, &r.sched); }

// One thread arrives at a barrier of `expected` threads: the last one releases it (a new
// generation), the others wait in `state` until the generation moves on.
void arrive(Run& r, Fiber& f, int& arrived, int expected, unsigned& gen, State state) {
  if (++arrived == expected) {
    arrived = 0;
    ++gen;
    return;
  }
  f.state = state;
  f.wait_gen = gen;
  yield(r, f);
}

void warp_step(Run& r, Fiber& f, const char* what) {
  Warp& w = r.warps[f.warp];
  if (w.exited > 0)
    fail(r, std::string(what) + " with a full mask, but " + std::to_string(w.exited) +
                " lane(s) of this warp have exited");
  arrive(r, f, w.arrived, w.size, w.gen, State::WarpWait);
}

void thread_exit(Run& r, Fiber& f) {
  Warp& w = r.warps[f.warp];
  ++w.exited;
  if (w.arrived > 0)
    fail(r, "exits while " + std::to_string(w.arrived) + " lane(s) of its warp wait in a full-mask shuffle");
  --r.live;
  if (r.block_arrived > 0 && r.block_arrived == r.live) {  // exited threads do not hold a barrier up
    r.block_arrived = 0;
    ++r.block_gen;
  }
}

void fiber_main() {
  Run& r = *g_run;
  (*r.body)();
  Fiber& f = r.fibers[r.current];
  f.state = State::Done;
  thread_exit(r, f);
  // returning resumes uc_link, the scheduler
}

bool runnable(const Run& r, const Fiber& f) {
  switch (f.state) {
    case State::Ready: return true;
    case State::WarpWait: return r.warps[f.warp].gen != f.wait_gen;
    case State::BlockWait: return r.block_gen != f.wait_gen;
    case State::Done: return false;
  }
  return false;
}

std::string stuck_report(const Run& r) {
  int warp_wait = 0, block_wait = 0;
  for (const Fiber& f : r.fibers) {
    warp_wait += f.state == State::WarpWait;
    block_wait += f.state == State::BlockWait;
  }
  char buf[200];
  std::snprintf(buf, sizeof buf,
                "block (%u,%u,%u) deadlocks: %d thread(s) wait in a shuffle and %d at __syncthreads, and no "
                "thread can go on",
                g_block_idx.x, g_block_idx.y, g_block_idx.z, warp_wait, block_wait);
  return buf;
}

bool run_block(const std::function<void()>& body, int n, uint64_t block_linear) {
  Run r;
  r.body = &body;
  r.fibers.resize(n);
  r.warps.resize((n + 31) / 32);
  for (size_t w = 0; w < r.warps.size(); ++w) r.warps[w].size = std::min(32, n - 32 * static_cast<int>(w));
  for (int i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    const unsigned u = static_cast<unsigned>(i);
    f.tid = {u % g_block.x, (u / g_block.x) % g_block.y, u / (g_block.x * g_block.y)};
    f.warp = i / 32;
    f.lane = i % 32;
    getcontext(&f.ctx);  // one each: a copied ucontext_t would share its saved FPU state
    f.ctx.uc_stack.ss_sp = g_stacks[i].get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &r.sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  r.live = n;
  g_run = &r;
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = g_schedule == 1 ? n - 1 - i : i;
  std::mt19937_64 rng(g_seed * 0x9e3779b97f4a7c15ull + block_linear);
  for (;;) {
    if (g_schedule == 2) std::shuffle(order.begin(), order.end(), rng);
    bool progressed = false, all_done = true;
    for (int i : order) {
      Fiber& f = r.fibers[i];
      if (f.state == State::Done) continue;
      all_done = false;
      if (!runnable(r, f)) continue;
      f.state = State::Ready;
      r.current = i;
      swapcontext(&r.sched, &f.ctx);
      r.current = -1;
      progressed = true;
      if (r.failed) break;
    }
    if (r.failed) break;
    if (all_done) break;
    if (!progressed) {
      r.failed = true;
      r.error = stuck_report(r);
      break;
    }
  }
  g_run = nullptr;
  ++g_blocks;
  g_threads += static_cast<uint64_t>(n);
  if (r.failed) set_error(cudaErrorLaunchFailure, r.error);
  return !r.failed;
}

}  // namespace

const uint3& thread_idx() {
  Run& r = run_here("threadIdx");
  return r.fibers[r.current].tid;
}
const uint3& block_idx() {
  run_here("blockIdx");
  return g_block_idx;
}
const dim3& block_dim() {
  run_here("blockDim");
  return g_block;
}
const dim3& grid_dim() {
  run_here("gridDim");
  return g_grid;
}

void sync_threads() {
  Run& r = run_here("__syncthreads");
  arrive(r, r.fibers[r.current], r.block_arrived, r.live, r.block_gen, State::BlockWait);
}

uint64_t shfl_xor_bits(unsigned member_mask, uint64_t bits, int lane_mask, int width) {
  Run& r = run_here("__shfl_xor_sync");
  Fiber& f = r.fibers[r.current];
  Warp& w = r.warps[f.warp];
  if (width != 32) fail(r, "__shfl_xor_sync with width " + std::to_string(width) + " (only 32 is emulated)");
  if (member_mask != 0xffffffffu) fail(r, "__shfl_xor_sync with a partial mask (only 0xffffffff is emulated)");
  if (w.size != 32)
    fail(r, "__shfl_xor_sync with a full mask in a warp of only " + std::to_string(w.size) +
                " threads (the block size is not a multiple of 32)");
  w.slot[f.lane] = bits;
  warp_step(r, f, "__shfl_xor_sync");
  int src = f.lane ^ lane_mask;
  if (src < 0 || src >= 32) src = f.lane;  // CUDA: a source lane outside the warp returns the caller's value
  const uint64_t out = w.slot[src];
  warp_step(r, f, "__shfl_xor_sync");  // nobody overwrites a slot before every lane has read
  return out;
}

void launch(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& thread_body) {
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  // the limits of compute capability 8.x / 9.x (static shared memory: 48 KiB)
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535u || grid.z > 65535u ||
      threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      shared_bytes > 48 * 1024) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "invalid launch configuration: grid (%u,%u,%u), block (%u,%u,%u), %zu B shared",
                  grid.x, grid.y, grid.z, block.x, block.y, block.z, shared_bytes);
    set_error(cudaErrorInvalidConfiguration, buf);
    return;
  }
  if (g_run != nullptr) {
    set_error(cudaErrorLaunchFailure, "a kernel launched from inside a kernel (not emulated)");
    return;
  }
  ++g_launches;
  while (g_stacks.size() < threads) g_stacks.emplace_back(new char[kStackBytes]);
  g_grid = grid;
  g_block = block;
  uint64_t linear = 0;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x, ++linear) {
        g_block_idx = {x, y, z};
        if (!run_block(thread_body, static_cast<int>(threads), linear)) return;
      }
}

}  // namespace hetlora_emu

cudaError_t cudaGetLastError() {
  const cudaError_t e = hetlora_emu::g_last;
  hetlora_emu::g_last = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

// The C interface tests/cuda_emu.py reads through ctypes.
extern "C" {

const char* hetlora_emu_message() { return hetlora_emu::g_message.c_str(); }

void hetlora_emu_reset() {
  hetlora_emu::g_message.clear();
  hetlora_emu::g_last = cudaSuccess;
}

void hetlora_emu_set_schedule(int mode, uint64_t seed) {
  hetlora_emu::g_schedule = mode;
  hetlora_emu::g_seed = seed;
}

// launches, blocks and threads run so far: tests check that a kernel really ran
void hetlora_emu_counters(uint64_t* out) {
  out[0] = hetlora_emu::g_launches;
  out[1] = hetlora_emu::g_blocks;
  out[2] = hetlora_emu::g_threads;
}

}  // extern "C"
