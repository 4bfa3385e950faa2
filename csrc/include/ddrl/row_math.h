// Per-element and per-row math shared by the CPU and CUDA kernels.
//
// Everything here is plain arithmetic on float so both compilers see the same expressions:
// a row's result is defined once, here, and the two backends only differ in how they walk
// the memory. Pure header: no torch, no CUDA runtime.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define DDRL_HD __host__ __device__ __forceinline__
#else
#define DDRL_HD inline
#endif

namespace ddrl {

// Rows are reduced in fixed-size chunks, each chunk to one fp32 partial, and the partials of
// a row are summed in chunk order. The decomposition depends only on the row length, never on
// the number of rows or threads, so a row's result is bitwise the same alone or in any batch.
constexpr int64_t kChunk = 8192;
// Inside a chunk the CPU keeps this many independent accumulators (lane l takes the elements
// whose position in the chunk is l mod kLanes) and folds them pairwise at the end.
constexpr int kLanes = 16;

DDRL_HD int64_t num_chunks(int64_t cols) { return cols == 0 ? 0 : (cols + kChunk - 1) / kChunk; }

// ---- fused diffusion loss ----------------------------------------------------------------
// residual = pred - (noise_coef * noise + data_coef * x0); the target is never materialised.
// F is float, or a SIMD vector of floats (the CPU path's at::vec::Vectorized<float>) with the
// same IEEE operations in the same order, so both give the same bits per element.
template <typename F>
DDRL_HD F diffusion_residual(F pred, F x0, F noise, F noise_coef, F data_coef) {
  return pred - (noise_coef * noise + data_coef * x0);
}
// The forward pass stores the residual itself (grad_scale 1); backward applies 2 / cols in fp32.
// Storing d(loss)/d(pred) = 2 residual / cols directly would put fp16 gradients of large rows
// into the subnormal range; the residual is O(1) in any storage dtype.
DDRL_HD float diffusion_grad_scale(int64_t /*cols*/) { return 1.f; }
DDRL_HD float diffusion_row_loss(float sum_sq, int64_t cols) {
  return cols == 0 ? NAN : sum_sq / (float)cols;
}

// ---- Gaussian step log-probability ---------------------------------------------------------
// delta = x_next - mu,  mu = x_coef * x + out_coef * model_out (+ offset).
// F as for diffusion_residual.
template <typename F>
DDRL_HD F step_delta(F x_next, F x, F model_out, F offset, F x_coef, F out_coef) {
  return x_next - (x_coef * x + out_coef * model_out + offset);
}
// The forward pass stores delta / std, the standardised residual (O(1) on-policy, so well
// conditioned even in fp16); backward multiplies by 1 / std (and 1 / cols for a mean) in fp32 to
// get d lp / d mu, the common factor of every input gradient (model_out: * out_coef,
// x: * x_coef, offset: * 1, x_next: * -1).
DDRL_HD float step_grad_scale(float std, int64_t /*cols*/, bool /*mean*/) { return 1.f / std; }
// lp = reduce_j [-delta_j^2 / (2 std^2) - log std - log(2 pi) / 2].
DDRL_HD float step_row_logprob(float sum_sq, float std, int64_t cols, bool mean) {
  if (cols == 0) return mean ? NAN : 0.f;
  const float half_log_2pi = 0.91893853320467274178f;
  const float per_elem_const = logf(std) + half_log_2pi;
  const float quad = sum_sq / (2.f * std * std);
  return mean ? -(quad / (float)cols) - per_elem_const : -quad - per_elem_const * (float)cols;
}

}  // namespace ddrl
