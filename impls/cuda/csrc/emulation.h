// A CPU emulation of the part of the CUDA execution model the normconf kernels use, so that the
// kernels and their launchers run, unchanged, without a GPU (impls/cuda/emulation.py builds
// emulation.cpp with it). Not part of the GPU build.
//
// - A launch runs its blocks one after another. A block's threads are fibers (ucontext) on the
//   calling thread, resumed in turn: each runs to its next __syncthreads() or warp shuffle, or
//   to its end. threadIdx, blockIdx, blockDim and gridDim are set for the fiber that runs.
// - __shared__ variables become function statics: one copy, reused by each block in turn.
// - After every round, the threads waiting at __syncthreads() must be all of the block's, and
//   the threads waiting at __shfl_xor_sync() all 32 of their warp's (as on the GPU with a full
//   mask). Anything else is divergence around a barrier (a hang or undefined on the GPU): it is
//   recorded and the launch stops.
// - Misaligned 16-byte packs and partial shuffle masks are recorded too (take_error()), rather
//   than faulting as they would on the GPU.
// Everything is deterministic: the same launch interleaves its threads the same way every time.
#pragma once

#include <ucontext.h>
#include <vector_types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

// The CUDA headers define these as attributes for the host compiler; here they are plain C++.
#undef __device__
#undef __global__
#undef __shared__
#undef __launch_bounds__
#define __device__
#define __global__
#define __shared__ static
#define __launch_bounds__(...)

namespace normconf::emulation {

struct Index {
  unsigned x = 0, y = 0, z = 0;
};

}  // namespace normconf::emulation

inline normconf::emulation::Index threadIdx, blockIdx, blockDim, gridDim;

namespace normconf::emulation {

constexpr std::size_t kStackBytes = 64 * 1024;
constexpr int kMaxThreads = 1024;

enum class Wait { kRunning, kSync, kShuffle, kDone };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  Index thread;
  Wait wait = Wait::kRunning;
  unsigned shuffles = 0;  // shuffles done: the parity picks the exchange buffer
};

// The state of the running launch (one at a time: `launch` holds `mutex`).
struct Launch {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  Fiber* running = nullptr;
  std::function<void()> body;
  float exchange[2][kMaxThreads] = {};
};

inline std::mutex mutex;
inline Launch* active = nullptr;
inline std::string first_error;

inline void record_error(const std::string& message) {
  if (first_error.empty()) first_error = message;
}

// The first problem recorded since the last call, or "" (and clears it).
inline std::string take_error() {
  std::string message;
  message.swap(first_error);
  return message;
}

inline void check_aligned(const void* p, std::size_t bytes) {
  if (reinterpret_cast<std::uintptr_t>(p) % bytes != 0) {
    record_error("misaligned " + std::to_string(bytes) + "-byte pack at address " +
                 std::to_string(reinterpret_cast<std::uintptr_t>(p)));
  }
}

inline unsigned linear_thread() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

// Suspends the running fiber until the next round.
inline void yield(Wait wait) {
  Fiber* fiber = active->running;
  fiber->wait = wait;
  swapcontext(&fiber->context, &active->scheduler);
}

inline void fiber_main() {
  active->body();
  active->running->wait = Wait::kDone;  // returning resumes the scheduler (uc_link)
}

// After a round: every thread is done or waiting. Empty when that state is consistent.
inline std::string divergence(const std::vector<Fiber>& fibers) {
  int syncing = 0;
  for (const Fiber& f : fibers) syncing += f.wait == Wait::kSync;
  if (syncing != 0 && syncing != static_cast<int>(fibers.size())) {
    return "__syncthreads() reached by " + std::to_string(syncing) + " of " +
           std::to_string(fibers.size()) + " threads";
  }
  for (std::size_t warp = 0; warp * 32 < fibers.size(); ++warp) {
    int shuffling = 0;
    for (std::size_t t = warp * 32; t < fibers.size() && t < warp * 32 + 32; ++t) {
      shuffling += fibers[t].wait == Wait::kShuffle;
    }
    if (shuffling != 0 && shuffling != 32) {
      return "__shfl_xor_sync() reached by " + std::to_string(shuffling) + " of 32 lanes of warp " +
             std::to_string(warp);
    }
  }
  return "";
}

// Runs one block to completion; false when its threads diverged around a barrier.
inline bool run_block(Launch& launch) {
  for (Fiber& f : launch.fibers) {
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &launch.scheduler;
    makecontext(&f.context, fiber_main, 0);
    f.wait = Wait::kRunning;
    f.shuffles = 0;
  }
  for (;;) {
    bool all_done = true;
    for (Fiber& f : launch.fibers) {
      if (f.wait == Wait::kDone) continue;
      threadIdx = f.thread;
      launch.running = &f;
      swapcontext(&launch.scheduler, &f.context);
      all_done = all_done && f.wait == Wait::kDone;
    }
    if (all_done) return true;
    const std::string problem = divergence(launch.fibers);
    if (!problem.empty()) {
      record_error("block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) +
                   "): " + problem);
      return false;
    }
  }
}

// Runs `body` (the kernel call) for every thread of every block of the grid.
template <class Body>
void launch(dim3 grid, dim3 block, const Body& body) {
  const std::lock_guard<std::mutex> lock(mutex);
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads % 32 != 0 || threads > kMaxThreads) {
    record_error("block of " + std::to_string(threads) + " threads");
    return;
  }
  auto state = std::make_unique<Launch>();
  state->body = body;
  state->fibers.resize(threads);
  for (int t = 0; t < threads; ++t) {
    const unsigned id = static_cast<unsigned>(t);
    state->fibers[t].stack = std::make_unique<char[]>(kStackBytes);
    state->fibers[t].thread = {id % block.x, id / block.x % block.y, id / (block.x * block.y)};
  }
  active = state.get();
  blockDim = {block.x, block.y, block.z};
  gridDim = {grid.x, grid.y, grid.z};
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        if (!run_block(*state)) {
          active = nullptr;
          return;
        }
      }
    }
  }
  active = nullptr;
}

}  // namespace normconf::emulation

inline void __syncthreads() { normconf::emulation::yield(normconf::emulation::Wait::kSync); }

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  using namespace normconf::emulation;
  if (mask != 0xffffffffu) record_error("__shfl_xor_sync with a partial mask");
  const unsigned thread = linear_thread();
  const unsigned parity = active->running->shuffles++ % 2;
  active->exchange[parity][thread] = value;
  yield(Wait::kShuffle);  // every lane of the warp has written its value when this returns
  const unsigned partner = thread / 32 * 32 + (thread % 32 ^ static_cast<unsigned>(lane_mask) % 32);
  return active->exchange[parity][partner];
}
