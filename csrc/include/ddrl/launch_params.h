// Plain-old-data arguments of the CUDA launchers.
//
// The .cu files see only this header and the CUDA runtime (no torch headers: they compile in
// seconds). The .cpp launchers in csrc/cuda/ check the tensors, pick the stream and fill these.
#pragma once

#include <cstdint>

#include "ddrl/row_math.h"

namespace ddrl {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// A per-row fp32 coefficient: value of row i is ptr[i * stride] (stride 0 broadcasts).
struct RowCoef {
  const float* ptr;
  int64_t stride;
};

struct DiffusionLossParams {
  const void* pred;   // [rows, cols], contiguous, dtype
  const void* x0;     // [rows, cols], contiguous, dtype
  const void* noise;  // [rows, cols], contiguous, dtype
  RowCoef noise_coef;
  RowCoef data_coef;
  int64_t rows;
  int64_t cols;
  DType dtype;
  float* partials;  // workspace [rows, num_chunks(cols)]
  float* row_loss;  // [rows]: mean_j residual^2
  void* grad;       // [rows, cols] in dtype, or nullptr: the residual (backward scales by 2 / cols)
};

struct StepLogprobParams {
  const void* x_next;     // [rows, cols], contiguous, dtype
  const void* x;          // [rows, cols], contiguous, dtype
  const void* model_out;  // [rows, cols], contiguous, dtype
  const void* offset;     // [rows, cols], contiguous, dtype, or nullptr
  RowCoef x_coef;
  RowCoef out_coef;
  RowCoef std;
  int64_t rows;
  int64_t cols;
  bool mean;
  DType dtype;
  float* partials;  // workspace [rows, num_chunks(cols)]
  float* logprob;   // [rows]
  void* grad;       // [rows, cols] in dtype, or nullptr: delta / std (backward finishes d lp / d mu)
};

struct ScaleRowsParams {
  const void* src;  // [rows, cols], contiguous, src_dtype
  RowCoef scale;
  int64_t rows;
  int64_t cols;
  DType src_dtype;
  DType out_dtype;
  void* out;  // [rows, cols], contiguous, out_dtype: out = src * scale_row (fp32 math)
};

// Implemented in csrc/cuda/*.cu; `stream` is a cudaStream_t passed as void* so this header
// stays free of CUDA includes. Each returns the CUDA error code of its launches (0 = success).
int launch_diffusion_loss(const DiffusionLossParams& p, void* stream);
int launch_step_logprob(const StepLogprobParams& p, void* stream);
int launch_scale_rows(const ScaleRowsParams& p, void* stream);

}  // namespace ddrl
