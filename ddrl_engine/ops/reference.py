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
