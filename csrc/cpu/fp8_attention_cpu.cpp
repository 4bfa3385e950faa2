// CPU emulation of ddrl::fp8_attention: the same quantisation (fp8_attention_math.h), the same
// padding, the same order of the online softmax over key tiles as the CUDA kernels; q, k, v are
// read through their strides, as the CUDA pre-pass reads them. The quantised tensors are bitwise
// those of the GPU pre-pass; the attention differs from the GPU only in the order of the fp32 sums
// inside a tile (tensor cores) and in exp2f's last bits.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../fp8_attention_inputs.h"
#include "ddrl/fp8_attention_math.h"

namespace ddrl::cpu {
namespace {

using namespace ddrl::fp8attn;

// Per-channel mean over tokens (token t at x + t * token_stride), in the fixed chunk order of the scheme.
template <typename T>
void channel_mean(const T* x, int64_t S, int64_t token_stride, int64_t D, float* mean) {
  std::vector<float> total(D, 0.f), part(D);
  for (int64_t c = 0; c < num_token_chunks(S); ++c) {
    std::fill(part.begin(), part.end(), 0.f);
    const int64_t end = std::min<int64_t>(S, (c + 1) * kTokenChunk);
    for (int64_t t = c * kTokenChunk; t < end; ++t)
      for (int64_t d = 0; d < D; ++d) part[d] += static_cast<float>(x[t * token_stride + d]);
    for (int64_t d = 0; d < D; ++d) total[d] += part[d];
  }
  for (int64_t d = 0; d < D; ++d) mean[d] = total[d] / static_cast<float>(S);
}

// One token of Q or K: centre (K only), sign-flip, Hadamard, INT8 with a per-token scale
// (times `factor`: the logit factor for Q, 1 for K).
template <typename T>
void quant_token(const T* x, const float* mean, int64_t D, float factor, int8_t* out, float* scale) {
  float buf[128];
  for (int64_t d = 0; d < D; ++d) {
    const float c = mean ? static_cast<float>(x[d]) - mean[d] : static_cast<float>(x[d]);
    buf[d] = c * hadamard_sign(static_cast<int>(d));
  }
  fwht(buf, static_cast<int>(D));
  float amax = 0.f;
  for (int64_t d = 0; d < D; ++d) amax = nan_max(amax, fabsf(buf[d]));
  const float inv = int8_inv_scale(amax);
  for (int64_t d = 0; d < D; ++d) out[d] = quant_int8(buf[d], inv);
  *scale = q_token_scale(amax, factor);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fp8_attention_quantize_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                           double softmax_scale) {
  const char* op = "ddrl.fp8_attention_quantize";
  const Fp8AttentionShape s = check_fp8_attention_inputs(op, q_in, k_in, v_in, softmax_scale);
  // Read through their strides (the CUDA pre-pass does the same); only a non-adjacent channel dim is copied.
  const at::Tensor q = fp8_unit_channel_stride(q_in), k = fp8_unit_channel_stride(k_in), v = fp8_unit_channel_stride(v_in);
  const Fp8TokenStrides qst = fp8_token_strides(op, "q", q), kst = fp8_token_strides(op, "k", k),
                        vst = fp8_token_strides(op, "v", v);
  const Fp8Quantized t = allocate_fp8_quantized(s, q.options(), /*zeroed=*/true);
  const at::Tensor &q8 = t.q8, &qs = t.q_scale, &k8 = t.k8, &ks = t.k_scale, &v8t = t.v8t, &vs = t.v_scale,
                   &vm = t.v_mean;
  const float factor = logit_factor(static_cast<float>(softmax_scale), static_cast<int>(s.D));
  const int64_t D = s.D;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fp8_attention_quantize", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    int8_t* q8p = q8.data_ptr<int8_t>();
    int8_t* k8p = k8.data_ptr<int8_t>();
    float* qsp = qs.data_ptr<float>();
    float* ksp = ks.data_ptr<float>();
    uint8_t* v8p = reinterpret_cast<uint8_t*>(v8t.data_ptr());
    float* vsp = vs.data_ptr<float>();
    float* vmp = vm.data_ptr<float>();
    at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> kmean(D), vmax(D), vmin(D);
      for (int64_t bh = begin; bh < end; ++bh) {
        const scalar_t* qh = qp + head_offset(qst, bh, s.H);
        const scalar_t* kh = kp + head_offset(kst, bh, s.H);
        const scalar_t* vh = vp + head_offset(vst, bh, s.H);
        for (int64_t t = 0; t < s.Sq; ++t)
          quant_token(qh + t * qst.token, nullptr, D, factor, q8p + (bh * s.Sq_pad + t) * D, qsp + bh * s.Sq_pad + t);
        channel_mean(kh, s.Sk, kst.token, D, kmean.data());
        for (int64_t t = 0; t < s.Sk; ++t)
          quant_token(kh + t * kst.token, kmean.data(), D, 1.f, k8p + (bh * s.Sk_pad + t) * D, ksp + bh * s.Sk_pad + t);
        float* vmean = vmp + bh * D;
        channel_mean(vh, s.Sk, vst.token, D, vmean);
        std::fill(vmax.begin(), vmax.end(), -INFINITY);
        std::fill(vmin.begin(), vmin.end(), INFINITY);
        for (int64_t t = 0; t < s.Sk; ++t)
          for (int64_t d = 0; d < D; ++d) {
            const float x = static_cast<float>(vh[t * vst.token + d]);
            vmax[d] = fmaxf(vmax[d], x);
            vmin[d] = fminf(vmin[d], x);
          }
        for (int64_t d = 0; d < D; ++d) {
          const float amax = centred_amax(vmax[d], vmin[d], vmean[d]);
          vsp[bh * D + d] = fp8_scale(amax);
          const float inv = fp8_inv_scale(amax);
          uint8_t* row = v8p + (bh * D + d) * s.Sk_pad;
          for (int64_t t = 0; t < s.Sk; ++t)
            row[t] = float_to_e4m3((static_cast<float>(vh[t * vst.token + d]) - vmean[d]) * inv);
        }
      }
    });
  });
  return t.as_tuple();
}

at::Tensor fp8_attention_quantized_cpu(const at::Tensor& q8, const at::Tensor& qs, const at::Tensor& k8,
                                       const at::Tensor& ks, const at::Tensor& v8t, const at::Tensor& vs,
                                       const at::Tensor& vm, int64_t q_len, int64_t kv_len,
                                       at::ScalarType out_dtype) {
  const char* op = "ddrl.fp8_attention_quantized";
  const Fp8AttentionShape s = check_fp8_quantized(op, q8, qs, k8, ks, v8t, vs, vm, q_len, kv_len, out_dtype);
  const int64_t D = s.D, Sk = s.Sk;
  at::Tensor out32 = at::empty({s.B, s.H, s.Sq, D}, q8.options().dtype(at::kFloat));
  // The dequantised values of V^T (exact: e4m3 -> fp32), once per head.
  at::Tensor vf = at::empty({s.B, s.H, D, s.Sk_pad}, q8.options().dtype(at::kFloat));
  {
    const uint8_t* src = reinterpret_cast<const uint8_t*>(v8t.data_ptr());
    float* dst = vf.data_ptr<float>();
    at::parallel_for(0, vf.numel(), 65536, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) dst[i] = e4m3_to_float(src[i]);
    });
  }
  const int8_t* q8p = q8.data_ptr<int8_t>();
  const int8_t* k8p = k8.data_ptr<int8_t>();
  const float* qsp = qs.data_ptr<float>();
  const float* ksp = ks.data_ptr<float>();
  const float* vfp = vf.data_ptr<float>();
  const float* vsp = vs.data_ptr<float>();
  const float* vmp = vm.data_ptr<float>();
  float* outp = out32.data_ptr<float>();
  const int64_t rows = s.B * s.H * s.Sq;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> t(kKeyTile), p(kKeyTile), o(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bh = r / s.Sq, i = r % s.Sq;
      const int8_t* qi = q8p + (bh * s.Sq_pad + i) * D;
      const float qsi = qsp[bh * s.Sq_pad + i];
      const int8_t* kh = k8p + bh * s.Sk_pad * D;
      const float* ksh = ksp + bh * s.Sk_pad;
      const float* vh = vfp + bh * D * s.Sk_pad;
      float m = -INFINITY, l = 0.f;
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t j0 = 0; j0 < Sk; j0 += kKeyTile) {
        const int64_t n = std::min<int64_t>(kKeyTile, Sk - j0);
        float tile_max = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          const int8_t* kj = kh + (j0 + j) * D;
          int32_t dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += static_cast<int32_t>(qi[d]) * static_cast<int32_t>(kj[d]);
          t[j] = logit(dot, qsi, ksh[j0 + j]);
          tile_max = fmaxf(tile_max, t[j]);
        }
        const float m_new = fmaxf(m, tile_max);
        const float alpha = rescale_factor(m, m_new);
        float rowsum = 0.f;
        for (int64_t j = 0; j < n; ++j) {
          p[j] = e4m3_to_float(quant_p(t[j], m_new));
          rowsum += p[j];
        }
        l = mul_add_rn(l, alpha, rowsum);
        for (int64_t d = 0; d < D; ++d) {
          const float* vd = vh + d * s.Sk_pad + j0;
          float pv = 0.f;
          for (int64_t j = 0; j < n; ++j) pv += p[j] * vd[j];
          o[d] = mul_add_rn(o[d], alpha, pv);
        }
        m = m_new;
      }
      float* out_row = outp + r * D;
      for (int64_t d = 0; d < D; ++d) out_row[d] = finalize(o[d], l, vsp[bh * D + d], vmp[bh * D + d]);
    }
  });
  return out_dtype == at::kFloat ? out32 : out32.to(out_dtype);
}

}  // namespace
}  // namespace ddrl::cpu

TORCH_LIBRARY_IMPL(ddrl, CPU, m) {
  m.impl("fp8_attention_quantize", &ddrl::cpu::fp8_attention_quantize_cpu);
  m.impl("fp8_attention_quantized", &ddrl::cpu::fp8_attention_quantized_cpu);
}
