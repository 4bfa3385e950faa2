// Argument checks and input preparation shared by the CPU and CUDA implementations.
//
// Every op works on "row tensors": same-shaped tensors whose dim 0 indexes rows and whose other
// dims are flattened into one row of `cols` elements. Preparation checks them (naming the
// argument in every message), brings them to one floating dtype and makes them contiguous, so
// kernels only ever see dense [rows, cols] buffers.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "ddrl/launch_params.h"

namespace ddrl {

struct NamedTensor {
  const char* name;
  const at::Tensor* tensor;  // nullptr for an absent optional argument
};

struct RowInputs {
  std::vector<at::Tensor> dense;  // same order as given; undefined for absent optionals
  int64_t rows = 0;
  int64_t cols = 0;
  at::ScalarType dtype = at::kFloat;
};

// Checks: floating dtype (fp32/bf16/fp16), at least 1 dim, identical shapes, one device.
// Mixed dtypes are promoted (bf16 + fp16 -> fp32); non-contiguous inputs are copied.
RowInputs prepare_row_inputs(const char* op, const std::vector<NamedTensor>& args);

// A per-row coefficient: a 1-D float32 tensor of length `rows` on `device` (any stride, stride 0
// allowed for a broadcast scalar).
void check_row_coef(const char* op, const char* name, const at::Tensor& coef, int64_t rows,
                    const at::Device& device);

RowCoef row_coef(const at::Tensor& coef);
DType to_ddrl_dtype(at::ScalarType t);

// One op call, checked and prepared the same way for every backend: dense inputs, the fp32 [rows]
// result and the stored gradient (the inputs' shape and common dtype when write_grad, else empty).
struct RowCall {
  RowInputs in;
  at::Tensor rows_out;
  at::Tensor grad;
};

RowCall prepare_diffusion_loss(const at::Tensor& pred, const at::Tensor& x0, const at::Tensor& noise,
                               const at::Tensor& noise_coef, const at::Tensor& data_coef,
                               bool write_grad);
RowCall prepare_step_logprob(const at::Tensor& x_next, const at::Tensor& x,
                             const at::Tensor& model_out, const std::optional<at::Tensor>& offset,
                             const at::Tensor& x_coef, const at::Tensor& out_coef,
                             const at::Tensor& std_t, bool write_grad);

}  // namespace ddrl
