#include "row_inputs.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace ddrl {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

}  // namespace

RowInputs prepare_row_inputs(const char* op, const std::vector<NamedTensor>& args) {
  TORCH_CHECK(!args.empty() && args[0].tensor != nullptr, op, ": missing first tensor");
  const at::Tensor& first = *args[0].tensor;
  const char* first_name = args[0].name;
  TORCH_CHECK(first.dim() >= 1, op, ": '", first_name,
              "' must have at least 1 dimension (rows first), got a 0-d tensor");

  RowInputs out;
  out.rows = first.size(0);
  out.cols = out.rows == 0 ? 0 : first.numel() / out.rows;
  if (out.rows == 0) {
    out.cols = 1;
    for (int64_t d = 1; d < first.dim(); ++d) out.cols *= first.size(d);
  }

  bool have_dtype = false;
  for (const auto& a : args) {
    if (a.tensor == nullptr) continue;
    const at::Tensor& t = *a.tensor;
    TORCH_CHECK(t.defined(), op, ": '", a.name, "' is an undefined tensor");
    TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": '", a.name,
                "' must be float32, bfloat16 or float16, got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == first.sizes(), op, ": '", a.name, "' has shape ", t.sizes(),
                " but '", first_name, "' has shape ", first.sizes(), "; they must match");
    TORCH_CHECK(t.device() == first.device(), op, ": '", a.name, "' is on ", t.device(),
                " but '", first_name, "' is on ", first.device(), "; all tensors must share a device");
    out.dtype = have_dtype ? c10::promoteTypes(out.dtype, t.scalar_type()) : t.scalar_type();
    have_dtype = true;
  }

  out.dense.reserve(args.size());
  for (const auto& a : args) {
    if (a.tensor == nullptr) {
      out.dense.emplace_back();
      continue;
    }
    // Promotion and densification are copies only when needed; the common case (same dtype,
    // contiguous) passes the tensor through untouched.
    out.dense.push_back(a.tensor->to(out.dtype).contiguous());
  }
  return out;
}

void check_row_coef(const char* op, const char* name, const at::Tensor& coef, int64_t rows,
                    const at::Device& device) {
  TORCH_CHECK(coef.defined(), op, ": '", name, "' is an undefined tensor");
  TORCH_CHECK(coef.dim() == 1, op, ": '", name, "' must be 1-D with one value per row, got shape ",
              coef.sizes());
  TORCH_CHECK(coef.size(0) == rows, op, ": '", name, "' has length ", coef.size(0),
              " but the inputs have ", rows, " rows");
  TORCH_CHECK(coef.scalar_type() == at::kFloat, op, ": '", name, "' must be float32, got ",
              coef.scalar_type());
  TORCH_CHECK(coef.device() == device, op, ": '", name, "' is on ", coef.device(),
              " but the inputs are on ", device);
}

RowCoef row_coef(const at::Tensor& coef) {
  return RowCoef{coef.data_ptr<float>(), coef.stride(0)};
}

namespace {

RowCall allocate_outputs(RowInputs in, const at::Tensor& like, bool write_grad) {
  at::Tensor rows_out = at::empty({in.rows}, like.options().dtype(at::kFloat));
  at::Tensor grad = write_grad ? at::empty(like.sizes(), like.options().dtype(in.dtype))
                               : at::empty({0}, like.options().dtype(in.dtype));
  return RowCall{std::move(in), rows_out, grad};
}

}  // namespace

RowCall prepare_diffusion_loss(const at::Tensor& pred, const at::Tensor& x0, const at::Tensor& noise,
                               const at::Tensor& noise_coef, const at::Tensor& data_coef,
                               bool write_grad) {
  const char* op = "ddrl.diffusion_loss";
  RowInputs in = prepare_row_inputs(op, {{"pred", &pred}, {"x0", &x0}, {"noise", &noise}});
  check_row_coef(op, "noise_coef", noise_coef, in.rows, pred.device());
  check_row_coef(op, "data_coef", data_coef, in.rows, pred.device());
  return allocate_outputs(std::move(in), pred, write_grad);
}

RowCall prepare_step_logprob(const at::Tensor& x_next, const at::Tensor& x,
                             const at::Tensor& model_out, const std::optional<at::Tensor>& offset,
                             const at::Tensor& x_coef, const at::Tensor& out_coef,
                             const at::Tensor& std_t, bool write_grad) {
  const char* op = "ddrl.step_logprob";
  RowInputs in = prepare_row_inputs(
      op, {{"x_next", &x_next}, {"x", &x}, {"model_out", &model_out},
           {"offset", offset.has_value() ? &offset.value() : nullptr}});
  check_row_coef(op, "x_coef", x_coef, in.rows, x_next.device());
  check_row_coef(op, "out_coef", out_coef, in.rows, x_next.device());
  check_row_coef(op, "std", std_t, in.rows, x_next.device());
  return allocate_outputs(std::move(in), x_next, write_grad);
}

DType to_ddrl_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "ddrl: unsupported dtype ", t);
  }
}

}  // namespace ddrl
