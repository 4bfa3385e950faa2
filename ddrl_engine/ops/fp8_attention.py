"""ddrl::fp8_attention: FP8/INT8 softmax attention for rollouts (forward only).

Two registered steps, so the pre-pass can be timed and tested on its own:
  fp8_attention_quantize(q, k, v, softmax_scale) -> QuantizedQKV (INT8 Q and K per token after
      K-centring and a random-sign Hadamard rotation; V centred, FP8 e4m3 per channel, transposed)
  fp8_attention_quantized(*QuantizedQKV, q_len, kv_len, out_dtype) -> [B, H, q_len, D]
The scheme is documented once, in csrc/include/ddrl/fp8_attention_math.h. On CPU both steps are an
exact emulation of the CUDA kernels; on CUDA they need an sm_90 GPU and the kernel built with CUTLASS.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ddrl_engine import _loader
from ddrl_engine.ops import selftest

_loader.load_extension()
_OP = "ddrl.fp8_attention"
KEY_TILE = 128  # fp8attn::kKeyTile: padding granule of the quantised tensors
HEAD_DIMS = (64, 128)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class QuantizedQKV(NamedTuple):
    q8: Tensor  # int8 [B, H, Sq_pad, D]
    q_scale: Tensor  # fp32 [B, H, Sq_pad], includes softmax_scale * log2(e) / D
    k8: Tensor  # int8 [B, H, Sk_pad, D]
    k_scale: Tensor  # fp32 [B, H, Sk_pad]
    v8t: Tensor  # uint8 [B, H, D, Sk_pad]: e4m3fn bits (.view(torch.float8_e4m3fn) to decode)
    v_scale: Tensor  # fp32 [B, H, D]
    v_mean: Tensor  # fp32 [B, H, D]


def padded_len(s: int) -> int:
    return (s + KEY_TILE - 1) // KEY_TILE * KEY_TILE


@torch.library.register_fake("ddrl::fp8_attention_quantize")
def _(q, k, v, softmax_scale):
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    sq, sk = padded_len(Sq), padded_len(Sk)
    f32 = dict(dtype=torch.float32, device=q.device)
    return (
        q.new_empty((B, H, sq, D), dtype=torch.int8), q.new_empty((B, H, sq), **f32),
        q.new_empty((B, H, sk, D), dtype=torch.int8), q.new_empty((B, H, sk), **f32),
        q.new_empty((B, H, D, sk), dtype=torch.uint8),
        q.new_empty((B, H, D), **f32), q.new_empty((B, H, D), **f32),
    )


@torch.library.register_fake("ddrl::fp8_attention_quantized")
def _(q8, q_scale, k8, k_scale, v8t, v_scale, v_mean, q_len, kv_len, out_dtype):
    B, H, _, D = q8.shape
    return q8.new_empty((B, H, q_len, D), dtype=out_dtype)


def fp8_cuda_status() -> tuple[bool, str]:
    """Whether the CUDA fp8 attention can run here, and why not when it cannot."""
    info = _loader.build_info()
    if not info.get("with_cuda"):
        return False, f"extension built without CUDA ({info.get('no_cuda_reason')})"
    if not info.get("fp8_attention_kernel"):
        return False, f"sm_90a kernel not built ({info.get('fp8_attention_kernel_reason', 'older build')})"
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return False, f"needs an sm_90 (Hopper) GPU, this one is sm_{major}{minor}"
    return True, ""


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> float:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{_OP}: '{name}' must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{_OP}: '{name}' must have shape [B, H, S, D], got {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{_OP}: '{name}' must be bfloat16, float16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{_OP}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{_OP}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or q.shape[:2] != v.shape[:2]:
        raise ValueError(f"{_OP}: q, k, v must share [B, H]: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{_OP}: 'k' has {k.shape[2]} tokens but 'v' has {v.shape[2]}")
    D = q.shape[3]
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"{_OP}: q, k, v must share the head dim: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if D not in HEAD_DIMS:
        raise ValueError(f"{_OP}: head dim D must be one of {HEAD_DIMS}, got {D}")
    if k.shape[2] == 0:
        raise ValueError(f"{_OP}: 'k' and 'v' need at least one token")
    if scale is None:
        return 1.0 / math.sqrt(D)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{_OP}: 'scale' must be a positive finite number, got {scale!r}")
    return float(scale)


def _check_no_grad(*tensors: Tensor) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{_OP} is forward only (rollouts): it has no gradient. Run it under torch.no_grad(), "
            "or use the trainable bf16 backend: ddrl_engine.attention(q, k, v, backend='sdpa')"
        )


def fp8_attention_quantize(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None) -> QuantizedQKV:
    """The quantisation pre-pass alone (for timing and for comparing CPU and GPU bit for bit)."""
    softmax_scale = _check_inputs(q, k, v, scale)
    return QuantizedQKV(*torch.ops.ddrl.fp8_attention_quantize.default(q.detach(), k.detach(), v.detach(), softmax_scale))


def fp8_attention_quantized(qkv: QuantizedQKV, q_len: int, kv_len: int, out_dtype: torch.dtype) -> Tensor:
    """The attention step on already quantised inputs."""
    return torch.ops.ddrl.fp8_attention_quantized.default(*qkv, q_len, kv_len, out_dtype)


def fp8_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None) -> Tensor:
    """Non-causal softmax attention with INT8 QK^T and FP8 PV; q, k, v [B, H, S, D], D in {64, 128}.

    Views are read through their strides (e.g. a [B, S, H, D] projection transposed to [B, H, S, D]);
    only a tensor whose last dim is not unit-stride is copied first.

    Returns [B, H, S_q, D] in q's dtype. Forward only (raises when autograd would need a gradient).
    scale: softmax scale, default 1/sqrt(D).
    """
    softmax_scale = _check_inputs(q, k, v, scale)
    _check_no_grad(q, k, v)
    if selftest.use_reference():  # DDRL_ENGINE_OPS=reference: exact attention (ops.selftest)
        return selftest.reference_attention(q, k, v, softmax_scale)
    selftest.ensure_checked(q.device)
    qkv = QuantizedQKV(*torch.ops.ddrl.fp8_attention_quantize.default(q, k, v, softmax_scale))
    return torch.ops.ddrl.fp8_attention_quantized.default(*qkv, q.shape[2], k.shape[2], q.dtype)
