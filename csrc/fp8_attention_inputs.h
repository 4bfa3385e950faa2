// Argument checks of ddrl::fp8_attention_quantize / fp8_attention_quantized, shared by the CPU
// emulation and the CUDA launcher so both reject the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>

namespace ddrl {

struct Fp8AttentionShape {
  int64_t B = 0, H = 0, Sq = 0, Sk = 0, D = 0;
  int64_t Sq_pad = 0, Sk_pad = 0;  // padded to fp8attn::kKeyTile
};

// q, k, v: [B, H, S, D] float32/bfloat16/float16 of one dtype and device, D in {64, 128},
// at least one key; k and v share their length. Returns the sizes.
Fp8AttentionShape check_fp8_attention_inputs(const char* op, const at::Tensor& q,
                                             const at::Tensor& k, const at::Tensor& v);

// The outputs of fp8_attention_quantize, as the attention step receives them.
Fp8AttentionShape check_fp8_quantized(const char* op, const at::Tensor& q8, const at::Tensor& q_scale,
                                      const at::Tensor& k8, const at::Tensor& k_scale,
                                      const at::Tensor& v8t, const at::Tensor& v_scale,
                                      const at::Tensor& v_mean, int64_t q_len, int64_t kv_len,
                                      at::ScalarType out_dtype);

}  // namespace ddrl
