// Torch operators for the normconf CUDA kernels: torch.ops.normconf_cuda.forward and
// torch.ops.normconf_cuda.backward, registered for the CUDA dispatch key. They check their
// arguments, allocate outputs and workspace with torch's allocator, and launch on the current
// stream of the input's device. Autograd lives in Python (impls/cuda/__init__.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "launch.h"

namespace normconf {
namespace {

// Widest row the kernels index with 32-bit column offsets (with room for a block's stride).
constexpr int64_t kMaxN = std::numeric_limits<int32_t>::max() / 2;

Dtype dtype_of(const at::Tensor& t) {
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16,
              "normconf_cuda: expected float32, float16 or bfloat16, got ", type);
  if (type == at::kHalf) return Dtype::kFloat16;
  if (type == at::kBFloat16) return Dtype::kBFloat16;
  return Dtype::kFloat32;
}

// A [rows, n] CUDA matrix with unit stride along each row.
void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "normconf_cuda: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 2, "normconf_cuda: ", name, " must be 2-D [rows, n], got ", t.dim(),
              "-D");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "normconf_cuda: ", name,
              " must have unit stride along its rows");
  TORCH_CHECK(t.size(1) <= kMaxN, "normconf_cuda: rows of ", t.size(1),
              " elements are too wide (at most ", kMaxN, ")");
}

// Row stride in elements; any value serves a single row, n keeps it a multiple of the pack.
int64_t row_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A weight or bias: [n], contiguous, on x's device, of x's dtype.
void check_param(const std::optional<at::Tensor>& p, const at::Tensor& x, const char* name) {
  if (!present(p)) return;
  TORCH_CHECK(p->device() == x.device(), "normconf_cuda: ", name, " is on ", p->device(),
              ", the input on ", x.device());
  TORCH_CHECK(p->scalar_type() == x.scalar_type(), "normconf_cuda: ", name, " is ",
              p->scalar_type(), ", the input ", x.scalar_type());
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(1) && p->is_contiguous(), "normconf_cuda: ",
              name, " must be a contiguous vector of ", x.size(1), " elements");
}

// A per-row fp32 statistic: [rows], contiguous, on x's device.
void check_stat(const at::Tensor& s, const at::Tensor& x, const char* name) {
  TORCH_CHECK(s.device() == x.device() && s.scalar_type() == at::kFloat && s.dim() == 1 &&
                  s.size(0) == x.size(0) && s.is_contiguous(),
              "normconf_cuda: ", name, " must be a contiguous float32 vector of ", x.size(0),
              " elements on ", x.device());
}

const void* data_or_null(const std::optional<at::Tensor>& t) {
  return present(t) ? t->const_data_ptr() : nullptr;
}

// (y, mean, centre, rstd): y like x but dense; mean, centre, rstd fp32 [rows]; mean and centre
// are empty for RMSNorm (center = false). centre = mean - x[:, 0] is what backward needs.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_op(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool center) {
  check_rows(x, "input");
  check_param(weight, x, "weight");
  check_param(bias, x, "bias");
  TORCH_CHECK(center || !present(bias), "normconf_cuda: RMSNorm takes no bias");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  const int64_t n = x.size(1);
  const auto stats = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty({rows, n}, x.options());
  at::Tensor rstd = at::empty({rows}, stats);
  at::Tensor mean = at::empty({center ? rows : 0}, stats);
  at::Tensor centre = at::empty({center ? rows : 0}, stats);
  ForwardArgs args{};
  args.dtype = dtype_of(x);
  args.center = center;
  args.x = x.const_data_ptr();
  args.x_stride = row_stride(x);
  args.weight = data_or_null(weight);
  args.bias = data_or_null(bias);
  args.y = y.data_ptr();
  args.mean = center ? mean.data_ptr<float>() : nullptr;
  args.centre = center ? centre.data_ptr<float>() : nullptr;
  args.rstd = rstd.data_ptr<float>();
  args.rows = rows;
  args.n = static_cast<int>(n);
  args.eps = static_cast<float>(eps);
  C10_CUDA_CHECK(norm_forward(args, c10::cuda::getCurrentCUDAStream().stream()));
  return {y, mean, centre, rstd};
}

// Fills dx (when wanted) from dy, x and the statistics.
void input_grad(const at::Tensor& dy, const at::Tensor& x,
                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& centre,
                const at::Tensor& rstd, bool center, at::Tensor& dx, cudaStream_t stream) {
  InputGradArgs args{};
  args.dtype = dtype_of(x);
  args.center = center;
  args.dy = dy.const_data_ptr();
  args.dy_stride = row_stride(dy);
  args.x = x.const_data_ptr();
  args.x_stride = row_stride(x);
  args.weight = data_or_null(weight);
  args.centre = center ? centre->const_data_ptr<float>() : nullptr;
  args.rstd = rstd.const_data_ptr<float>();
  args.dx = dx.data_ptr();
  args.rows = x.size(0);
  args.n = static_cast<int>(x.size(1));
  C10_CUDA_CHECK(norm_backward_input(args, stream));
}

// Fills dw and/or db (those defined) through an fp32 workspace of per-chunk partial sums.
void param_grads(const at::Tensor& dy, const at::Tensor& x,
                 const std::optional<at::Tensor>& centre, const at::Tensor& rstd, bool center,
                 at::Tensor& dw, at::Tensor& db, cudaStream_t stream) {
  const int64_t rows = x.size(0);
  const int n = static_cast<int>(x.size(1));
  const ParamGradPlan plan = plan_param_grad(rows, n);
  const int64_t parts = (dw.defined() ? 1 : 0) + (db.defined() ? 1 : 0);
  at::Tensor workspace = at::empty({parts * plan.chunks, n}, x.options().dtype(at::kFloat));
  float* next = workspace.data_ptr<float>();
  ParamGradArgs args{};
  args.dtype = dtype_of(x);
  args.center = center;
  args.dy = dy.const_data_ptr();
  args.dy_stride = row_stride(dy);
  args.x = x.const_data_ptr();
  args.x_stride = row_stride(x);
  args.centre = center ? centre->const_data_ptr<float>() : nullptr;
  args.rstd = rstd.const_data_ptr<float>();
  if (dw.defined()) {
    args.dw_partial = next;
    args.dw = dw.data_ptr();
    next += plan.chunks * n;
  }
  if (db.defined()) {
    args.db_partial = next;
    args.db = db.data_ptr();
  }
  args.rows = rows;
  args.n = n;
  args.plan = plan;
  C10_CUDA_CHECK(param_grad(args, stream));
}

// (dx, dw, db), each empty unless asked for; dw is sum(dy * xhat) over rows whether or not the
// forward pass had a weight (the caller asks for it only when there is one).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& centre, const at::Tensor& rstd, bool center, bool need_dx,
    bool need_dw, bool need_db) {
  check_rows(x, "input");
  check_rows(dy, "grad_output");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() &&
                  dy.device() == x.device(),
              "normconf_cuda: grad_output must match the input in shape, dtype and device");
  check_param(weight, x, "weight");
  check_stat(rstd, x, "rstd");
  TORCH_CHECK(!center || present(centre), "normconf_cuda: LayerNorm backward needs centre");
  if (center) check_stat(*centre, x, "centre");
  TORCH_CHECK(center || !need_db, "normconf_cuda: RMSNorm has no bias gradient");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t n = x.size(1);
  at::Tensor dx = at::empty({need_dx ? x.size(0) : 0, n}, x.options());
  // Every element of dw and db is written, except for zero rows, whose sums are zero.
  const auto param = [&](bool need) {
    if (!need) return at::Tensor();
    return x.size(0) == 0 ? at::zeros({n}, x.options()) : at::empty({n}, x.options());
  };
  at::Tensor dw = param(need_dw);
  at::Tensor db = param(need_db);
  if (need_dx) input_grad(dy, x, weight, centre, rstd, center, dx, stream);
  if (need_dw || need_db) param_grads(dy, x, centre, rstd, center, dw, db, stream);
  const auto empty = x.options();
  return {dx, dw.defined() ? dw : at::empty({0}, empty), db.defined() ? db : at::empty({0}, empty)};
}

}  // namespace
}  // namespace normconf

TORCH_LIBRARY(normconf_cuda, m) {
  m.def("forward(Tensor x, Tensor? weight, Tensor? bias, float eps, bool center)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("backward(Tensor dy, Tensor x, Tensor? weight, Tensor? centre, Tensor rstd,"
        " bool center, bool need_dx, bool need_dw, bool need_db) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(normconf_cuda, CUDA, m) {
  m.impl("forward", &normconf::forward_op);
  m.impl("backward", &normconf::backward_op);
}
