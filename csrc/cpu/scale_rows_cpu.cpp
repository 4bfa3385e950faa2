// CPU kernel of ddrl::scale_rows: the whole backward pass of the fused ops, one read and one
// write per element, fp32 math whatever the storage dtype.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../row_inputs.h"
#include "row_buffer_cpu.h"
#include "row_kernels.h"
#include "row_reduce_cpu.h"

namespace ddrl::cpu {
namespace {

at::Tensor scale_rows_cpu(const at::Tensor& src, const at::Tensor& scale, at::ScalarType dtype) {
  const char* op = "ddrl.scale_rows";
  RowInputs in = prepare_row_inputs(op, {{"src", &src}});
  check_row_coef(op, "scale", scale, in.rows, src.device());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": 'dtype' must be float32, bfloat16 or float16, got ", dtype);
  at::Tensor out = empty_row_buffer(src.sizes(), dtype);
  const int64_t rows = in.rows, cols = in.cols;
  const float* s = scale.data_ptr<float>();
  const int64_t s_stride = scale.stride(0);
  DDRL_DISPATCH_ROW_TYPES(in.dtype, "scale_rows_src", [&] {
    using src_t = scalar_t;
    const src_t* x = in.dense[0].data_ptr<src_t>();
    DDRL_DISPATCH_ROW_TYPES(dtype, "scale_rows_out", [&] {
      scalar_t* y = out.data_ptr<scalar_t>();
      const ScaleSpanFn<src_t, scalar_t> span = row_kernels().scale<src_t, scalar_t>();
      at::parallel_for(0, rows * cols, 32768, [&](int64_t begin, int64_t end) {
        while (begin < end) {
          const int64_t row = begin / cols;
          const int64_t stop = std::min(end, (row + 1) * cols);
          const float k = coef_at(s, s_stride, row);
          span(x + begin, y + begin, k, stop - begin);
          begin = stop;
        }
      });
    });
  });
  return out;
}

}  // namespace
}  // namespace ddrl::cpu

TORCH_LIBRARY_IMPL(ddrl, CPU, m) { m.impl("scale_rows", &ddrl::cpu::scale_rows_cpu); }
