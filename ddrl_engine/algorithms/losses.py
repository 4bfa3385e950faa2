"""The terms of the DDRL loss for one trained step (docs/method.md).

Functions of tensors; `policy_data_loss` also calls the policy (any `policy(x, t, cond)` callable),
since what "the policy's diffusion loss on data at a noise level" means is the algorithm's business.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ddrl_engine import ops
from ddrl_engine.sampling.base import NoiseLevel


@dataclass
class PolicyLossStats:
    ratio_mean: Tensor
    ratio_max_dev: Tensor  # max |rho - 1|
    clip_frac: Tensor


def clipped_policy_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_eps: float) -> tuple[Tensor, PolicyLossStats]:
    """mean_batch max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(lp - lp_old)."""
    ratio = torch.exp(log_prob - old_log_prob.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = PolicyLossStats(
            ratio_mean=ratio.mean(),
            ratio_max_dev=(ratio - 1).abs().max(),
            clip_frac=((ratio - 1).abs() > clip_eps).float().mean(),
        )
    return loss, stats


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: Tensor, reduction: str = "mean") -> Tensor:
    """KL(N(mean, s^2) || N(ref_mean, s^2)) per row = ||mean - ref_mean||^2 / (2 s^2) (closed form).

    reduction "mean" averages over each row's elements (matching a mean-reduced log-probability),
    "sum" sums them. std: [B] or a float. Returns [B].
    """
    diff = (mean.float() - ref_mean.float().detach()).reshape(mean.shape[0], -1)
    s = std if isinstance(std, Tensor) else torch.full((mean.shape[0],), float(std), device=mean.device)
    per_row = (diff**2).sum(1) if reduction == "sum" else (diff**2).mean(1)
    return per_row / (2 * s.float() ** 2)


def data_loss(pred: Tensor, x0: Tensor, noise: Tensor, noise_coef, data_coef) -> Tensor:
    """The model's own diffusion loss on off-policy data (the forward-KL regulariser), fp32 scalar.

    The target is noise_coef * noise + data_coef * x0 (the sampler's parametrisation).
    """
    return ops.diffusion_loss(pred, x0, noise, noise_coef=noise_coef, data_coef=data_coef, reduction="mean")


def policy_data_loss(policy, x0: Tensor, cond, eps: Tensor, level: NoiseLevel) -> Tensor:
    """The policy's diffusion loss on data x0 at one noise level of the forward process (fp32 scalar):
    the forward-KL regulariser of DDRL, and the held-out data loss and pretraining loss.

    x = level.noised(x0, eps); pred = policy(x, t, cond); loss = mean (pred - target)^2 with the
    level's target. level: `sampler.level(k)` (k an int, or a long [B] of per-row levels) or any
    NoiseLevel (e.g. `RectifiedFlowSDE.continuous_level(t)`). The one place the trainer, the evaluator
    and pretraining compute it.
    """
    t = level.network_levels(x0.shape[0], x0.device)
    pred = policy(level.noised(x0, eps), t, cond)
    return data_loss(pred, x0, eps, level.target_noise, level.target_data)


def combine(policy: Tensor | None, data: Tensor | None, kl: Tensor | None, *, beta_data: float, beta_kl: float,
            num_trained_steps: int) -> Tensor:
    """L = (L_pol + beta_data L_data + beta_kl L_kl) / |trained steps|; absent terms count as 0."""
    if num_trained_steps < 1:
        raise ValueError(f"combine: num_trained_steps must be >= 1, got {num_trained_steps}")
    terms = []
    if policy is not None:
        terms.append(policy)
    if data is not None and beta_data > 0:
        terms.append(beta_data * data)
    if kl is not None and beta_kl > 0:
        terms.append(beta_kl * kl)
    if not terms:
        raise ValueError("combine: no loss term is active (check use_reward, beta_data, beta_kl)")
    return sum(terms) / num_trained_steps
