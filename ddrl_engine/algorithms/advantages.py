"""Group-normalised advantages (docs/method.md section 5)."""
from __future__ import annotations

import torch
from torch import Tensor


STDS = ("population", "unbiased")


def group_advantages(rewards: Tensor, group_size: int, *, eps: float = 1e-4, clip: float = 5.0,
                     lambda_transform: bool = False, valid: Tensor | None = None,
                     weights: Tensor | None = None, std: str = "population") -> Tensor:
    """rewards: [B] or [R, B] (R reward models), B = groups * group_size with each group contiguous.

    A = (r - mean_G) / (std_G + eps) per reward model, averaged over models (weighted by `weights`
    [R] when given, normalised to sum 1), optionally
    A <- -exp(-A), then clamped to [-clip, clip]. `valid` ([B] bool) excludes dropped samples from
    their group's statistics and gives them advantage 0 (so they contribute no policy gradient).
    std: "population" (sum of squares / n, default) or "unbiased" (/ (n - 1), Bessel's correction, as
    torch.std: DanceGRPO, cosmos-rl), n the group's valid members; a group whose valid rewards are
    all equal (or that has one valid member) gets A = 0 either way.
    """
    if std not in STDS:
        raise ValueError(f"group_advantages: 'std' must be one of {STDS}, got {std!r}")
    r = rewards.float()
    if r.dim() == 1:
        r = r.unsqueeze(0)
    if r.dim() != 2:
        raise ValueError(f"group_advantages: 'rewards' must be [B] or [R, B], got shape {list(rewards.shape)}")
    num_models, batch = r.shape
    if group_size < 1 or batch % group_size:
        raise ValueError(f"group_advantages: batch of {batch} is not a multiple of group_size {group_size}")
    groups = r.reshape(num_models, batch // group_size, group_size)
    mask = torch.ones_like(groups, dtype=torch.bool) if valid is None else valid.reshape(1, -1, group_size).expand_as(groups)
    adv, stats_finite = _normalised(groups, mask, std, eps)
    # Finite rewards of any magnitude give finite, informative advantages: a group whose float32
    # statistics overflow (the squares past |r| ~ 1e19, the sum near 3e38; an infinite std would give
    # A = 0) is normalised in float64 instead; other groups keep their float32 values bit for bit.
    overflow = ~stats_finite & torch.isfinite(torch.where(mask, groups, 0)).all(-1, keepdim=True)
    if bool(overflow.any()):
        adv = torch.where(overflow, _normalised(groups.double(), mask, std, eps)[0].float(), adv)
    if weights is None:
        adv = adv.mean(0)
    else:
        w = weights.to(adv).reshape(num_models, 1, 1)
        adv = (adv * w).sum(0) / w.sum()
    adv = adv.reshape(batch)
    if lambda_transform:
        adv = -torch.exp(-adv)
    adv = adv.clamp(-clip, clip)
    if valid is not None:
        adv = torch.where(valid, adv, torch.zeros_like(adv))
    return adv


def _normalised(groups: Tensor, mask: Tensor, std: str, eps: float) -> tuple[Tensor, Tensor]:
    """(r - mean_G) / (std_G + eps) per group over the valid members, in groups' dtype (0 for a group
    whose valid rewards are all equal), and whether each group's mean and variance are finite."""
    count = mask.sum(-1, keepdim=True).clamp_min(1)
    zeroed = torch.where(mask, groups, torch.zeros_like(groups))
    mean = zeroed.sum(-1, keepdim=True) / count
    # Population (or unbiased) std over the valid members (a group of identical rewards gives A = 0).
    sq = (torch.where(mask, groups - mean, torch.zeros_like(groups)) ** 2).sum(-1, keepdim=True)
    var = sq / count if std == "population" else sq / (count - 1).clamp_min(1)
    denom = var.sqrt() + eps
    # A group whose (valid) rewards are all equal carries no preference: A = 0. Tested on max == min,
    # not on the std: the float32 mean of equal values need not be that value (8 x 0.3), which left a
    # tiny residual that the normalisation blew up to +-1.
    big = torch.finfo(groups.dtype).max
    hi = torch.where(mask, groups, torch.full_like(groups, -big)).amax(-1, keepdim=True)
    lo = torch.where(mask, groups, torch.full_like(groups, big)).amin(-1, keepdim=True)
    informative = (hi > lo) & (denom > 0)
    adv = torch.where(informative, (groups - mean) / denom.clamp_min(1e-30), torch.zeros_like(groups))
    return adv, torch.isfinite(mean) & torch.isfinite(var)
