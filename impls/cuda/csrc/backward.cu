// LayerNorm and RMSNorm backward: the input gradient per row, and the weight and bias
// gradients as fp32 partial sums over chunks of rows, summed over the chunks in a fixed order
// by a second kernel. No atomics: the same inputs give bitwise the same gradients.
#include <algorithm>

#include "common.cuh"
#include "launch.h"

namespace normconf {
namespace {

// Input gradient of each row, from the saved statistics (fp32, tree sums):
//
//   xhat_i = (x_i - s - c) * r   (LayerNorm: s = x[0], c = centre[row]; RMSNorm: x_i * r)
//   g_i = dy_i * w_i
//   LayerNorm: dx_i = r * (g_i - sum(g) / n - xhat_i * sum(g * xhat) / n)
//   RMSNorm:   dx_i = r * (g_i - xhat_i * sum(g * xhat) / n)
//
// One pass for the two sums, a second (re-reading x, dy and w) for dx.
// Launch: as norm_forward_kernel (WarpPerRow: kThreads per block; BlockPerRow: block_threads(n)
// per block; any grid). Static shared memory: 256 bytes.
// VEC: 16 / sizeof(T) needs n and both row strides multiples of VEC and dy, x, weight, dx
// 16-byte aligned; 1 is the scalar fallback.
template <typename T, int VEC, class Rows, bool CENTER>
__global__ void __launch_bounds__(Rows::kMaxThreads)
    norm_backward_input_kernel(const T* __restrict__ dy,     // rows, row r at dy + r * dy_stride
                               int64_t dy_stride,            // elements between rows of dy
                               const T* __restrict__ x,      // rows, row r at x + r * x_stride
                               int64_t x_stride,             // elements between rows of x
                               const T* __restrict__ weight,   // [n] or nullptr
                               const float* __restrict__ centre,  // [rows] or unused (RMSNorm)
                               const float* __restrict__ rstd,    // [rows]
                               T* __restrict__ dx,           // output [rows, n], dense
                               int64_t rows, int n) {
  __shared__ float scratch[2][kWarp];
  const int first = Rows::lane() * VEC;
  const int step = Rows::width() * VEC;
  const float count = static_cast<float>(n);
  for (int64_t row = Rows::first_row(); row < rows; row += Rows::row_step()) {
    const T* __restrict__ xr = x + row * x_stride;
    const T* __restrict__ dyr = dy + row * dy_stride;
    const float shift = CENTER ? to_float(xr[0]) : 0.0f;
    const float c = CENTER ? centre[row] : 0.0f;
    const float r = rstd[row];

    float sum_g[VEC] = {};
    float sum_gx[VEC] = {};
    for (int col = first; col < n; col += step) {
      float v[VEC], d[VEC], w[VEC];
      load<T, VEC>(xr + col, v);
      load<T, VEC>(dyr + col, d);
      load_or<T, VEC>(weight == nullptr ? nullptr : weight + col, 1.0f, w);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xhat = (CENTER ? (v[k] - shift) - c : v[k]) * r;
        const float g = d[k] * w[k];
        sum_g[k] += g;
        sum_gx[k] += g * xhat;
      }
    }
    float sums[2] = {tree_total(sum_g), tree_total(sum_gx)};
    Rows::sum(sums, scratch);
    const float mean_g = CENTER ? sums[0] / count : 0.0f;
    const float mean_gx = sums[1] / count;

    T* __restrict__ dxr = dx + row * static_cast<int64_t>(n);
    for (int col = first; col < n; col += step) {
      float v[VEC], d[VEC], w[VEC], out[VEC];
      load<T, VEC>(xr + col, v);
      load<T, VEC>(dyr + col, d);
      load_or<T, VEC>(weight == nullptr ? nullptr : weight + col, 1.0f, w);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xhat = (CENTER ? (v[k] - shift) - c : v[k]) * r;
        const float g = d[k] * w[k];
        out[k] = r * ((g - mean_g) - xhat * mean_gx);
      }
      store<T, VEC>(dxr + col, out);
    }
  }
}

// Rows of a chunk per thread row of the partial-sum kernel, and its block shape.
constexpr int kPartialThreadsY = 8;   // blockDim.y: threads that split a chunk's rows
constexpr int kPartialMinRows = 32;   // at least 4 rows per thread before adding chunks
constexpr int64_t kPartialTargetBlocks = 2048;
constexpr int64_t kPartialMaxChunks = 512;
constexpr int kFinishThreadsY = 32;   // blockDim.y of the finishing kernel

// Per chunk of rows, per column j: dw_partial[chunk, j] = sum over the chunk's rows of
// dy[row, j] * xhat[row, j] and db_partial[chunk, j] = sum of dy[row, j] (fp32).
//
// Launch: blockDim = (32, kPartialThreadsY); gridDim.x = ceil(n / (32 * VEC)) column tiles,
// gridDim.y = plan.chunks. Thread (tx, ty) owns columns [col, col + VEC) of its tile and sums
// rows chunk_begin + ty, + kPartialThreadsY, ... in order; the kPartialThreadsY partial sums
// are then added as a tree in static shared memory (2 * 8 * 32 * VEC floats: 8 KiB for fp32,
// 16 KiB for 16-bit types) and thread row 0 writes the chunk's partials.
// VEC: 16 / sizeof(T) needs n and both row strides multiples of VEC and dy, x 16-byte aligned.
// The summation order of a column does not depend on VEC.
template <typename T, int VEC, bool CENTER>
__global__ void __launch_bounds__(kWarp * kPartialThreadsY)
    param_grad_partials_kernel(const T* __restrict__ dy,  // rows, row r at dy + r * dy_stride
                               int64_t dy_stride,
                               const T* __restrict__ x,   // rows, row r at x + r * x_stride
                               int64_t x_stride,
                               const float* __restrict__ centre,  // [rows] or unused (RMSNorm)
                               const float* __restrict__ rstd,    // [rows]
                               float* __restrict__ dw_partial,    // [chunks, n] or nullptr
                               float* __restrict__ db_partial,    // [chunks, n] or nullptr
                               int64_t rows, int n, int64_t rows_per_chunk) {
  constexpr int kCols = kWarp * VEC;
  __shared__ float tile_w[kPartialThreadsY][kCols];
  __shared__ float tile_b[kPartialThreadsY][kCols];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int col = blockIdx.x * kCols + tx * VEC;
  const int64_t chunk = blockIdx.y;
  const int64_t begin = chunk * rows_per_chunk;
  const int64_t end = begin + rows_per_chunk < rows ? begin + rows_per_chunk : rows;

  float acc_w[VEC] = {};
  float acc_b[VEC] = {};
  if (col < n) {
    for (int64_t row = begin + ty; row < end; row += kPartialThreadsY) {
      const T* __restrict__ xr = x + row * x_stride;
      const float shift = CENTER ? to_float(xr[0]) : 0.0f;
      const float c = CENTER ? centre[row] : 0.0f;
      const float r = rstd[row];
      float v[VEC], d[VEC];
      load<T, VEC>(xr + col, v);
      load<T, VEC>(dy + row * dy_stride + col, d);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xhat = (CENTER ? (v[k] - shift) - c : v[k]) * r;
        acc_w[k] += d[k] * xhat;
        acc_b[k] += d[k];
      }
    }
  }

  // Column col + k of the thread sits at [k * 32 + tx]: consecutive lanes, consecutive banks.
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    tile_w[ty][k * kWarp + tx] = acc_w[k];
    tile_b[ty][k * kWarp + tx] = acc_b[k];
  }
  __syncthreads();
#pragma unroll
  for (int half = kPartialThreadsY / 2; half > 0; half /= 2) {
    if (ty < half) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        tile_w[ty][k * kWarp + tx] += tile_w[ty + half][k * kWarp + tx];
        tile_b[ty][k * kWarp + tx] += tile_b[ty + half][k * kWarp + tx];
      }
    }
    __syncthreads();
  }

  if (ty == 0 && col < n) {
    const int64_t out = chunk * n + col;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (dw_partial != nullptr) dw_partial[out + k] = tile_w[0][k * kWarp + tx];
      if (db_partial != nullptr) db_partial[out + k] = tile_b[0][k * kWarp + tx];
    }
  }
}

// out[j] = sum over chunks of partial[chunk, j], rounded once into T.
//
// Launch: blockDim = (32, kFinishThreadsY), gridDim.x = ceil(n / 32). Thread (tx, ty) sums
// chunks ty, ty + kFinishThreadsY, ... of column blockIdx.x * 32 + tx in order; the
// kFinishThreadsY partial sums are added as a tree in static shared memory (4 KiB).
template <typename T>
__global__ void __launch_bounds__(kWarp * kFinishThreadsY)
    param_grad_finish_kernel(const float* __restrict__ partial,  // [chunks, n]
                             int64_t chunks, int n,
                             T* __restrict__ out) {             // [n]
  __shared__ float tile[kFinishThreadsY][kWarp];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int col = blockIdx.x * kWarp + tx;
  float acc = 0.0f;
  if (col < n) {
    for (int64_t chunk = ty; chunk < chunks; chunk += kFinishThreadsY) {
      acc += partial[chunk * n + col];
    }
  }
  tile[ty][tx] = acc;
  __syncthreads();
#pragma unroll
  for (int half = kFinishThreadsY / 2; half > 0; half /= 2) {
    if (ty < half) tile[ty][tx] += tile[ty + half][tx];
    __syncthreads();
  }
  if (ty == 0 && col < n) out[col] = from_float<T>(tile[0][tx]);
}

// ---- launchers -------------------------------------------------------------------------------

template <typename T, int VEC, class Rows, bool CENTER>
void launch_input_grad(const InputGradArgs& a, int blocks, int threads, cudaStream_t stream) {
  const auto kernel = &norm_backward_input_kernel<T, VEC, Rows, CENTER>;
  NORMCONF_LAUNCH(kernel, blocks, threads, stream, static_cast<const T*>(a.dy), a.dy_stride,
                  static_cast<const T*>(a.x), a.x_stride, static_cast<const T*>(a.weight),
                  a.centre, a.rstd, static_cast<T*>(a.dx), a.rows, a.n);
}

template <typename T, bool CENTER>
void input_grad_typed(const InputGradArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorized =
      can_vectorize(a.n, kVec, {a.dy_stride, a.x_stride}, {a.dy, a.x, a.weight, a.dx});
  if (a.n <= kWarpRowMaxN) {
    const int blocks =
        static_cast<int>(std::min(ceil_div(a.rows, WarpPerRow::kWarps), kMaxRowBlocks));
    const int threads = WarpPerRow::kThreads;
    if (vectorized) {
      launch_input_grad<T, kVec, WarpPerRow, CENTER>(a, blocks, threads, stream);
    } else {
      launch_input_grad<T, 1, WarpPerRow, CENTER>(a, blocks, threads, stream);
    }
  } else {
    const int blocks = static_cast<int>(std::min(a.rows, kMaxRowBlocks));
    const int threads = block_threads(a.n);
    if (vectorized) {
      launch_input_grad<T, kVec, BlockPerRow, CENTER>(a, blocks, threads, stream);
    } else {
      launch_input_grad<T, 1, BlockPerRow, CENTER>(a, blocks, threads, stream);
    }
  }
}

template <typename T, int VEC, bool CENTER>
void launch_partials(const ParamGradArgs& a, cudaStream_t stream) {
  const dim3 block(kWarp, kPartialThreadsY);
  const dim3 grid(static_cast<unsigned>(ceil_div(a.n, kWarp * VEC)),
                  static_cast<unsigned>(a.plan.chunks));
  const auto kernel = &param_grad_partials_kernel<T, VEC, CENTER>;
  NORMCONF_LAUNCH(kernel, grid, block, stream, static_cast<const T*>(a.dy), a.dy_stride,
                  static_cast<const T*>(a.x), a.x_stride, a.centre, a.rstd, a.dw_partial,
                  a.db_partial, a.rows, a.n, a.plan.rows_per_chunk);
}

template <typename T>
void launch_finish(const float* partial, const ParamGradArgs& a, void* out,
                   cudaStream_t stream) {
  const dim3 block(kWarp, kFinishThreadsY);
  const dim3 grid(static_cast<unsigned>(ceil_div(a.n, kWarp)));
  const auto kernel = &param_grad_finish_kernel<T>;
  NORMCONF_LAUNCH(kernel, grid, block, stream, partial, a.plan.chunks, a.n, static_cast<T*>(out));
}

template <typename T, bool CENTER>
void param_grad_typed(const ParamGradArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (can_vectorize(a.n, kVec, {a.dy_stride, a.x_stride}, {a.dy, a.x})) {
    launch_partials<T, kVec, CENTER>(a, stream);
  } else {
    launch_partials<T, 1, CENTER>(a, stream);
  }
  if (a.dw != nullptr) launch_finish<T>(a.dw_partial, a, a.dw, stream);
  if (a.db != nullptr) launch_finish<T>(a.db_partial, a, a.db, stream);
}

template <typename T, bool CENTER>
struct InputGrad {
  static void go(const InputGradArgs& a, cudaStream_t s) { input_grad_typed<T, CENTER>(a, s); }
};

template <typename T, bool CENTER>
struct ParamGrad {
  static void go(const ParamGradArgs& a, cudaStream_t s) { param_grad_typed<T, CENTER>(a, s); }
};

}  // namespace

cudaError_t norm_backward_input(const InputGradArgs& args, cudaStream_t stream) {
  if (args.rows == 0 || args.n == 0) return cudaSuccess;
  dispatch<InputGrad>(args, stream);
  return NORMCONF_LAST_ERROR();
}

ParamGradPlan plan_param_grad(int64_t rows, int n) {
  if (rows <= 0) return {0, 0};
  // Enough chunks to fill the device alongside the column tiles, at least kPartialMinRows rows
  // per chunk, at most kPartialMaxChunks chunks; a function of rows and n only, so the
  // summation order (and the result) is the same on every device.
  const int64_t tiles = std::max<int64_t>(1, ceil_div(n, kWarp * 4));
  int64_t chunks = std::max<int64_t>(1, kPartialTargetBlocks / tiles);
  chunks = std::min({chunks, kPartialMaxChunks, ceil_div(rows, kPartialMinRows)});
  const int64_t rows_per_chunk = ceil_div(rows, chunks);
  return {ceil_div(rows, rows_per_chunk), rows_per_chunk};
}

cudaError_t param_grad(const ParamGradArgs& args, cudaStream_t stream) {
  if (args.rows == 0 || args.n == 0 || args.plan.chunks == 0) return cudaSuccess;
  dispatch<ParamGrad>(args, stream);
  return NORMCONF_LAST_ERROR();
}

}  // namespace normconf
