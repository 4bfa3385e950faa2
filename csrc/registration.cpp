// The schemas of every ddrl op, in one place. Kernels register per backend in
// csrc/cpu/*.cpp and csrc/cuda/*.cpp; the Python side (ddrl_engine/ops) adds fake kernels,
// autograd and the public functions.
#include <Python.h>
#include <torch/library.h>

// Importing ddrl_engine._C loads this library, whose static initialisers register the ops.
// The module itself is empty (the pytorch/extension-cpp pattern).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(ddrl, m) {
  // Per-row mean squared diffusion residual [rows] (fp32) and, when write_grad, the residual
  // pred - target (same shape as pred, in the inputs' common dtype; else empty) for backward.
  m.def(
      "diffusion_loss_rows(Tensor pred, Tensor x0, Tensor noise, Tensor noise_coef, "
      "Tensor data_coef, bool write_grad) -> (Tensor, Tensor)");
  // Per-row Gaussian log-density of x_next under N(mu, std^2) [rows] (fp32) and, when
  // write_grad, (x_next - mu) / std (same shape as x_next, in the inputs' common dtype; else
  // empty) for backward.
  m.def(
      "step_logprob_rows(Tensor x_next, Tensor x, Tensor model_out, Tensor? offset, "
      "Tensor x_coef, Tensor out_coef, Tensor std, bool mean, bool write_grad) -> (Tensor, Tensor)");
  // out[i, ...] = src[i, ...] * scale[i] in fp32, written in `dtype` (the backward pass).
  m.def("scale_rows(Tensor src, Tensor scale, ScalarType dtype) -> Tensor");
  // FP8/INT8 attention (forward only), in two steps so the pre-pass can be timed and tested:
  // quantize q, k, v [B, H, S, D] (scheme: csrc/include/ddrl/fp8_attention_math.h) into
  // q8 int8 [B, H, Sq_pad, D], q_scale [B, H, Sq_pad], k8 int8 [B, H, Sk_pad, D],
  // k_scale [B, H, Sk_pad], v8t e4m3 bits as uint8 [B, H, D, Sk_pad], v_scale [B, H, D], v_mean [B, H, D]
  // (S padded to a multiple of 128 with zeros); then attend -> [B, H, q_len, D] in out_dtype.
  m.def(
      "fp8_attention_quantize(Tensor q, Tensor k, Tensor v, float softmax_scale) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "fp8_attention_quantized(Tensor q8, Tensor q_scale, Tensor k8, Tensor k_scale, Tensor v8t, "
      "Tensor v_scale, Tensor v_mean, SymInt q_len, SymInt kv_len, ScalarType out_dtype) -> Tensor");
}
