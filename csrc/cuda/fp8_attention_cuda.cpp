// CUDA implementations of ddrl::fp8_attention_quantize / fp8_attention_quantized: checks, device
// guard, current stream, then the torch-free launchers (fp8_attention_quant.cu, and
// cutlass/fp8_attention_sm90.cu when the build had CUTLASS and sm_90a: DDRL_WITH_FP8_SM90).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../fp8_attention_inputs.h"
#include "../row_inputs.h"
#include "ddrl/fp8_attention_math.h"
#include "ddrl/fp8_attention_params.h"

namespace ddrl::cuda {
namespace {

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fp8_attention_quantize_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            double softmax_scale) {
  const char* op = "ddrl.fp8_attention_quantize";
  const Fp8AttentionShape s = check_fp8_attention_inputs(op, q_in, k_in, v_in);
  TORCH_CHECK(softmax_scale > 0 && std::isfinite(softmax_scale), op,
              ": 'softmax_scale' must be positive, got ", softmax_scale);
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const auto opts = q.options();
  // Every element, padding included, is written by the kernels.
  at::Tensor q8 = at::empty({s.B, s.H, s.Sq_pad, s.D}, opts.dtype(at::kChar));
  at::Tensor qs = at::empty({s.B, s.H, s.Sq_pad}, opts.dtype(at::kFloat));
  at::Tensor k8 = at::empty({s.B, s.H, s.Sk_pad, s.D}, opts.dtype(at::kChar));
  at::Tensor ks = at::empty({s.B, s.H, s.Sk_pad}, opts.dtype(at::kFloat));
  at::Tensor v8t = at::empty({s.B, s.H, s.D, s.Sk_pad}, opts.dtype(at::kByte));
  at::Tensor vs = at::empty({s.B, s.H, s.D}, opts.dtype(at::kFloat));
  at::Tensor vm = at::empty({s.B, s.H, s.D}, opts.dtype(at::kFloat));
  const int64_t bh = s.B * s.H;
  at::Tensor ws = at::empty({std::max<int64_t>(fp8_quantize_workspace_floats(bh, s.Sk, s.D), 1)}, opts.dtype(at::kFloat));
  Fp8QuantizeParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dtype = to_ddrl_dtype(q.scalar_type());
  p.bh = bh, p.sq = s.Sq, p.sk = s.Sk, p.sq_pad = s.Sq_pad, p.sk_pad = s.Sk_pad;
  p.d = static_cast<int>(s.D);
  p.logit_factor = fp8attn::logit_factor(static_cast<float>(softmax_scale), p.d);
  p.q8 = q8.data_ptr<int8_t>();
  p.q_scale = qs.data_ptr<float>();
  p.k8 = k8.data_ptr<int8_t>();
  p.k_scale = ks.data_ptr<float>();
  p.v8t = v8t.data_ptr<uint8_t>();
  p.v_scale = vs.data_ptr<float>();
  p.v_mean = vm.data_ptr<float>();
  p.workspace = ws.data_ptr<float>();
  const int err = launch_fp8_quantize(p, current_stream());
  TORCH_CHECK(err == 0, op, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {q8, qs, k8, ks, v8t, vs, vm};
}

at::Tensor fp8_attention_quantized_cuda(const at::Tensor& q8, const at::Tensor& qs, const at::Tensor& k8,
                                        const at::Tensor& ks, const at::Tensor& v8t, const at::Tensor& vs,
                                        const at::Tensor& vm, int64_t q_len, int64_t kv_len,
                                        at::ScalarType out_dtype) {
  const char* op = "ddrl.fp8_attention_quantized";
  const Fp8AttentionShape s = check_fp8_quantized(op, q8, qs, k8, ks, v8t, vs, vm, q_len, kv_len, out_dtype);
  c10::cuda::CUDAGuard guard(q8.device());
#ifdef DDRL_WITH_FP8_SM90
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q8.get_device());
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q8.get_device());
  TORCH_CHECK(major == 9 && minor == 0, op, ": the CUDA kernel needs an sm_90 (Hopper) GPU; device ",
              q8.get_device(), " is sm_", major, minor, ". Use the CPU emulation or backend='sdpa'");
  at::Tensor out = at::empty({s.B, s.H, s.Sq, s.D}, q8.options().dtype(out_dtype));
  Fp8AttentionParams p{};
  p.q8 = q8.data_ptr<int8_t>();
  p.q_scale = qs.data_ptr<float>();
  p.k8 = k8.data_ptr<int8_t>();
  p.k_scale = ks.data_ptr<float>();
  p.v8t = v8t.data_ptr<uint8_t>();
  p.v_scale = vs.data_ptr<float>();
  p.v_mean = vm.data_ptr<float>();
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
