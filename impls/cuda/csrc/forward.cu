// LayerNorm and RMSNorm forward: one kernel, templated on the element type, the pack width,
// the row-to-thread mapping and whether the row is centred (LayerNorm) or not (RMSNorm).
#include <algorithm>

#include "common.cuh"
#include "launch.h"

namespace normconf {
namespace {

// Normalizes each row of x (fp32 accumulation, tree sums):
//
//   LayerNorm (CENTER): s = x[0]; d_i = x_i - s; c = sum(d) / n; mean = s + c;
//                       var = sum((d_i - c)^2) / n; r = 1 / sqrt(var + eps);
//                       y_i = (d_i - c) * r * w_i + b_i
//   RMSNorm:            r = 1 / sqrt(sum(x_i^2) / n + eps); y_i = x_i * r * w_i
//
// Two passes over the row for the statistics (the mean, then the spread about it), a third for
// the output; the passes re-read the row from global memory (it is still in L1/L2). The shift
// by s = x[0] makes d_i exact whenever x_i is within a factor of 2 of x[0] (Sterbenz), which is
// the case for rows whose mean is large against their spread: the sums then see the spread,
// not the mean, and d_i - c is accurate to about u * spread.
//
// Launch: Rows = WarpPerRow: blockDim.x = WarpPerRow::kThreads, one row per warp;
//         Rows = BlockPerRow: blockDim.x = block_threads(n), one row per block;
//         any gridDim.x (grid-stride over rows). Static shared memory: 128 bytes.
// VEC: elements per load; 16 / sizeof(T) needs n, x_stride multiples of VEC and x, weight, bias,
//      y 16-byte aligned; 1 is the scalar fallback.
template <typename T, int VEC, class Rows, bool CENTER>
__global__ void __launch_bounds__(Rows::kMaxThreads)
    norm_forward_kernel(const T* __restrict__ x,       // input rows, row r at x + r * x_stride
                        int64_t x_stride,              // elements between input rows
                        const T* __restrict__ weight,  // [n] or nullptr
                        const T* __restrict__ bias,    // [n] or nullptr (RMSNorm: nullptr)
                        T* __restrict__ y,             // output [rows, n], dense
                        float* __restrict__ mean,      // [rows] (LayerNorm) or unused
                        float* __restrict__ centre,    // [rows] mean - s (LayerNorm) or unused
                        float* __restrict__ rstd,      // [rows]
                        int64_t rows, int n, float eps) {
  __shared__ float scratch[1][kWarp];
  const int first = Rows::lane() * VEC;
  const int step = Rows::width() * VEC;
  const float count = static_cast<float>(n);
  for (int64_t row = Rows::first_row(); row < rows; row += Rows::row_step()) {
    const T* __restrict__ xr = x + row * x_stride;

    float shift = 0.0f;
    float c = 0.0f;
    if constexpr (CENTER) {
      shift = to_float(xr[0]);
      float acc[VEC] = {};
      for (int col = first; col < n; col += step) {
        float v[VEC];
        load<T, VEC>(xr + col, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += v[k] - shift;
      }
      float total[1] = {tree_total(acc)};
      Rows::sum(total, scratch);
      c = total[0] / count;
    }

    float acc[VEC] = {};
    for (int col = first; col < n; col += step) {
      float v[VEC];
      load<T, VEC>(xr + col, v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float d = CENTER ? (v[k] - shift) - c : v[k];
        acc[k] += d * d;
      }
    }
    float total[1] = {tree_total(acc)};
    Rows::sum(total, scratch);
    const float r = 1.0f / sqrtf(total[0] / count + eps);

    if (Rows::lane() == 0) {
      rstd[row] = r;
      if constexpr (CENTER) {
        centre[row] = c;
        mean[row] = shift + c;
      }
    }

    T* __restrict__ yr = y + row * static_cast<int64_t>(n);
    for (int col = first; col < n; col += step) {
      float v[VEC], w[VEC], out[VEC];
      load<T, VEC>(xr + col, v);
      load_or<T, VEC>(weight == nullptr ? nullptr : weight + col, 1.0f, w);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float d = CENTER ? (v[k] - shift) - c : v[k];
        out[k] = d * r * w[k];
      }
      if (bias != nullptr) {  // no "+ 0" without a bias: it would turn -0 into +0
        float b[VEC];
        load<T, VEC>(bias + col, b);
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] += b[k];
      }
      store<T, VEC>(yr + col, out);
    }
  }
}

template <typename T, int VEC, class Rows, bool CENTER>
void launch_forward(const ForwardArgs& a, int blocks, int threads, cudaStream_t stream) {
  const auto kernel = &norm_forward_kernel<T, VEC, Rows, CENTER>;
  NORMCONF_LAUNCH(kernel, blocks, threads, stream, static_cast<const T*>(a.x), a.x_stride,
                  static_cast<const T*>(a.weight), static_cast<const T*>(a.bias),
                  static_cast<T*>(a.y), a.mean, a.centre, a.rstd, a.rows, a.n, a.eps);
}

// Picks the row mapping (by n) and the pack width (by alignment), then launches.
template <typename T, bool CENTER>
void forward_typed(const ForwardArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorized =
      can_vectorize(a.n, kVec, {a.x_stride}, {a.x, a.weight, a.bias, a.y});
  if (a.n <= kWarpRowMaxN) {
    const int blocks =
        static_cast<int>(std::min(ceil_div(a.rows, WarpPerRow::kWarps), kMaxRowBlocks));
    const int threads = WarpPerRow::kThreads;
    if (vectorized) {
      launch_forward<T, kVec, WarpPerRow, CENTER>(a, blocks, threads, stream);
    } else {
      launch_forward<T, 1, WarpPerRow, CENTER>(a, blocks, threads, stream);
    }
  } else {
    const int blocks = static_cast<int>(std::min(a.rows, kMaxRowBlocks));
    const int threads = block_threads(a.n);
    if (vectorized) {
      launch_forward<T, kVec, BlockPerRow, CENTER>(a, blocks, threads, stream);
    } else {
      launch_forward<T, 1, BlockPerRow, CENTER>(a, blocks, threads, stream);
    }
  }
}

template <typename T, bool CENTER>
struct Forward {
  static void go(const ForwardArgs& a, cudaStream_t s) { forward_typed<T, CENTER>(a, s); }
};

}  // namespace

cudaError_t norm_forward(const ForwardArgs& args, cudaStream_t stream) {
  if (args.rows == 0 || args.n == 0) return cudaSuccess;
  dispatch<Forward>(args, stream);
  return NORMCONF_LAST_ERROR();
}

}  // namespace normconf
