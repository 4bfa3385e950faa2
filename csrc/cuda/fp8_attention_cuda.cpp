// CUDA implementations of ddrl::fp8_attention_quantize / fp8_attention_quantized: checks, device
// guard, current stream, then the torch-free launchers (fp8_attention_quant.cu, and
// cutlass/fp8_attention_sm90.cu when the build had CUTLASS and sm_90a: DDRL_WITH_FP8_SM90).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <array>
#include <atomic>

#include "../fp8_attention_inputs.h"
#include "../row_inputs.h"
#include "ddrl/fp8_attention_math.h"
#include "ddrl/fp8_attention_params.h"

namespace ddrl::cuda {
namespace {

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

#ifdef DDRL_WITH_FP8_SM90
// (major, minor) of a device, read from the runtime once per device (a call's check is then free).
std::pair<int, int> compute_capability(int dev) {
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<int>, kMaxDevices> cached{};  // 0 = not read yet, else 1 + 10 * major + minor
  if (dev >= 0 && dev < kMaxDevices) {
    if (const int c = cached[dev].load(std::memory_order_acquire); c != 0) return {(c - 1) / 10, (c - 1) % 10};
  }
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (dev >= 0 && dev < kMaxDevices && major > 0) cached[dev].store(1 + 10 * major + minor, std::memory_order_release);
  return {major, minor};
}
#endif

// The quantized tensors' pointers, for the pre-pass (writes them) and the attention (reads them).
template <class Params>
void set_quantized_pointers(Params& p, const Fp8Quantized& t) {
  p.q8 = t.q8.data_ptr<int8_t>();
  p.q_scale = t.q_scale.data_ptr<float>();
  p.k8 = t.k8.data_ptr<int8_t>();
  p.k_scale = t.k_scale.data_ptr<float>();
  p.v8t = t.v8t.data_ptr<uint8_t>();
  p.v_scale = t.v_scale.data_ptr<float>();
  p.v_mean = t.v_mean.data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fp8_attention_quantize_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            double softmax_scale) {
  const char* op = "ddrl.fp8_attention_quantize";
  const Fp8AttentionShape s = check_fp8_attention_inputs(op, q_in, k_in, v_in, softmax_scale);
  c10::cuda::CUDAGuard guard(q_in.device());
  // The pre-pass reads q, k, v through their strides; only a non-adjacent channel dim is copied.
  const at::Tensor q = fp8_unit_channel_stride(q_in), k = fp8_unit_channel_stride(k_in), v = fp8_unit_channel_stride(v_in);
  const Fp8Quantized t = allocate_fp8_quantized(s, q.options(), /*zeroed=*/false);  // the kernels write all
  const int64_t bh = s.B * s.H;
  at::Tensor ws = at::empty({std::max<int64_t>(fp8_quantize_workspace_floats(bh, s.Sk, s.D), 1)},
                            q.options().dtype(at::kFloat));
  Fp8QuantizeParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_stride = fp8_token_strides(op, "q", q);
  p.k_stride = fp8_token_strides(op, "k", k);
  p.v_stride = fp8_token_strides(op, "v", v);
  p.dtype = to_ddrl_dtype(q.scalar_type());
  p.bh = bh, p.heads = s.H, p.sq = s.Sq, p.sk = s.Sk, p.sq_pad = s.Sq_pad, p.sk_pad = s.Sk_pad;
  p.d = static_cast<int>(s.D);
  p.logit_factor = fp8attn::logit_factor(static_cast<float>(softmax_scale), p.d);
  set_quantized_pointers(p, t);
  p.workspace = ws.data_ptr<float>();
  const int err = launch_fp8_quantize(p, current_stream());
  TORCH_CHECK(err == 0, op, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return t.as_tuple();
}

at::Tensor fp8_attention_quantized_cuda(const at::Tensor& q8, const at::Tensor& qs, const at::Tensor& k8,
                                        const at::Tensor& ks, const at::Tensor& v8t, const at::Tensor& vs,
                                        const at::Tensor& vm, int64_t q_len, int64_t kv_len,
                                        at::ScalarType out_dtype) {
  const char* op = "ddrl.fp8_attention_quantized";
  const Fp8AttentionShape s = check_fp8_quantized(op, q8, qs, k8, ks, v8t, vs, vm, q_len, kv_len, out_dtype);
  c10::cuda::CUDAGuard guard(q8.device());
#ifdef DDRL_WITH_FP8_SM90
  const auto [major, minor] = compute_capability(q8.get_device());
  TORCH_CHECK(major == 9 && minor == 0, op, ": the CUDA kernel needs an sm_90 (Hopper) GPU; device ",
              q8.get_device(), " is sm_", major, minor, ". Use the CPU emulation or backend='sdpa'");
  at::Tensor out = at::empty({s.B, s.H, s.Sq, s.D}, q8.options().dtype(out_dtype));
  Fp8AttentionParams p{};
  set_quantized_pointers(p, Fp8Quantized{q8, qs, k8, ks, v8t, vs, vm});
  p.bh = s.B * s.H, p.sq = s.Sq, p.sk = s.Sk, p.sq_pad = s.Sq_pad, p.sk_pad = s.Sk_pad;
  p.d = static_cast<int>(s.D);
  p.out_dtype = to_ddrl_dtype(out_dtype);
  p.out = out.data_ptr();
  const int err = launch_fp8_attention_sm90(p, current_stream());
  TORCH_CHECK(err == 0, op, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return out;
#else
  TORCH_CHECK(false, op, ": the sm_90a kernel was not built (it needs the nvidia-cutlass wheel and 9.0a in "
              "TORCH_CUDA_ARCH_LIST at build time; see `python -m ddrl_engine.info`). Use the CPU "
              "emulation or backend='sdpa'");
  (void)s;
  return {};
#endif
}

}  // namespace
}  // namespace ddrl::cuda

TORCH_LIBRARY_IMPL(ddrl, CUDA, m) {
  m.impl("fp8_attention_quantize", &ddrl::cuda::fp8_attention_quantize_cuda);
  m.impl("fp8_attention_quantized", &ddrl::cuda::fp8_attention_quantized_cuda);
}
