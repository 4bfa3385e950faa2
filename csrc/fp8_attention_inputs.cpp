#include "fp8_attention_inputs.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "ddrl/fp8_attention_math.h"

namespace ddrl {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_layout(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                  at::IntArrayRef shape, const at::Device& device) {
  TORCH_CHECK(t.defined(), op, ": '", name, "' is an undefined tensor");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": '", name, "' must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": '", name, "' must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.device() == device, op, ": '", name, "' is on ", t.device(), " but 'q8' is on ", device);
  TORCH_CHECK(t.is_contiguous(), op, ": '", name, "' must be contiguous");
}

}  // namespace

Fp8AttentionShape check_fp8_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, double softmax_scale) {
  TORCH_CHECK(softmax_scale > 0 && std::isfinite(softmax_scale), op,
              ": 'softmax_scale' must be positive, got ", softmax_scale);
  const std::pair<const char*, const at::Tensor*> args[] = {{"q", &q}, {"k", &k}, {"v", &v}};
  for (const auto& [name, t] : args) {
    TORCH_CHECK(t->defined(), op, ": '", name, "' is an undefined tensor");
    TORCH_CHECK(t->dim() == 4, op, ": '", name, "' must have shape [B, H, S, D], got ", t->sizes());
    TORCH_CHECK(is_supported_float(t->scalar_type()), op, ": '", name,
                "' must be bfloat16, float16 or float32, got ", t->scalar_type());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": '", name, "' is ", t->scalar_type(),
                " but 'q' is ", q.scalar_type(), "; q, k, v must share a dtype");
    TORCH_CHECK(t->device() == q.device(), op, ": '", name, "' is on ", t->device(), " but 'q' is on ",
                q.device(), "; q, k, v must share a device");
  }
  Fp8AttentionShape s;
  s.B = q.size(0), s.H = q.size(1), s.Sq = q.size(2), s.D = q.size(3), s.Sk = k.size(2);
  TORCH_CHECK(k.size(0) == s.B && k.size(1) == s.H && v.size(0) == s.B && v.size(1) == s.H, op,
              ": q, k, v must share [B, H]: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(v.size(2) == s.Sk, op, ": 'k' has ", s.Sk, " tokens but 'v' has ", v.size(2));
  TORCH_CHECK(k.size(3) == s.D && v.size(3) == s.D, op, ": q, k, v must share the head dim D: q ",
              q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(s.D == 64 || s.D == 128, op, ": head dim D must be 64 or 128, got ", s.D);
  TORCH_CHECK(s.Sk > 0, op, ": 'k' and 'v' need at least one token (softmax over no keys)");
  s.Sq_pad = fp8attn::padded_len(s.Sq);
  s.Sk_pad = fp8attn::padded_len(s.Sk);
  return s;
}

at::Tensor fp8_unit_channel_stride(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

Fp8TokenStrides fp8_token_strides(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, op, ": '", name, "' must have channel stride 1 (its last dim, D, ",
              "adjacent in memory), got strides ", t.strides());
  return {t.stride(0), t.stride(1), t.stride(2)};
}

Fp8AttentionShape check_fp8_quantized(const char* op, const at::Tensor& q8, const at::Tensor& q_scale,
                                      const at::Tensor& k8, const at::Tensor& k_scale,
                                      const at::Tensor& v8t, const at::Tensor& v_scale,
                                      const at::Tensor& v_mean, int64_t q_len, int64_t kv_len,
                                      at::ScalarType out_dtype) {
  TORCH_CHECK(q8.defined() && q8.dim() == 4, op, ": 'q8' must have shape [B, H, S_q_pad, D]");
  TORCH_CHECK(k8.defined() && k8.dim() == 4, op, ": 'k8' must have shape [B, H, S_k_pad, D]");
  Fp8AttentionShape s;
  s.B = q8.size(0), s.H = q8.size(1), s.Sq_pad = q8.size(2), s.D = q8.size(3);
  s.Sk_pad = k8.size(2);
  s.Sq = q_len, s.Sk = kv_len;
  TORCH_CHECK(s.D == 64 || s.D == 128, op, ": head dim D must be 64 or 128, got ", s.D);
  TORCH_CHECK(q_len >= 0 && fp8attn::padded_len(q_len) == s.Sq_pad, op, ": q_len=", q_len,
              " does not match 'q8' padded to ", s.Sq_pad, " tokens");
  TORCH_CHECK(kv_len > 0 && fp8attn::padded_len(kv_len) == s.Sk_pad, op, ": kv_len=", kv_len,
              " does not match 'k8' padded to ", s.Sk_pad, " tokens");
  TORCH_CHECK(is_supported_float(out_dtype), op, ": 'out_dtype' must be bfloat16, float16 or float32");
  const at::Device dev = q8.device();
  check_layout(op, "q8", q8, at::kChar, {s.B, s.H, s.Sq_pad, s.D}, dev);
  check_layout(op, "q_scale", q_scale, at::kFloat, {s.B, s.H, s.Sq_pad}, dev);
  check_layout(op, "k8", k8, at::kChar, {s.B, s.H, s.Sk_pad, s.D}, dev);
  check_layout(op, "k_scale", k_scale, at::kFloat, {s.B, s.H, s.Sk_pad}, dev);
  check_layout(op, "v8t", v8t, at::kByte, {s.B, s.H, s.D, s.Sk_pad}, dev);
  check_layout(op, "v_scale", v_scale, at::kFloat, {s.B, s.H, s.D}, dev);
  check_layout(op, "v_mean", v_mean, at::kFloat, {s.B, s.H, s.D}, dev);
  return s;
}

Fp8Quantized allocate_fp8_quantized(const Fp8AttentionShape& s, const at::TensorOptions& opts, bool zeroed) {
  const auto make = [&](at::IntArrayRef shape, at::ScalarType dtype) {
    return zeroed ? at::zeros(shape, opts.dtype(dtype)) : at::empty(shape, opts.dtype(dtype));
  };
  return {make({s.B, s.H, s.Sq_pad, s.D}, at::kChar), make({s.B, s.H, s.Sq_pad}, at::kFloat),
          make({s.B, s.H, s.Sk_pad, s.D}, at::kChar), make({s.B, s.H, s.Sk_pad}, at::kFloat),
          make({s.B, s.H, s.D, s.Sk_pad}, at::kByte), make({s.B, s.H, s.D}, at::kFloat),
          make({s.B, s.H, s.D}, at::kFloat)};
}

}  // namespace ddrl
