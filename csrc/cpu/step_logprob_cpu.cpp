// CPU kernel of ddrl::step_logprob_rows: one pass computes each row's Gaussian log-density and,
// when asked, writes delta / std, from which backward derives every input's gradient.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../row_inputs.h"
#include "row_buffer_cpu.h"
#include "row_kernels.h"
#include "row_reduce_cpu.h"

namespace ddrl::cpu {
namespace {

template <typename scalar_t, bool kGrad, bool kOffset>
void run(const RowInputs& in, const at::Tensor& x_coef, const at::Tensor& out_coef,
         const at::Tensor& std_t, bool mean, at::Tensor& logprob, at::Tensor& grad) {
  const int64_t cols = in.cols;
  const scalar_t* xn = in.dense[0].data_ptr<scalar_t>();
  const scalar_t* x = in.dense[1].data_ptr<scalar_t>();
  const scalar_t* mo = in.dense[2].data_ptr<scalar_t>();
  const scalar_t* off = kOffset ? in.dense[3].data_ptr<scalar_t>() : nullptr;
  scalar_t* g = kGrad ? grad.data_ptr<scalar_t>() : nullptr;
  const float *xc = x_coef.data_ptr<float>(), *oc = out_coef.data_ptr<float>(),
              *sd = std_t.data_ptr<float>();
  const int64_t xc_s = x_coef.stride(0), oc_s = out_coef.stride(0), sd_s = std_t.stride(0);
  float* out = logprob.data_ptr<float>();
  const StepChunkFn<scalar_t> chunk = row_kernels().of<scalar_t>().step;

  reduce_rows(
      in.rows, cols,
      [&](int64_t row, int64_t start, int64_t count) {
        const int64_t base = row * cols + start;
        const float a = coef_at(xc, xc_s, row), b = coef_at(oc, oc_s, row);
        const float gscale = step_grad_scale(coef_at(sd, sd_s, row), cols, mean);
        const scalar_t *xnn = xn + base, *xx = x + base, *mm = mo + base;
        const scalar_t* oo = kOffset ? off + base : nullptr;
        scalar_t* gg = kGrad ? g + base : nullptr;
        return chunk(xnn, xx, mm, oo, gg, a, b, gscale, count);
      },
      [&](int64_t row, float sum_sq) {
        out[row] = step_row_logprob(sum_sq, coef_at(sd, sd_s, row), cols, mean);
      });
}

std::tuple<at::Tensor, at::Tensor> step_logprob_rows_cpu(
    const at::Tensor& x_next, const at::Tensor& x, const at::Tensor& model_out,
    const std::optional<at::Tensor>& offset, const at::Tensor& x_coef, const at::Tensor& out_coef,
    const at::Tensor& std_t, bool mean, bool write_grad) {
  // The stored delta / std comes from the op buffer cache (row_buffer_cpu.h).
  RowCall call = prepare_step_logprob(x_next, x, model_out, offset, x_coef, out_coef, std_t,
                                      /*write_grad=*/false);
  const RowInputs& in = call.in;
  at::Tensor &logprob = call.rows_out, &grad = call.grad;
  if (write_grad) grad = empty_row_buffer(x_next.sizes(), in.dtype);
  // std is read on the host here (free on CPU); the CUDA path cannot check without a sync.
  if (in.rows > 0) {
    TORCH_CHECK(std_t.gt(0).all().item<bool>(), "ddrl.step_logprob: 'std' must be > 0 in every row");
  }
  const bool has_offset = offset.has_value();
  DDRL_DISPATCH_ROW_TYPES(in.dtype, "step_logprob_cpu", [&] {
    if (write_grad && has_offset) run<scalar_t, true, true>(in, x_coef, out_coef, std_t, mean, logprob, grad);
    else if (write_grad) run<scalar_t, true, false>(in, x_coef, out_coef, std_t, mean, logprob, grad);
    else if (has_offset) run<scalar_t, false, true>(in, x_coef, out_coef, std_t, mean, logprob, grad);
    else run<scalar_t, false, false>(in, x_coef, out_coef, std_t, mean, logprob, grad);
  });
  return {logprob, grad};
}

}  // namespace
}  // namespace ddrl::cpu

TORCH_LIBRARY_IMPL(ddrl, CPU, m) {
  m.impl("step_logprob_rows", &ddrl::cpu::step_logprob_rows_cpu);
}
