// CUDA launcher of ddrl::step_logprob_rows: one pass over x_next, x, model_out (and offset)
// gives each row's Gaussian log-density and, when asked, delta / std for backward (row_reduce.cuh).
#include <cuda_runtime.h>

#include "ddrl/launch_params.h"
#include "row_reduce.cuh"

namespace ddrl {
namespace {

// delta = x_next - (x_coef * x + out_coef * model_out + offset), inputs in that order; the
// offset is a fourth input only when present (no zero tensor is read in its place).
template <bool kOffset>
struct StepRows {
  static constexpr int kInputs = kOffset ? 4 : 3;
  RowCoef x_coef;
  RowCoef out_coef;
  RowCoef std;
  int64_t cols;
  bool mean;
  float* logprob;

  struct Row {
    float x_coef, out_coef, grad_scale;
    __device__ float residual(const float (&in)[kInputs]) const {
      float offset = 0.f;
      if constexpr (kOffset) offset = in[3];
      return step_delta(in[0], in[1], in[2], offset, x_coef, out_coef);
    }
  };
  __device__ Row row(int64_t i) const {
    return {cuda::coef_at(x_coef, i), cuda::coef_at(out_coef, i),
            step_grad_scale(cuda::coef_at(std, i), cols, mean)};
  }
  __device__ void finish(int64_t i, float sum_sq) const {
    logprob[i] = step_row_logprob(sum_sq, cuda::coef_at(std, i), cols, mean);
  }
};

template <bool kOffset, typename T>
cudaError_t launch(const StepLogprobParams& p, cudaStream_t stream) {
  const StepRows<kOffset> op{p.x_coef, p.out_coef, p.std, p.cols, p.mean, p.logprob};
  cuda::RowArgs<T, StepRows<kOffset>::kInputs> a{};
  a.in[0] = static_cast<const T*>(p.x_next);
  a.in[1] = static_cast<const T*>(p.x);
  a.in[2] = static_cast<const T*>(p.model_out);
  if constexpr (kOffset) a.in[3] = static_cast<const T*>(p.offset);
  a.grad = static_cast<T*>(p.grad);
  a.partials = p.partials;
  a.rows = p.rows;
  a.cols = p.cols;
  return cuda::launch_row_reduction(a, op, stream);
}

}  // namespace

int launch_step_logprob(const StepLogprobParams& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  return cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return p.offset ? launch<true, T>(p, s) : launch<false, T>(p, s);
  });
}

}  // namespace ddrl
