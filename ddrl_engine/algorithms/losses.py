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


def clipped_policy_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_eps: float, *,
                        log_ratio_scale: float | Tensor | None = None) -> tuple[Tensor, PolicyLossStats]:
    """mean_batch max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(lp - lp_old).

    log_ratio_scale: rho = exp(c (lp - lp_old)) instead (a float or [B]); c = 2 s_k^2 turns a mean-reduced
    log-density ratio into cosmos-rl's (algorithm.logprob_form = "cosmos", `BaselineForms`). None: c = 1.
    """
    log_ratio = log_prob - old_log_prob.detach()
    if log_ratio_scale is not None:
        log_ratio = log_ratio * log_ratio_scale
    ratio = torch.exp(log_ratio)
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


def data_loss(pred: Tensor, x0: Tensor, noise: Tensor, noise_coef, data_coef, weight=None) -> Tensor:
    """The model's own diffusion loss on off-policy data (the forward-KL regulariser), fp32 scalar.

    The target is noise_coef * noise + data_coef * x0 (the sampler's parametrisation). weight: None, or
    a per-row weight (a float, 0-dim or [B]) of each row's per-element mean before the batch mean.
    """
    if weight is None:
        return ops.diffusion_loss(pred, x0, noise, noise_coef=noise_coef, data_coef=data_coef, reduction="mean")
    return ops.diffusion_loss(pred, x0, noise, noise_coef=noise_coef, data_coef=data_coef, weight=weight,
                              reduction="mean")


DATA_WEIGHTINGS = ("none", "edm")


def edm_weight(sigma: Tensor) -> Tensor:
    """cosmos-rl's EDM loss weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 with sigma_data = 1:
    (s^2 + 1) / s^2, computed in float64, returned in float32 (same shape as sigma)."""
    s2 = sigma.double() ** 2
    return ((s2 + 1) / s2).float()


def policy_data_loss(policy, x0: Tensor, cond, eps: Tensor, level: NoiseLevel, weighting: str = "none") -> Tensor:
    """The policy's diffusion loss on data x0 at one noise level of the forward process (fp32 scalar):
    the forward-KL regulariser of DDRL, and the held-out data loss and pretraining loss.

    x = level.noised(x0, eps); pred = policy(x, t, cond); loss = mean (pred - target)^2 with the
    level's target. level: `sampler.level(k)` (k an int, or a long [B] of per-row levels) or any
    NoiseLevel (e.g. `RectifiedFlowSDE.continuous_level(t)`). The one place the trainer, the evaluator
    and pretraining compute it.
    weighting (algorithm.data_weighting): "none" (default), or "edm": each row's loss times
    `edm_weight(level.noise_scale)` = (s^2 + 1) / s^2, meant for EDM levels (x = x0 + s eps, target x0;
    the Trainer checks its sampler through `BaselineForms`). The held-out monitor stays unweighted.
    """
    if weighting not in DATA_WEIGHTINGS:
        raise ValueError(f"policy_data_loss: 'weighting' must be one of {DATA_WEIGHTINGS}, got {weighting!r}")
    t = level.network_levels(x0.shape[0], x0.device)
    pred = policy(level.noised(x0, eps), t, cond)
    if weighting == "none":
        return data_loss(pred, x0, eps, level.target_noise, level.target_data)
    return data_loss(pred, x0, eps, level.target_noise, level.target_data, weight=edm_weight(level.noise_scale))


def combine(policy: Tensor | None, data: Tensor | None, kl: Tensor | None, *, beta_data: float, beta_kl: float,
            num_trained_steps: int, loss_scale: float = 1.0) -> Tensor:
    """L = loss_scale (L_pol + beta_data L_data + beta_kl L_kl) / |trained steps|; absent terms count as 0
    (loss_scale: algorithm.loss_scale, 1 = none)."""
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
    total = sum(terms) / num_trained_steps
    return total if loss_scale == 1.0 else total * loss_scale


@dataclass(frozen=True)
class BaselineForms:
    """The per-step factors of the baseline forms for one sampler (docs/method.md section 13), checked
    against it: `BaselineForms.make(algo, sampler)` raises a ValueError naming the field when a form does
    not fit the sampler. Python floats per step k (None: the default form, nothing is applied, so the
    numerics are bitwise today's):

    kl_scale[k] = |dt_k| = t_k - t_{k+1} of a rectified-flow SDE's network levels (algorithm.kl_form =
        "flow_grpo": Flow-GRPO's KL is the exact one times |dt_k|);
    log_ratio_scale[k] = 2 s_k^2 (algorithm.logprob_form = "cosmos": with a mean-reduced log-density,
        lp_cosmos - lp_cosmos_old = 2 s_k^2 (lp - lp_old) exactly, the constants cancelling);
    data_weighting: algorithm.data_weighting, for `policy_data_loss` ("edm" is checked to be an EDM
        forward process x = x0 + s eps with an x0 target at every step level).
    """

    kl_scale: tuple[float, ...] | None = None
    log_ratio_scale: tuple[float, ...] | None = None
    data_weighting: str = "none"

    @classmethod
    def make(cls, algo, sampler) -> "BaselineForms":
        from ddrl_engine.sampling.rectified_flow import RectifiedFlowSDE

        kl_scale = log_ratio_scale = None
        name = f"{type(sampler).__name__} ({getattr(sampler, 'name', '')!r})"
        if algo.kl_form == "flow_grpo":
            if not isinstance(sampler, RectifiedFlowSDE):
                raise ValueError(f"algorithm.kl_form = 'flow_grpo' scales the KL by |dt_k| of the rectified-flow "
                                 f"time, so it needs sampler.name = 'rectified_flow_sde'; got {name}. (Flow-GRPO's "
                                 "KL with its CPS sampler is already the exact one: kl_form = 'exact'.)")
            t = [float(sampler.network_level(k)) for k in range(sampler.num_steps + 1)]
            kl_scale = tuple(abs(t[k] - t[k + 1]) for k in range(sampler.num_steps))
        if algo.logprob_form == "cosmos":
            s = [float(sampler.coefs(k).std) for k in range(sampler.num_steps)]
            log_ratio_scale = tuple(2.0 * v * v for v in s)
        if algo.data_weighting == "edm":
            for k in range(sampler.num_steps):
                lv = sampler.level(k)
                a, s = float(lv.data_scale), float(lv.noise_scale)
                tn, td = float(lv.target_noise), float(lv.target_data)
                if not (a == 1.0 and s > 0 and tn == 0.0 and td == 1.0):
                    raise ValueError(f"algorithm.data_weighting = 'edm' weights the data loss by (s^2 + 1) / s^2 for "
                                     f"the EDM forward process x = x0 + s eps with an x0 target, so it needs an EDM "
                                     f"sampler (edm_churn, edm_2ab); {name} has at level {k} x = {a:g} x0 + {s:g} eps "
                                     f"and target {tn:g} eps + {td:g} x0")
        return cls(kl_scale, log_ratio_scale, algo.data_weighting)

    def kl(self, kl: Tensor, k: int) -> Tensor:
        """The per-row KL [B] of step k in the configured form (the input itself for "exact")."""
        return kl if self.kl_scale is None else kl * self.kl_scale[k]

    @property
    def data_kwargs(self) -> dict:
        """The keyword arguments of `policy_data_loss` for data_weighting ({} for "none": the plain call)."""
        return {} if self.data_weighting == "none" else {"weighting": self.data_weighting}

    def log_ratio(self, k: int) -> float | None:
        """The log-ratio scale of step k for `clipped_policy_loss` (None for "density")."""
        return None if self.log_ratio_scale is None else self.log_ratio_scale[k]
