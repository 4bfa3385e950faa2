// Argument checks and input preparation shared by the CPU and CUDA implementations.
//
// Every op works on "row tensors": same-shaped tensors whose dim 0 indexes rows and whose other
// dims are flattened into one row of `cols` elements. Preparation checks them (naming the
// argument in every message), brings them to one floating dtype and makes them contiguous, so
// kernels only ever see dense [rows, cols] buffers.
#pragma once

#include <ATen/core/Tensor.h>

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

}  // namespace ddrl
