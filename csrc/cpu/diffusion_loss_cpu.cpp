// CPU kernel of ddrl::diffusion_loss_rows: one pass computes each row's mean squared residual
// and, when asked, writes the residual so the backward pass only rescales it.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../row_inputs.h"
#include "row_buffer_cpu.h"
#include "row_kernels.h"
#include "row_reduce_cpu.h"

namespace ddrl::cpu {
namespace {

template <typename scalar_t, bool kGrad>
void run(const at::Tensor& pred, const at::Tensor& x0, const at::Tensor& noise,
         const at::Tensor& noise_coef, const at::Tensor& data_coef, int64_t rows, int64_t cols,
         at::Tensor& row_loss, at::Tensor& grad) {
  const scalar_t* p = pred.data_ptr<scalar_t>();
  const scalar_t* d = x0.data_ptr<scalar_t>();
  const scalar_t* e = noise.data_ptr<scalar_t>();
  scalar_t* g = kGrad ? grad.data_ptr<scalar_t>() : nullptr;
  const float* nc = noise_coef.data_ptr<float>();
  const float* dc = data_coef.data_ptr<float>();
  const int64_t nc_s = noise_coef.stride(0), dc_s = data_coef.stride(0);
  float* out = row_loss.data_ptr<float>();
  const float gscale = diffusion_grad_scale(cols);
  const DiffusionChunkFn<scalar_t> chunk = row_kernels().of<scalar_t>().diffusion;

  reduce_rows(
      rows, cols,
      [&](int64_t row, int64_t start, int64_t count) {
        const int64_t base = row * cols + start;
        const float a = coef_at(nc, nc_s, row), b = coef_at(dc, dc_s, row);
        const scalar_t *pp = p + base, *dd = d + base, *ee = e + base;
        scalar_t* gg = kGrad ? g + base : nullptr;
        return chunk(pp, dd, ee, gg, a, b, gscale, count);
      },
      [&](int64_t row, float sum_sq) { out[row] = diffusion_row_loss(sum_sq, cols); });
}

std::tuple<at::Tensor, at::Tensor> diffusion_loss_rows_cpu(
    const at::Tensor& pred, const at::Tensor& x0, const at::Tensor& noise,
    const at::Tensor& noise_coef, const at::Tensor& data_coef, bool write_grad) {
  // The stored residual comes from the op buffer cache (row_buffer_cpu.h), not a fresh allocation.
  RowCall call = prepare_diffusion_loss(pred, x0, noise, noise_coef, data_coef, /*write_grad=*/false);
  const RowInputs& in = call.in;
  at::Tensor &row_loss = call.rows_out, &grad = call.grad;
  if (write_grad) grad = empty_row_buffer(pred.sizes(), in.dtype);
  DDRL_DISPATCH_ROW_TYPES(in.dtype, "diffusion_loss_cpu", [&] {
    if (write_grad) {
      run<scalar_t, true>(in.dense[0], in.dense[1], in.dense[2], noise_coef, data_coef, in.rows,
                          in.cols, row_loss, grad);
    } else {
      run<scalar_t, false>(in.dense[0], in.dense[1], in.dense[2], noise_coef, data_coef, in.rows,
                           in.cols, row_loss, grad);
    }
  });
  return {row_loss, grad};
}

}  // namespace
}  // namespace ddrl::cpu

TORCH_LIBRARY_IMPL(ddrl, CPU, m) {
  m.impl("diffusion_loss_rows", &ddrl::cpu::diffusion_loss_rows_cpu);
}
