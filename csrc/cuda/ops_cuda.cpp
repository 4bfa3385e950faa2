// CUDA implementations of the ddrl ops: argument checks, device guard, current stream, then the
// torch-free launchers in csrc/cuda/*.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../row_inputs.h"

namespace ddrl::cuda {
namespace {

void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, op, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor partials_workspace(int64_t rows, int64_t cols, const at::Tensor& like) {
  return at::empty({std::max<int64_t>(rows * num_chunks(cols), 1)}, like.options().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor> diffusion_loss_rows_cuda(
    const at::Tensor& pred, const at::Tensor& x0, const at::Tensor& noise,
    const at::Tensor& noise_coef, const at::Tensor& data_coef, bool write_grad) {
  const char* op = "ddrl.diffusion_loss";
  c10::cuda::CUDAGuard guard(pred.device());
  RowCall call = prepare_diffusion_loss(pred, x0, noise, noise_coef, data_coef, write_grad);
  const RowInputs& in = call.in;
  at::Tensor &row_loss = call.rows_out, &grad = call.grad;
  at::Tensor partials = partials_workspace(in.rows, in.cols, pred);
  DiffusionLossParams p{};
  p.pred = in.dense[0].data_ptr();
  p.x0 = in.dense[1].data_ptr();
  p.noise = in.dense[2].data_ptr();
  p.noise_coef = row_coef(noise_coef);
  p.data_coef = row_coef(data_coef);
  p.rows = in.rows;
  p.cols = in.cols;
  p.dtype = to_ddrl_dtype(in.dtype);
  p.partials = partials.data_ptr<float>();
  p.row_loss = row_loss.data_ptr<float>();
  p.grad = write_grad ? grad.data_ptr() : nullptr;
  check_launch(launch_diffusion_loss(p, current_stream()), op);
  return {row_loss, grad};
}

std::tuple<at::Tensor, at::Tensor> step_logprob_rows_cuda(
    const at::Tensor& x_next, const at::Tensor& x, const at::Tensor& model_out,
    const std::optional<at::Tensor>& offset, const at::Tensor& x_coef, const at::Tensor& out_coef,
    const at::Tensor& std_t, bool mean, bool write_grad) {
  const char* op = "ddrl.step_logprob";
  c10::cuda::CUDAGuard guard(x_next.device());
  // No value check of std here: it would cost a device sync inside the sampling loop (and break
  // CUDA-graph capture). A row with std <= 0 yields NaN; the Python API checks float stds.
  RowCall call = prepare_step_logprob(x_next, x, model_out, offset, x_coef, out_coef, std_t, write_grad);
  const RowInputs& in = call.in;
  at::Tensor &logprob = call.rows_out, &grad = call.grad;
  at::Tensor partials = partials_workspace(in.rows, in.cols, x_next);
  StepLogprobParams p{};
  p.x_next = in.dense[0].data_ptr();
  p.x = in.dense[1].data_ptr();
  p.model_out = in.dense[2].data_ptr();
  p.offset = offset.has_value() ? in.dense[3].data_ptr() : nullptr;
  p.x_coef = row_coef(x_coef);
  p.out_coef = row_coef(out_coef);
  p.std = row_coef(std_t);
  p.rows = in.rows;
  p.cols = in.cols;
  p.mean = mean;
  p.dtype = to_ddrl_dtype(in.dtype);
  p.partials = partials.data_ptr<float>();
  p.logprob = logprob.data_ptr<float>();
  p.grad = write_grad ? grad.data_ptr() : nullptr;
  check_launch(launch_step_logprob(p, current_stream()), op);
  return {logprob, grad};
}

at::Tensor scale_rows_cuda(const at::Tensor& src, const at::Tensor& scale, at::ScalarType dtype) {
  const char* op = "ddrl.scale_rows";
  c10::cuda::CUDAGuard guard(src.device());
  RowInputs in = prepare_row_inputs(op, {{"src", &src}});
  check_row_coef(op, "scale", scale, in.rows, src.device());
  at::Tensor out = at::empty(src.sizes(), src.options().dtype(dtype));
  ScaleRowsParams p{};
  p.src = in.dense[0].data_ptr();
  p.scale = row_coef(scale);
  p.rows = in.rows;
  p.cols = in.cols;
  p.src_dtype = to_ddrl_dtype(in.dtype);
  p.out_dtype = to_ddrl_dtype(dtype);
  p.out = out.data_ptr();
  check_launch(launch_scale_rows(p, current_stream()), op);
  return out;
}

}  // namespace
}  // namespace ddrl::cuda

TORCH_LIBRARY_IMPL(ddrl, CUDA, m) {
  m.impl("diffusion_loss_rows", &ddrl::cuda::diffusion_loss_rows_cuda);
  m.impl("step_logprob_rows", &ddrl::cuda::step_logprob_rows_cuda);
  m.impl("scale_rows", &ddrl::cuda::scale_rows_cuda);
}
