"""One stochastic denoising step: the single function both the rollout and the trainer's
recomputation of log-probabilities go through, so old and new log-probs are the same math."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ddrl_engine.ops.step_logprob import step_logprob
from ddrl_engine.sampling.base import Sampler, StepIndex, row_view


class StepResult(NamedTuple):
    """x_next: [B, ...] in x's dtype (sampled, detached, or the given one); log_prob: fp32 [B],
    log p(x_next | x) (mean or sum over each row's elements); mean: fp32 [B, ...], the transition
    mean mu (carries the policy's gradient, e.g. for a closed-form KL); model_out: the policy output."""

    x_next: Tensor
    log_prob: Tensor
    mean: Tensor
    model_out: Tensor


def draw_noise(shape, *, generator: torch.Generator | None, device, shard: tuple[int, int] | None = None) -> Tensor:
    """fp32 unit Gaussian of `shape` = [B, ...], one randn call on `generator`. With shard = (first,
    total) the call draws [total, ...] and returns rows first:first+B: every process of a split batch
    draws the same global tensor (same generator state) and keeps its own rows."""
    shape = tuple(shape)
    if shard is None:
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    first, total = shard
    if not 0 <= first <= first + shape[0] <= total:
        raise ValueError(f"draw_noise: shard rows {first}:{first + shape[0]} outside a batch of {total}")
    full = torch.randn((total, *shape[1:]), generator=generator, device=device, dtype=torch.float32)
    return full[first : first + shape[0]]


def _per_row(v: Tensor, rows: int) -> Tensor:
    # 0-dim (one step for the whole batch) -> a stride-0 [rows] view; [rows] stays as it is.
    return v.expand(rows) if v.dim() == 0 else v


def transition(
    policy,
    sampler: Sampler,
    x: Tensor,
    k: StepIndex,
    cond: Tensor,
    *,
    generator: torch.Generator | None = None,
    x_next: Tensor | None = None,
    reduction: str = "mean",
    shard: tuple[int, int] | None = None,
    ode: bool = False,
    prev_out: Tensor | None = None,
) -> StepResult:
    """Step k of `sampler`'s chain from state x under `policy`.

    model_out = policy(x, t_k [B], cond); mu = x_coef_k x + out_coef_k model_out; with x_next None,
    x_next = mu + std_k eps (eps ~ N(0, I) in fp32 from `generator`; x_next is detached: the policy
    gradient is a score-function one), else the given x_next is scored. log_prob comes from
    `ops.step_logprob` and carries the gradient to model_out when the policy has one.

    x: [B, *sample_shape]; cond: [B]; k: an int (one step for all rows) or a long tensor [B] of
    per-row steps (rows of different steps in one batch: the trainer's recomputation).
    shard: (first, total) when x holds rows first:first+B of a batch of `total` rows split across
        processes: eps is drawn for all `total` rows and these rows kept, so the union of the shards
        equals the one-process draw (see `draw_noise`).
    ode: take the sampler's deterministic ODE step k instead (`Sampler.ode_coefs`; an int k only):
        what an SDE window runs outside the window.
    prev_out: for a multistep sampler (`sampler.multistep`), the previous step's model output for
        these rows ([B, *sample_shape]; zeros, or None for an int k = 0, at the first step): mu gains
        the offset prev_coef_k * prev_out (fp32, detached: a constant of this step, as recorded in the
        rollout's `prev_outs`), in the mean and in `ops.step_logprob`. Must be None otherwise.
    A deterministic step (ode=True, or an int k whose std is 0: `sampler.stochastic_steps[k]` False,
    e.g. rectified_flow_cps's last step) gives x_next = mu exactly (no noise drawn) and log_prob 0,
    which is not a density: such a step is never trained (step_logprob is never called with std 0).
    A tensor k must name stochastic steps only (not checked: that would need a host sync).
    No host synchronisation (safe inside a captured CUDA graph once the sampler is on x's device).
    """
    if x.dim() < 1 or cond.shape != (x.shape[0],):
        raise ValueError(f"transition: cond must have shape [B] = [{x.shape[0] if x.dim() else '?'}] "
                         f"matching x {list(x.shape)}, got {list(cond.shape)}")
    rows = x.shape[0]
    sampler.to(x.device)
    offset = _prev_offset(sampler, k, prev_out, x)
    level = _per_row(sampler.network_level(k), rows)
    coefs = sampler.ode_coefs(k) if ode else sampler.coefs(k)
    deterministic = ode or (not isinstance(k, Tensor) and not sampler.stochastic_steps[k])
    x_coef, out_coef, std = (_per_row(c, rows) for c in (coefs.x_coef, coefs.out_coef, coefs.std))
    model_out = policy(x, level, cond)
    if model_out.shape != x.shape:
        raise ValueError(f"transition: the policy returned shape {list(model_out.shape)} for x of shape {list(x.shape)}")
    mean = row_view(x_coef, x) * x.float() + row_view(out_coef, x) * model_out.float()
    if offset is not None:
        mean = mean + offset
    if deterministic:
        if x_next is None:
            x_next = mean.detach().to(x.dtype)
        return StepResult(x_next, torch.zeros(rows, dtype=torch.float32, device=x.device), mean, model_out)
    if x_next is None:
        eps = draw_noise(x.shape, generator=generator, device=x.device, shard=shard)
        x_next = (mean.detach() + row_view(std, x) * eps).to(x.dtype)
    log_prob = step_logprob(x_next, x, model_out, x_coef=x_coef, out_coef=out_coef, std=std, offset=offset,
                            reduction=reduction)
    return StepResult(x_next, log_prob, mean, model_out)


def _prev_offset(sampler: Sampler, k: StepIndex, prev_out: Tensor | None, x: Tensor) -> Tensor | None:
    """prev_coef_k * prev_out in fp32 (detached) for a multistep sampler, else None."""
    prev_coef = sampler.prev_coef(k)
    what = f"{type(sampler).__name__} ({sampler.name!r})"
    if prev_coef is None:
        if prev_out is not None:
            raise ValueError(f"transition: 'prev_out' was given but {what} is a single-step sampler (no previous "
                             "model output in its mean); pass prev_out=None")
        return None
    if prev_out is None:
        if not isinstance(k, Tensor) and k == 0:
            return None  # the first step has no previous output (prev_coef_0 = 0)
        raise ValueError(f"transition: {what} is a multistep sampler: step {k if not isinstance(k, Tensor) else 'k'} "
                         "needs 'prev_out', the previous step's model output (a rollout records it in "
                         "Rollout.prev_outs[:, k])")
    if not isinstance(prev_out, Tensor) or prev_out.shape != x.shape:
        raise ValueError(f"transition: 'prev_out' must be a tensor of x's shape {list(x.shape)}, got "
                         f"{list(prev_out.shape) if isinstance(prev_out, Tensor) else type(prev_out).__name__}")
    return row_view(_per_row(prev_coef, x.shape[0]), x) * prev_out.detach().float()
