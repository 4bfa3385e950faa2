"""Classifier-free guidance as a policy: `Guided(policy, scale)` is called like the policy it wraps.

    guided(x, t, cond) = f(x, t, null) + scale * (f(x, t, cond) - f(x, t, null))

Both branches run in ONE batched forward of the inner policy on [x; x], [t; t], [cond; null]; the
combination is computed in fp32 and returned in the policy output's dtype. Anything that takes a policy
(`transition`, `rollout`, `RolloutRunner`, `recompute_log_probs`, `Sampler.finish`) takes a Guided one:
the transition's mean is then the guided one and its log-prob the density of the guided step, so a
rollout and the trainer's recomputation under the same guidance are the same math (ratio exactly 1 at
unchanged weights). No host sync (the null ids are `torch.full_like(cond, null)`): graph-safe.

scale: a finite number >= 0. 1 is the plain conditional policy: the inner forward is called once on
    the original batch (bitwise the unguided policy, no extra compute). 0 is the unconditional model:
    one forward on the null condition. Anything else needs the null condition.
null_cond: the condition id meaning "no condition" (default `policy.null_class`: the DiT's null class,
    the pipeline policies' empty prompt, both `num_classes`). Pass it when `policy` is a wrapper
    without `null_class` (e.g. DDP).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def check_guidance_scale(scale, owner: str = "Guided", name: str = "scale") -> float:
    """scale as a float; raises on a bool, a non-number, a non-finite or a negative value."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{owner}: '{name}' must be a number, got {type(scale).__name__} {scale!r}")
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"{owner}: '{name}' must be a finite number >= 0 (1 = no guidance, 0 = unconditional), "
                         f"got {scale!r}")
    return float(scale)


class Guided:
    """`Guided(policy, scale, null_cond=None)(x, t, cond)`: classifier-free guidance of `policy` (see
    the module docstring). A thin callable wrapper, not a module of its own: parameters(), buffers(),
    modules(), `training` and train()/eval() are the inner policy's (what RolloutRunner keys its CUDA
    graphs on and what an evaluator toggles), so it never holds state apart from the policy. Exposes
    the inner policy's `sample_shape` and `num_classes`; `null_class` is the null condition used;
    `inner` is the wrapped policy."""

    def __init__(self, policy, scale: float, null_cond: int | None = None) -> None:
        if not callable(policy):
            raise TypeError(f"Guided: the policy must be callable as policy(x, t, cond), got {type(policy).__name__}")
        self.scale = check_guidance_scale(scale)
        self.inner = policy
        if null_cond is None:
            null_cond = getattr(policy, "null_class", None)
        if self.scale != 1.0 and (isinstance(null_cond, bool) or not isinstance(null_cond, int) or null_cond < 0):
            raise ValueError(f"Guided: guidance scale {self.scale} needs a null (unconditional) condition id: the "
                             f"policy ({type(policy).__name__}) has no `null_class` and no null_cond was given "
                             f"(got {null_cond!r}); pass null_cond= or use scale = 1")
        self.null_cond = null_cond

    # ---- the inner policy's attributes ------------------------------------------------------
    @property
    def sample_shape(self):
        return getattr(self.inner, "sample_shape", None)

    @property
    def num_classes(self):
        return getattr(self.inner, "num_classes", None)

    @property
    def null_class(self):
        return self.null_cond

    @property
    def training(self) -> bool:
        return bool(getattr(self.inner, "training", False))

    def train(self, mode: bool = True) -> "Guided":
        if hasattr(self.inner, "train"):
            self.inner.train(mode)
        return self

    def eval(self) -> "Guided":
        return self.train(False)

    def parameters(self, recurse: bool = True):
        return self.inner.parameters(recurse) if hasattr(self.inner, "parameters") else iter(())

    def buffers(self, recurse: bool = True):
        return self.inner.buffers(recurse) if hasattr(self.inner, "buffers") else iter(())

    def modules(self):
        return self.inner.modules() if hasattr(self.inner, "modules") else iter(())

    def __repr__(self) -> str:
        return f"Guided(scale={self.scale}, null_cond={self.null_cond}, inner={type(self.inner).__name__})"

    # ---- the guided forward -----------------------------------------------------------------
    def __call__(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        if self.scale == 1.0:
            return self.inner(x, t, cond)
        null = torch.full_like(cond, self.null_cond)
        if self.scale == 0.0:
            return self.inner(x, t, null)
        rows = x.shape[0]
        if t.dim() == 0:
            t = t.expand(rows)
        out = self.inner(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]))
        c, u = out[:rows].float(), out[rows:].float()
        return (u + self.scale * (c - u)).to(out.dtype)


def guided(policy, scale: float, null_cond: int | None = None):
    """`policy` itself when scale == 1 (every caller keeps its exact unguided code path), else
    `Guided(policy, scale, null_cond)`."""
    scale = check_guidance_scale(scale)
    return policy if scale == 1.0 else Guided(policy, scale, null_cond)
