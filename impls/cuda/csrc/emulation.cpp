// The kernels and launchers of forward.cu and backward.cu, built for the CPU emulation of
// emulation.h, behind a C interface for ctypes (tests/test_impls_cuda.py). Pointers are host
// pointers laid out as launch.h describes; dtype is 0 float32, 1 float16, 2 bfloat16. Each call
// returns 0, or 1 when the emulation recorded a problem (see nc_error).
#define NORMCONF_EMULATION 1

#include <string>

#include "backward.cu"
#include "forward.cu"

namespace {

std::string last_error;

int finish(cudaError_t status) {
  last_error = normconf::emulation::take_error();
  if (status != cudaSuccess && last_error.empty()) last_error = "launch failed";
  return last_error.empty() ? 0 : 1;
}

}  // namespace

extern "C" {

const char* nc_error() { return last_error.c_str(); }

// Self-test of the alignment check: a 16-byte pack read from a 4-byte aligned address.
int nc_detects_misaligned_pack() {
  alignas(16) float data[8] = {};
  float out[4];
  normconf::load<float, 4>(data + 1, out);
  return normconf::emulation::take_error().empty() ? 0 : 1;
}

int nc_forward(int dtype, int center, const void* x, int64_t x_stride, const void* weight,
               const void* bias, void* y, float* mean, float* centre, float* rstd, int64_t rows,
               int n, float eps) {
  normconf::ForwardArgs a{};
  a.dtype = static_cast<normconf::Dtype>(dtype);
  a.center = center != 0;
  a.x = x;
  a.x_stride = x_stride;
  a.weight = weight;
  a.bias = bias;
  a.y = y;
  a.mean = mean;
  a.centre = centre;
  a.rstd = rstd;
  a.rows = rows;
  a.n = n;
  a.eps = eps;
  return finish(normconf::norm_forward(a, nullptr));
}

int nc_backward_input(int dtype, int center, const void* dy, int64_t dy_stride, const void* x,
                      int64_t x_stride, const void* weight, const float* centre,
                      const float* rstd, void* dx, int64_t rows, int n) {
  normconf::InputGradArgs a{};
  a.dtype = static_cast<normconf::Dtype>(dtype);
  a.center = center != 0;
  a.dy = dy;
  a.dy_stride = dy_stride;
  a.x = x;
  a.x_stride = x_stride;
  a.weight = weight;
  a.centre = centre;
  a.rstd = rstd;
  a.dx = dx;
  a.rows = rows;
  a.n = n;
  return finish(normconf::norm_backward_input(a, nullptr));
}

void nc_plan(int64_t rows, int n, int64_t* chunks, int64_t* rows_per_chunk) {
  const normconf::ParamGradPlan plan = normconf::plan_param_grad(rows, n);
  *chunks = plan.chunks;
  *rows_per_chunk = plan.rows_per_chunk;
}

int nc_param_grad(int dtype, int center, const void* dy, int64_t dy_stride, const void* x,
                  int64_t x_stride, const float* centre, const float* rstd, float* dw_partial,
                  float* db_partial, void* dw, void* db, int64_t rows, int n) {
  normconf::ParamGradArgs a{};
  a.dtype = static_cast<normconf::Dtype>(dtype);
  a.center = center != 0;
  a.dy = dy;
  a.dy_stride = dy_stride;
  a.x = x;
  a.x_stride = x_stride;
  a.centre = centre;
  a.rstd = rstd;
  a.dw_partial = dw_partial;
  a.db_partial = db_partial;
  a.dw = dw;
  a.db = db;
  a.rows = rows;
  a.n = n;
  a.plan = normconf::plan_param_grad(rows, n);
  return finish(normconf::param_grad(a, nullptr));
}

}  // extern "C"
