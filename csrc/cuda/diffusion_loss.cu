// CUDA launcher of ddrl::diffusion_loss_rows: one pass over pred, x0 and noise gives each row's
// mean squared residual and, when asked, the residual for backward (see row_reduce.cuh for the walk).
#include <cuda_runtime.h>

#include "ddrl/launch_params.h"
#include "row_reduce.cuh"

namespace ddrl {
namespace {

// residual = pred - (noise_coef * noise + data_coef * x0), inputs in the order pred, x0, noise.
struct DiffusionRows {
  static constexpr int kInputs = 3;
  RowCoef noise_coef;
  RowCoef data_coef;
  int64_t cols;
  float* row_loss;

  struct Row {
    float noise_coef, data_coef, grad_scale;
    __device__ float residual(const float (&in)[kInputs]) const {
      return diffusion_residual(in[0], in[1], in[2], noise_coef, data_coef);
    }
  };
  __device__ Row row(int64_t i) const {
    return {cuda::coef_at(noise_coef, i), cuda::coef_at(data_coef, i), diffusion_grad_scale(cols)};
  }
  __device__ void finish(int64_t i, float sum_sq) const {
    row_loss[i] = diffusion_row_loss(sum_sq, cols);
  }
};

}  // namespace

int launch_diffusion_loss(const DiffusionLossParams& p, void* stream) {
  const DiffusionRows op{p.noise_coef, p.data_coef, p.cols, p.row_loss};
  return cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const cuda::RowArgs<T, DiffusionRows::kInputs> a{
        {static_cast<const T*>(p.pred), static_cast<const T*>(p.x0), static_cast<const T*>(p.noise)},
        static_cast<T*>(p.grad), p.partials, p.rows, p.cols};
    return cuda::launch_row_reduction(a, op, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace ddrl
