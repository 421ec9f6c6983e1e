// The launchers of the normconf CUDA kernels: plain C++ (no torch), called by binding.cpp.
//
// Layout shared by every launcher: a matrix of `rows` rows of `n` elements, the trailing
// normalized dims flattened. Inputs may have any row stride (elements between the starts of
// consecutive rows) but unit stride along a row; outputs are dense ([rows, n], row stride n).
// Pointers are device pointers of `dtype` elements unless typed `float`; statistics are fp32.
// Each launcher enqueues its kernels on `stream` and returns cudaGetLastError().
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace normconf {

enum class Dtype { kFloat32, kFloat16, kBFloat16 };

// LayerNorm (center = true) or RMSNorm (center = false) forward.
struct ForwardArgs {
  Dtype dtype;
  bool center;
  const void* x;         // input rows: row r starts at x + r * x_stride
  int64_t x_stride;      // elements between consecutive input rows
  const void* weight;    // [n] or nullptr (w = 1)
  const void* bias;      // [n] or nullptr (b = 0); LayerNorm only
  void* y;               // output [rows, n]
  float* mean;           // [rows] the mean (LayerNorm), or nullptr
  float* centre;         // [rows] mean - x[r, 0], saved for backward (LayerNorm), or nullptr
  float* rstd;           // [rows] 1 / sqrt(var + eps)
  int64_t rows;
  int n;
  float eps;
};

cudaError_t norm_forward(const ForwardArgs& args, cudaStream_t stream);

// Input gradient: dx = r * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w (RMSNorm: without
// the mean(g) term), from the statistics the forward pass saved.
struct InputGradArgs {
  Dtype dtype;
  bool center;
  const void* dy;        // upstream gradient rows: row r starts at dy + r * dy_stride
  int64_t dy_stride;
  const void* x;         // the forward input rows
  int64_t x_stride;
  const void* weight;    // [n] or nullptr
  const float* centre;   // [rows] from the forward pass (LayerNorm), or nullptr
  const float* rstd;     // [rows] from the forward pass
  void* dx;              // output [rows, n]
  int64_t rows;
  int n;
};

cudaError_t norm_backward_input(const InputGradArgs& args, cudaStream_t stream);

// How the rows are cut into chunks for the weight and bias gradients: one fp32 partial sum per
// chunk and column, then a fixed-order sum over the chunks. Depends on rows and n only.
struct ParamGradPlan {
  int64_t chunks;          // partial rows of the workspace (0 when rows == 0)
  int64_t rows_per_chunk;
};

ParamGradPlan plan_param_grad(int64_t rows, int n);

// Weight gradient dw = sum over rows of dy * xhat, bias gradient db = sum over rows of dy.
struct ParamGradArgs {
  Dtype dtype;
  bool center;
  const void* dy;        // upstream gradient rows, row stride dy_stride
  int64_t dy_stride;
  const void* x;         // the forward input rows, row stride x_stride
  int64_t x_stride;
  const float* centre;   // [rows] (LayerNorm) or nullptr
  const float* rstd;     // [rows]
  float* dw_partial;     // workspace [plan.chunks, n], or nullptr when dw is not wanted
  float* db_partial;     // workspace [plan.chunks, n], or nullptr when db is not wanted
  void* dw;              // output [n] in dtype, or nullptr
  void* db;              // output [n] in dtype, or nullptr
  int64_t rows;          // at least 1
  int n;
  ParamGradPlan plan;
};

cudaError_t param_grad(const ParamGradArgs& args, cudaStream_t stream);

}  // namespace normconf
