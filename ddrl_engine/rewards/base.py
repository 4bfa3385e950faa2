"""The reward interface, weighted combinations, and the check every reward batch goes through.

A reward maps final samples and their conditions to one float32 score per sample. Rewards are
black boxes to DDRL (no gradient flows through them), so they run under `torch.no_grad()`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Reward(Protocol):
    """`name` identifies the reward in logs and errors; `__call__(samples [B, ...], cond [B])` -> [B] float32."""

    name: str

    def __call__(self, samples: Tensor, cond: Tensor) -> Tensor: ...


class InvalidRewardError(ValueError, TypeError):
    """A reward broke its contract: not a floating-point tensor of shape [B], or NaN/inf values under
    on_invalid="error". Deterministic (a retry gives the same), so reward workers do not retry it.
    A ValueError and a TypeError, so code catching either keeps working."""


def validate_rewards(
    r: Tensor,
    *,
    name: str = "reward",
    batch_size: Optional[int] = None,
    on_invalid: Literal["error", "drop"] = "error",
) -> tuple[Tensor, Tensor, int]:
    """Checks one reward batch; returns (r as float32, valid_mask [B] bool, n_invalid).

    A reward must be a 1-D floating tensor ([B], B = batch_size when given). NaN/inf values are never
    used silently: on_invalid="error" raises an InvalidRewardError naming the reward; "drop" warns,
    counts them, marks them False in valid_mask and sets them to 0 in the returned r (so sums stay
    finite; callers must still exclude them through the mask). A reward that requires grad is detached
    with a warning (rewards are constants of the policy gradient).
    """
    if on_invalid not in ("error", "drop"):
        raise ValueError(f"on_invalid must be 'error' or 'drop', got {on_invalid!r}")
    if not isinstance(r, Tensor):
        raise InvalidRewardError(f"reward {name!r} returned {type(r).__name__}, expected a torch.Tensor")
    if not r.is_floating_point():
        raise InvalidRewardError(f"reward {name!r} returned dtype {r.dtype}, expected a floating-point tensor")
    if r.dim() != 1 or (batch_size is not None and r.shape[0] != batch_size):
        want = f"[{batch_size}]" if batch_size is not None else "[B]"
        raise InvalidRewardError(f"reward {name!r} returned shape {tuple(r.shape)}, expected {want}")
    if r.requires_grad:
        warnings.warn(f"reward {name!r} returned a tensor that requires grad; detaching it (a reward is a "
                      "constant of the policy gradient: compute it under torch.no_grad())", RuntimeWarning, stacklevel=2)
        r = r.detach()
    r = r.float()
    valid = torch.isfinite(r)
    n_invalid = int((~valid).sum().item())
    if n_invalid:
        msg = f"reward {name!r} returned {n_invalid} non-finite value(s) (NaN/inf) out of {r.shape[0]}"
        if on_invalid == "error":
            raise InvalidRewardError(msg)
        warnings.warn(f"{msg}; dropping them", RuntimeWarning, stacklevel=2)
        r = torch.where(valid, r, torch.zeros_like(r))
    return r, valid, n_invalid


@dataclass
class RewardBatch:
    """The rewards of one batch. components: validated float32 [B] per reward (invalid entries 0);
    valid: [B] bool, finite under every component; n_invalid: count per reward; total: weighted sum."""

    components: dict[str, Tensor]
    valid: Tensor
    n_invalid: dict[str, int]
    total: Tensor


class WeightedReward:
    """sum_i w_i * r_i over several rewards; `evaluate()` also gives each r_i, for per-reward normalisation."""

    def __init__(self, rewards: Sequence[Reward], weights: Optional[Sequence[float]] = None, name: str = "weighted"):
        rewards = list(rewards)
        if not rewards:
            raise ValueError("rewards must hold at least one reward")
        weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        if len(weights) != len(rewards):
            raise ValueError(f"weights has {len(weights)} entries but rewards has {len(rewards)}")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"weights must be finite, got {weights}")
        names = [r.name for r in rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}")
        self.rewards, self.weights, self.name = rewards, weights, name

    @torch.no_grad()
    def evaluate(
        self, samples: Tensor, cond: Tensor, *, on_invalid: Literal["error", "drop"] = "error"
    ) -> RewardBatch:
        """Calls every reward once and validates each (see `validate_rewards`)."""
        batch = samples.shape[0]
        components, n_invalid = {}, {}
        valid = torch.ones(batch, dtype=torch.bool, device=samples.device)
        for r in self.rewards:
            value, ok, n = validate_rewards(r(samples, cond), name=r.name, batch_size=batch, on_invalid=on_invalid)
            components[r.name], n_invalid[r.name] = value, n
            valid &= ok.to(valid.device)
        total = sum(w * components[r.name] for r, w in zip(self.rewards, self.weights))
        return RewardBatch(components, valid, n_invalid, torch.where(valid, total, torch.zeros_like(total)))

    def components(self, samples: Tensor, cond: Tensor) -> dict[str, Tensor]:
        """{reward name: [B] float32}; non-finite values raise."""
        return self.evaluate(samples, cond).components

    def __call__(self, samples: Tensor, cond: Tensor) -> Tensor:
        """The weighted sum [B] float32; non-finite component values raise."""
        return self.evaluate(samples, cond).total
