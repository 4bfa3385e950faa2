"""The rollout: run a sampler's chain under a policy without gradients, keeping every state and the
old log-probabilities for the policy loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from ddrl_engine.profiling import phase
from ddrl_engine.sampling.base import Sampler
from ddrl_engine.sampling.step import draw_noise, transition


class StepRows(NamedTuple):
    """Stored transitions flattened to rows (row b * S + s = sample b at the s-th chosen step), ready
    for `transition(policy, sampler, x, k, cond, x_next=x_next, prev_out=prev_out)`; prev_out is the
    recorded previous model output of a multistep sampler's rows (None otherwise)."""

    x: Tensor
    x_next: Tensor
    k: Tensor
    cond: Tensor
    old_log_prob: Tensor
    prev_out: Tensor | None = None


@dataclass
class Rollout:
    """One batch of chains (B samples, K steps).

    states: [B, K+1, *sample_shape] in the rollout dtype; states[:, 0] is x_0, states[:, k+1] the
        result of step k.
    log_probs: fp32 [B, K], log p_old(states[:, k+1] | states[:, k]) under `reduction`.
    levels: fp32 [K], the network level of each step.
    samples: [B, *sample_shape], the chain's output after `sampler.finish` (never aliases states).
    cond: long [B].
    initial_noise: [B, *sample_shape], the unit Gaussian the chain started from (states[:, 0]
        divided by sampler.initial_scale; a view of states[:, 0] when that scale is 1); the default
        eps of the data loss.
    reduction: "mean" or "sum", how log_probs reduce each sample's elements.
    window: the SDE window (first, size) the chain ran with, or None (every step as the sampler
        defines it). With a window, steps outside it are deterministic ODE steps (log_probs 0, not
        densities) and only the window's steps are trainable.
    prev_outs: multistep samplers only (`sampler.multistep`; else None): fp32 [B, K, *sample_shape],
        prev_outs[:, k] the model output of step k - 1 (zeros at k = 0), the constant that step k's
        mean adds (times prev_coef_k): pass it as transition(..., prev_out=prev_outs[:, k]) to score
        states[:, k+1] with the rollout's own offset.
    """

    states: Tensor
    log_probs: Tensor
    levels: Tensor
    samples: Tensor
    cond: Tensor
    initial_noise: Tensor
    reduction: str
    window: tuple[int, int] | None = None
    prev_outs: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.states.shape[0]

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    def step_rows(self, steps: Sequence[int] | Tensor | None = None) -> StepRows:
        """The stored transitions of the chosen steps (default all), as B * S rows."""
        device = self.states.device
        if steps is None:
            idx = torch.arange(self.num_steps, device=device)
        elif isinstance(steps, Tensor):
            idx = steps.to(device=device, dtype=torch.long)
        else:
            steps = [int(s) for s in steps]
            bad = [s for s in steps if not 0 <= s < self.num_steps]
            if bad:
                raise IndexError(f"Rollout.step_rows: steps {bad} out of range [0, {self.num_steps})")
            idx = torch.tensor(steps, dtype=torch.long, device=device)
        b, s = self.batch_size, idx.numel()
        sample_shape = self.states.shape[2:]
        return StepRows(
            x=self.states[:, idx].reshape(b * s, *sample_shape),
            x_next=self.states[:, idx + 1].reshape(b * s, *sample_shape),
            k=idx.repeat(b),
            cond=self.cond.repeat_interleave(s),
            old_log_prob=self.log_probs[:, idx].reshape(b * s),
            prev_out=None if self.prev_outs is None else self.prev_outs[:, idx].reshape(b * s, *sample_shape),
        )


def group_conditions(cond: Tensor, group_size: int) -> Tensor:
    """Each condition repeated group_size times in a row: [c0, c0, ..., c1, c1, ...] (GRPO groups)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_conditions: 'group_size' must be an int >= 1, got {group_size!r}")
    if not isinstance(cond, Tensor) or cond.dim() != 1:
        raise ValueError(f"group_conditions: 'cond' must be a 1-D tensor, got {getattr(cond, 'shape', type(cond))}")
    return cond.repeat_interleave(group_size)


@dataclass
class RolloutBuffers:
    """Preallocated outputs of one chain (B samples, K steps): everything the step loop writes.

    states [B, K+1, *S] and samples [B, *S] in the rollout dtype, log_probs fp32 [B, K], noise fp32
    [B, *S] (the initial unit Gaussian), and for a multistep sampler prev_outs fp32 [B, K, *S] (the
    previous step's model output per step, `Rollout.prev_outs`; allocate(..., multistep=True)). The
    graphed runner keeps one set per shape key and captures the loop writing into it; `rollout()`
    allocates a fresh set per call.
    """

    states: Tensor
    log_probs: Tensor
    samples: Tensor
    noise: Tensor
    prev_outs: Tensor | None = None

    @classmethod
    def allocate(cls, batch: int, num_steps: int, sample_shape: Sequence[int], dtype: torch.dtype,
                 device, multistep: bool = False) -> "RolloutBuffers":
        shape = tuple(int(s) for s in sample_shape)
        return cls(states=torch.empty((batch, num_steps + 1, *shape), dtype=dtype, device=device),
                   log_probs=torch.empty((batch, num_steps), dtype=torch.float32, device=device),
                   samples=torch.empty((batch, *shape), dtype=dtype, device=device),
                   noise=torch.empty((batch, *shape), dtype=torch.float32, device=device),
                   prev_outs=(torch.zeros((batch, num_steps, *shape), dtype=torch.float32, device=device)
                              if multistep else None))


def run_chain(policy, sampler: Sampler, cond: Tensor, buffers: RolloutBuffers, *,
              generator: torch.Generator | None, reduction: str, shard: tuple[int, int] | None = None,
              window: tuple[int, int] | None = None) -> None:
    """The step loop, writing into `buffers`: the one implementation the eager rollout runs and the
    graphed runner captures. Random draws, in order, from `generator`: the initial noise, then one
    eps per step. No host sync, no allocation the caller must keep, no data-dependent control flow.
    shard = (first, total): this batch is rows first:first+B of a batch of `total` split across
    processes; every draw is made for all `total` rows and these rows kept (`step.draw_noise`), so the
    shards' union is the one-process rollout.
    window = (first, size): steps first..first+size-1 are the sampler's own (SDE) steps, every other
    step its deterministic ODE step (`transition(..., ode=True)`: no eps drawn, log-prob 0); checked by
    the callers (`Sampler.check_window`). A deterministic step (std 0) draws no eps either.
    A multistep sampler (`sampler.multistep`) needs buffers.prev_outs: step k reads prev_outs[:, k]
    (zeroed at k = 0) and writes its model output to prev_outs[:, k + 1]."""
    prev = buffers.prev_outs
    if sampler.multistep != (prev is not None):
        raise ValueError(f"run_chain: {type(sampler).__name__} is {'a' if sampler.multistep else 'not a'} multistep "
                         "sampler but the buffers have "
                         f"{'no' if prev is None else 'a'} prev_outs buffer; allocate them with "
                         "RolloutBuffers.allocate(..., multistep=sampler.multistep)")
    batch = cond.shape[0]
    sample_shape = tuple(buffers.noise.shape[1:])
    dtype = buffers.states.dtype
    if shard is None:
        noise = sampler.initial_noise((batch, *sample_shape), generator=generator, device=cond.device)
    else:
        noise = draw_noise((batch, *sample_shape), generator=generator, device=cond.device, shard=shard)
    buffers.noise.copy_(noise)
    x = sampler.state_from_noise(noise, dtype)
    buffers.states[:, 0] = x
    if prev is not None:
        prev[:, 0].zero_()
    for k in range(sampler.num_steps):
        ode = window is not None and not window[0] <= k < window[0] + window[1]
        with phase("rollout/step", k):
            step = transition(policy, sampler, x, k, cond, generator=generator, reduction=reduction, shard=shard,
                              ode=ode, prev_out=None if prev is None else prev[:, k])
            buffers.states[:, k + 1] = step.x_next
            buffers.log_probs[:, k] = step.log_prob
            if prev is not None and k + 1 < sampler.num_steps:
                prev[:, k + 1] = step.model_out
            x = step.x_next
    with phase("rollout/finish"):
        buffers.samples.copy_(sampler.finish(policy, x, cond))


def check_cond(cond, owner: str = "rollout") -> None:
    if not isinstance(cond, Tensor) or cond.dim() != 1:
        raise ValueError(f"{owner}: 'cond' must be a 1-D tensor [B], got {getattr(cond, 'shape', type(cond))}")


def as_rollout(buffers: RolloutBuffers, sampler: Sampler, cond: Tensor, reduction: str,
               window: tuple[int, int] | None = None) -> Rollout:
    """The Rollout view of filled buffers (no copy of the states or log-probs)."""
    dtype = buffers.states.dtype
    initial_noise = buffers.states[:, 0] if sampler.initial_scale == 1.0 else buffers.noise.to(dtype)
    return Rollout(states=buffers.states, log_probs=buffers.log_probs, levels=sampler.network_levels.clone(),
                   samples=buffers.samples, cond=cond, initial_noise=initial_noise, reduction=reduction,
                   window=window, prev_outs=buffers.prev_outs)


@torch.no_grad()
def rollout(
    policy,
    sampler: Sampler,
    cond: Tensor,
    *,
    generator: torch.Generator | None,
    sample_shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    reduction: str = "mean",
    window: tuple[int, int] | None = None,
) -> Rollout:
    """Runs the K-step chain for each condition (long [B], on the device to sample on).

    Random draws, in order, all from `generator` (fp32 randn): the initial noise, then one eps per
    stochastic step; the result is a deterministic function of the generator's state.

    window: an SDE window (first, size), or None: steps outside it take the sampler's deterministic ODE
    step (no eps drawn, log-prob 0); see `run_chain` and `Sampler.check_window`.

    dtype is the storage dtype of the states (the policy is called on them; the step math is fp32).
    bfloat16 rounds a stored state by up to |x| 2^-9, more than the std of the last steps of DDIM and
    EDM (sigma_min = 0.002): their log-probs and gradients are then dominated by that rounding (the
    ratio of a recomputation stays exactly 1). Keep float32 states for training. The step loop
    (`run_chain`) writes into preallocated buffers and has no host sync or data-dependent control
    flow; `ddrl_engine.sampling.RolloutRunner` captures that same loop in a CUDA graph.
    """
    check_cond(cond)
    if window is not None:
        window = sampler.check_window(window)
    device = cond.device
    sampler.to(device)
    buffers = RolloutBuffers.allocate(cond.shape[0], sampler.num_steps, sample_shape, dtype, device,
                                      multistep=sampler.multistep)
    with phase("rollout"):
        run_chain(policy, sampler, cond, buffers, generator=generator, reduction=reduction, window=window)
    return as_rollout(buffers, sampler, cond, reduction, window)
