// Argument checks of ddrl::fp8_attention_quantize / fp8_attention_quantized, shared by the CPU
// emulation and the CUDA launcher so both reject the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "ddrl/fp8_attention_params.h"

namespace ddrl {

struct Fp8AttentionShape {
  int64_t B = 0, H = 0, Sq = 0, Sk = 0, D = 0;
  int64_t Sq_pad = 0, Sk_pad = 0;  // padded to fp8attn::kKeyTile
};

// q, k, v: [B, H, S, D] float32/bfloat16/float16 of one dtype and device, D in {64, 128},
// at least one key; k and v share their length; softmax_scale positive and finite. Returns the sizes.
Fp8AttentionShape check_fp8_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, double softmax_scale);

// q, k or v as the pre-pass reads it: `t` itself when its channels (last dim) are adjacent, whatever
// its batch, head and token strides (views are read in place); else a contiguous copy.
at::Tensor fp8_unit_channel_stride(const at::Tensor& t);

// The batch, head and token strides (elements) of a [B, H, S, D] input; its channel stride must be 1.
Fp8TokenStrides fp8_token_strides(const char* op, const char* name, const at::Tensor& t);

// The seven tensors fp8_attention_quantize returns (layouts in ddrl/fp8_attention_params.h).
struct Fp8Quantized {
  at::Tensor q8, q_scale, k8, k_scale, v8t, v_scale, v_mean;

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> as_tuple() const {
    return {q8, q_scale, k8, k_scale, v8t, v_scale, v_mean};
  }
};

// The quantized tensors for `s` on opts' device. zeroed: padding must read as zeros (the CPU
// emulation writes only real tokens; the CUDA pre-pass writes every element, padding included).
Fp8Quantized allocate_fp8_quantized(const Fp8AttentionShape& s, const at::TensorOptions& opts, bool zeroed);

// The outputs of fp8_attention_quantize, as the attention step receives them.
Fp8AttentionShape check_fp8_quantized(const char* op, const at::Tensor& q8, const at::Tensor& q_scale,
                                      const at::Tensor& k8, const at::Tensor& k_scale,
                                      const at::Tensor& v8t, const at::Tensor& v_scale,
                                      const at::Tensor& v_mean, int64_t q_len, int64_t kv_len,
                                      at::ScalarType out_dtype);

}  // namespace ddrl
