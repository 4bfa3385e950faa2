// The vectorised inner loops of the CPU row ops, one table per CPU capability (ATen's names:
// DEFAULT, AVX2, AVX512), chosen once from at::get_cpu_capability() (ATEN_CPU_CAPABILITY
// overrides it, as for ATen's own kernels). The threading, the chunking and the fold of the
// chunk partials stay in row_reduce_cpu.h; a table entry does one chunk (or one span of a row).
//
// Every capability gives the same bits: each element goes through the same float operations in
// the same order (ddrl/row_math.h, instantiated on at::vec::Vectorized<float>), lane l of a
// chunk accumulates the elements at positions l mod kLanes in order, and the lanes fold
// pairwise, exactly as the scalar reference order of row_math.h describes.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace ddrl::cpu {

// Sum over the chunk of residual^2; writes residual * grad_scale to grad unless grad is null.
template <typename T>
using DiffusionChunkFn = float (*)(const T* pred, const T* x0, const T* noise, T* grad,
                                   float noise_coef, float data_coef, float grad_scale, int64_t n);
// Sum over the chunk of delta^2; offset and grad may be null.
template <typename T>
using StepChunkFn = float (*)(const T* x_next, const T* x, const T* model_out, const T* offset,
                              T* grad, float x_coef, float out_coef, float grad_scale, int64_t n);
// dst[j] = D(float(src[j]) * k).
template <typename S, typename D>
using ScaleSpanFn = void (*)(const S* src, D* dst, float k, int64_t n);

template <typename T>
struct DtypeKernels {
  DiffusionChunkFn<T> diffusion;
  StepChunkFn<T> step;
  ScaleSpanFn<T, float> scale_to_f32;
  ScaleSpanFn<T, c10::BFloat16> scale_to_bf16;
  ScaleSpanFn<T, c10::Half> scale_to_f16;
};

struct RowKernels {
  const char* capability;  // "DEFAULT", "AVX2" or "AVX512"
  DtypeKernels<float> f32;
  DtypeKernels<c10::BFloat16> bf16;
  DtypeKernels<c10::Half> f16;

  template <typename T>
  const DtypeKernels<T>& of() const {
    if constexpr (std::is_same_v<T, float>) return f32;
    else if constexpr (std::is_same_v<T, c10::BFloat16>) return bf16;
    else return f16;
  }
  template <typename S, typename D>
  ScaleSpanFn<S, D> scale() const {
    if constexpr (std::is_same_v<D, float>) return of<S>().scale_to_f32;
    else if constexpr (std::is_same_v<D, c10::BFloat16>) return of<S>().scale_to_bf16;
    else return of<S>().scale_to_f16;
  }
};

// The table for this machine (what at::get_cpu_capability() names; DEFAULT when this build
// has no table for it).
const RowKernels& row_kernels();

// One table per capability, each from its own translation unit (row_kernels_<cap>.cpp).
const RowKernels& row_kernels_default();
const RowKernels& row_kernels_avx2();
const RowKernels& row_kernels_avx512();

}  // namespace ddrl::cpu
