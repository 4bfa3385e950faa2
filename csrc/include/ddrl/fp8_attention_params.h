// Plain-old-data arguments of the fp8 attention launchers (csrc/cuda/fp8_attention_quant.cu and
// csrc/cuda/cutlass/fp8_attention_sm90.cu). No torch, no CUDA headers.
#pragma once

#include <cstdint>

#include "ddrl/fp8_attention_math.h"
#include "ddrl/launch_params.h"

namespace ddrl {

// Element strides of a [B, H, S, D] input whose channels are adjacent (channel stride 1): the
// pre-pass reads q, k, v through them, so views such as the DiT's [B, S, H, D] storage
// permuted to [B, H, S, D] are read in place. Any non-negative values (0: an expanded dim).
struct Fp8TokenStrides {
  int64_t batch, head, token;
};

// Offset of token 0 of head-row bh = b * heads + h (the kernels count heads as one dim BH).
DDRL_FP8_HD int64_t head_offset(const Fp8TokenStrides& s, int64_t bh, int64_t heads) {
  return (bh / heads) * s.batch + (bh % heads) * s.head;
}

struct Fp8QuantizeParams {
  const void* q;  // [B, H, Sq, D] through q_stride, dtype
  const void* k;  // [B, H, Sk, D] through k_stride
  const void* v;  // [B, H, Sk, D] through v_stride
  Fp8TokenStrides q_stride, k_stride, v_stride;
  DType dtype;
  int64_t bh, heads, sq, sk, sq_pad, sk_pad;  // bh = B * heads
  int d;
  float logit_factor;  // fp8attn::logit_factor(softmax_scale, D)
  // The outputs are packed (contiguous), in the layouts the sm_90a kernel's tensor maps describe.
  int8_t* q8;          // [BH, Sq_pad, D]
  float* q_scale;      // [BH, Sq_pad]
  int8_t* k8;          // [BH, Sk_pad, D]
  float* k_scale;      // [BH, Sk_pad]
  uint8_t* v8t;        // [BH, D, Sk_pad] e4m3 bits
  float* v_scale;      // [BH, D]
  float* v_mean;       // [BH, D]
  float* workspace;    // fp8_quantize_workspace_floats(bh, sk, d) floats
};

// Floats of workspace the pre-pass needs: 4 partials per (head, token chunk, channel), then the K
// mean and the V amax per (head, channel).
inline int64_t fp8_quantize_workspace_floats(int64_t bh, int64_t sk, int64_t d) {
  const int64_t chunks = (sk + 127) / 128;  // fp8attn::num_token_chunks
  return bh * d * (4 * chunks + 2);
}

struct Fp8AttentionParams {
  const int8_t* q8;
  const float* q_scale;
  const int8_t* k8;
  const float* k_scale;
  const uint8_t* v8t;
  const float* v_scale;
  const float* v_mean;
  int64_t bh, sq, sk, sq_pad, sk_pad;
  int d;
  DType out_dtype;
  void* out;  // [BH, Sq, D] contiguous, out_dtype, 16-byte aligned (pairs of columns are stored at once)
};

int launch_fp8_quantize(const Fp8QuantizeParams& p, void* stream);
// Returns cudaErrorNotSupported's code when the kernel was not compiled for the current device.
int launch_fp8_attention_sm90(const Fp8AttentionParams& p, void* stream);

}  // namespace ddrl
