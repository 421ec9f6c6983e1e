// Device helpers shared by the normconf CUDA kernels: element conversion, 16-byte packs,
// deterministic warp and block sums, and the two ways of mapping rows onto threads.
//
// Every sum here is a fixed tree: the same inputs give bitwise the same result on every run,
// and every thread that takes part in a sum ends with the same value (IEEE addition is
// commutative, so the two partners of each butterfly step compute identical sums).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "launch.h"

// NORMCONF_LAUNCH(kernel, grid, block, stream, args...) launches `kernel` (a pointer to a
// __global__ function) with no dynamic shared memory; NORMCONF_LAST_ERROR() is the launch status.
// Under NORMCONF_EMULATION (tests without a GPU, see emulation.h) both run on the CPU instead,
// and NORMCONF_CHECK_PACK records misaligned 16-byte packs.
#ifdef NORMCONF_EMULATION
#include "emulation.h"
#define NORMCONF_LAUNCH(kernel, grid, block, stream, ...) \
  ((void)(stream), ::normconf::emulation::launch(grid, block, [=] { kernel(__VA_ARGS__); }))
#define NORMCONF_LAST_ERROR() cudaSuccess
#define NORMCONF_CHECK_PACK(p, bytes) ::normconf::emulation::check_aligned(p, bytes)
#else
#define NORMCONF_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#define NORMCONF_LAST_ERROR() cudaGetLastError()
#define NORMCONF_CHECK_PACK(p, bytes) ((void)0)
#endif

namespace normconf {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- element <-> fp32 ------------------------------------------------------------------------
// Loads widen exactly; stores round to nearest even (subnormals kept: built without -ftz).

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- packs of VEC consecutive elements ---------------------------------------------------------
// Pack<T, 16 / sizeof(T)> is one 16-byte load or store (ld.global.v4 / st.global.v4); VEC = 1 is
// the scalar fallback. The caller guarantees that `p` is aligned to sizeof(T) * VEC bytes.

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* __restrict__ p, float (&out)[VEC]) {
  NORMCONF_CHECK_PACK(p, sizeof(Pack<T, VEC>));
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_float(pack.v[k]);
}

// `fill` for every element when `p` is null (an absent weight or bias).
template <typename T, int VEC>
__device__ __forceinline__ void load_or(const T* __restrict__ p, float fill, float (&out)[VEC]) {
  if (p != nullptr) {
    load<T, VEC>(p, out);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = fill;
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* __restrict__ p, const float (&in)[VEC]) {
  NORMCONF_CHECK_PACK(p, sizeof(Pack<T, VEC>));
  Pack<T, VEC> pack;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pack.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

// ---- sums ------------------------------------------------------------------------------------

// Pairwise sum of a thread's VEC accumulators (a tree of depth log2 VEC); destroys `a`.
template <int VEC>
__device__ __forceinline__ float tree_total(float (&a)[VEC]) {
#pragma unroll
  for (int width = VEC / 2; width > 0; width /= 2) {
#pragma unroll
    for (int k = 0; k < width; ++k) a[k] += a[k + width];
  }
  return a[0];
}

// Butterfly all-reduce over the 32 lanes of a warp: every lane ends with the same K sums.
// All 32 lanes must call it.
template <int K>
__device__ __forceinline__ void warp_sum(float (&v)[K]) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(kFullMask, v[k], offset);
  }
}

// All-reduce over a 1-D block whose size is a multiple of 32 (at most 1024): warp sums, then
// every warp sums the per-warp partials with the same butterfly, so all threads agree without
// a broadcast. `scratch` is shared memory; it is free again when this returns. Every thread of
// the block must call it.
template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K], float (&scratch)[K][kWarp]) {
  warp_sum(v);
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) scratch[k][warp] = v[k];
  }
  __syncthreads();
  const int warps = blockDim.x / kWarp;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = lane < warps ? scratch[k][lane] : 0.0f;
  warp_sum(v);
  __syncthreads();  // the next sum may overwrite `scratch`
}

// ---- rows onto threads -----------------------------------------------------------------------
// A row group is the set of threads that share one row: `lane()` in [0, width()) is a thread's
// place in it. Rows are visited first_row(), first_row() + row_step(), ... (a grid-stride loop),
// so any grid size covers any number of rows; a row group's threads always agree on the row.

// One row per warp, kWarps warps (rows in flight) per block of kThreads threads: for narrow
// rows, where a block-wide sum would cost more than the row's loads.
struct WarpPerRow {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarp;
  static constexpr int kMaxThreads = kThreads;  // for __launch_bounds__

  __device__ static int lane() { return threadIdx.x % kWarp; }
  __device__ static int width() { return kWarp; }
  __device__ static int64_t first_row() {
    return static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  }
  __device__ static int64_t row_step() { return static_cast<int64_t>(gridDim.x) * kWarps; }

  template <int K>
  __device__ static void sum(float (&v)[K], float (&)[K][kWarp]) {
    warp_sum(v);
  }
};

// One row per block of blockDim.x threads (a multiple of 32): for wide rows.
struct BlockPerRow {
  static constexpr int kMaxThreads = 1024;  // for __launch_bounds__
  __device__ static int lane() { return threadIdx.x; }
  __device__ static int width() { return blockDim.x; }
  __device__ static int64_t first_row() { return blockIdx.x; }
  __device__ static int64_t row_step() { return gridDim.x; }

  template <int K>
  __device__ static void sum(float (&v)[K], float (&scratch)[K][kWarp]) {
    block_sum(v, scratch);
  }
};

// ---- host-side launch helpers ----------------------------------------------------------------

// Rows up to this width get one warp each; wider rows get a block each.
constexpr int kWarpRowMaxN = 1024;
// Upper bound on the grid of the row kernels (rows beyond it are reached by the grid-stride
// loop); far below gridDim.x's limit.
constexpr int64_t kMaxRowBlocks = int64_t{1} << 20;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads per block for one row per block: 128 to 1024, about 16 elements per thread.
inline int block_threads(int n) {
  int threads = 128;
  while (threads < 1024 && threads * 16 < n) threads *= 2;
  return threads;
}

inline bool aligned16(const void* p) {
  return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

// Whether 16-byte packs of `vec` elements can serve every row: n and every row stride are
// multiples of `vec` and every base pointer is 16-byte aligned (null pointers are ignored).
inline bool can_vectorize(int n, int vec, std::initializer_list<int64_t> strides,
                          std::initializer_list<const void*> pointers) {
  if (n % vec != 0) return false;
  for (int64_t stride : strides) {
    if (stride % vec != 0) return false;
  }
  for (const void* p : pointers) {
    if (!aligned16(p)) return false;
  }
  return true;
}

// Calls Run<T, CENTER>::go(args, stream) for the element type and centring that `args` names
// (args.dtype, args.center).
template <template <typename, bool> class Run, class Args>
void dispatch(const Args& a, cudaStream_t stream) {
  switch (a.dtype) {
    case Dtype::kFloat32:
      a.center ? Run<float, true>::go(a, stream) : Run<float, false>::go(a, stream);
      break;
    case Dtype::kFloat16:
      a.center ? Run<__half, true>::go(a, stream) : Run<__half, false>::go(a, stream);
      break;
    case Dtype::kBFloat16:
      a.center ? Run<__nv_bfloat16, true>::go(a, stream)
               : Run<__nv_bfloat16, false>::go(a, stream);
      break;
  }
}

}  // namespace normconf
