"""Plain PyTorch references of the fused ops, computed in float64 (tests and benchmarks).

`*_eager` are the same math written the way public frameworks write it (several fp32 passes),
the baseline the benchmarks compare against and what `torch.compile` is given.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _rows(v, n: int, like: Tensor, dtype) -> Tensor:
    t = v if isinstance(v, Tensor) else torch.full((n,), float(v), device=like.device)
    return t.to(dtype).reshape(-1, *([1] * (like.dim() - 1)))


def diffusion_loss_ref(pred, x0, noise, *, noise_coef, data_coef, weight=None, reduction="mean", dtype=torch.float64):
    n = pred.shape[0]
    target = _rows(noise_coef, n, pred, dtype) * noise.to(dtype) + _rows(data_coef, n, pred, dtype) * x0.to(dtype)
    losses = ((pred.to(dtype) - target) ** 2).reshape(n, -1).mean(dim=1)
    if weight is not None:
        losses = losses * _rows(weight, n, losses, dtype).reshape(-1)
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()


def step_logprob_ref(x_next, x, model_out, *, x_coef, out_coef, std, offset=None, reduction="mean", dtype=torch.float64):
    n = x_next.shape[0]
    mu = _rows(x_coef, n, x, dtype) * x.to(dtype) + _rows(out_coef, n, x, dtype) * model_out.to(dtype)
    if offset is not None:
        mu = mu + offset.to(dtype)
    s = _rows(std, n, x, dtype)
    lp = -((x_next.to(dtype) - mu) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    lp = lp.reshape(n, -1)
    return lp.mean(dim=1) if reduction == "mean" else lp.sum(dim=1)


def diffusion_loss_eager(pred, x0, noise, *, noise_coef, data_coef, weight=None, reduction="mean"):
    """The usual eager implementation: fp32 upcast, materialised target, F.mse_loss."""
    return diffusion_loss_ref(pred, x0, noise, noise_coef=noise_coef, data_coef=data_coef, weight=weight,
                              reduction=reduction, dtype=torch.float32)


def step_logprob_eager(x_next, x, model_out, *, x_coef, out_coef, std, offset=None, reduction="mean"):
    """The usual eager implementation (Flow-GRPO style): fp32 upcast, mu materialised, then log-density."""
    return step_logprob_ref(x_next, x, model_out, x_coef=x_coef, out_coef=out_coef, std=std, offset=offset,
                            reduction=reduction, dtype=torch.float32)


def attention_ref(q, k, v, *, scale=None, dtype=torch.float64):
    """Softmax attention over [B, H, S, D] in `dtype` (float64 by default): the accuracy yardstick."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bhid,bhjd->bhij", q.to(dtype), k.to(dtype)) * scale
    return torch.einsum("bhij,bhjd->bhid", torch.softmax(s, dim=-1), v.to(dtype))


def _fp8_round(x, amax, fp8_dtype):
    """x quantised to `fp8_dtype` with the scale amax/max_finite (amax broadcast), dequantised."""
    fmax = torch.finfo(fp8_dtype).max
    s = (amax / fmax).clamp_min(1e-30)
    return (x / s).clamp(-fmax, fmax).to(fp8_dtype).to(x.dtype) * s


def fp8_per_tensor_attention_sim(q, k, v, *, scale=None, block=None):
    """Simulated FP8 attention as FlashAttention-3's FP8 path does it (the baseline the scheme must
    beat): Q, K, V e4m3 with one scale per tensor (or per block of `block` tokens for Q and K), P
    cast to e4m3 without rescaling, fp32 math elsewhere."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    e4m3 = torch.float8_e4m3fn
    q32, k32, v32 = q.float(), k.float(), v.float()
    if block is None:
        qd = _fp8_round(q32, q32.abs().amax(), e4m3)
        kd = _fp8_round(k32, k32.abs().amax(), e4m3)
    else:
        def blocked(x):
            B, H, S, D = x.shape
            pad = (-S) % block
            xp = torch.nn.functional.pad(x, (0, 0, 0, pad)).reshape(B, H, -1, block, D)
            amax = xp.abs().amax(dim=(-1, -2), keepdim=True)
            return _fp8_round(xp, amax, e4m3).reshape(B, H, -1, D)[:, :, :S]
        qd, kd = blocked(q32), blocked(k32)
    vd = _fp8_round(v32, v32.abs().amax(), e4m3)
    s = torch.einsum("bhid,bhjd->bhij", qd, kd) * scale
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    l = p.sum(dim=-1, keepdim=True)
    pd = p.to(e4m3).float()
    return torch.einsum("bhij,bhjd->bhid", pd, vd) / l
