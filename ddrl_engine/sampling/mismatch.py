"""The rollout/train mismatch that a rollout-only attention backend (fp8) introduces.

A rollout made under `attention_backend("fp8")` stores log-probs of the fp8 network; the trainer
recomputes them with the bf16 (sdpa) network. At the first inner step the parameters are still the
rollout's, so mean |lp_rollout - lp_sdpa| over the stored transitions is exactly the deviation of the
likelihood ratio from 1 that the backend causes (log ratio = lp_new - lp_old).

Trainer recipe:
  * monitor: after the first inner step's recomputation `lp_new` of the chosen steps,
    log `logprob_mismatch(rows.old_log_prob, lp_new)` (free: no extra forward);
  * exact on-policy ratios (config switch): before the inner loop,
    `roll.log_probs = recompute_log_probs(policy, sampler, roll)` (one bf16 forward per stored step).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ddrl_engine.attention import attention_backend
from ddrl_engine.sampling.base import Sampler
from ddrl_engine.sampling.rollout import Rollout
from ddrl_engine.sampling.step import transition


def logprob_mismatch(rollout_log_probs: Tensor, recomputed_log_probs: Tensor) -> Tensor:
    """mean |lp_rollout - lp_recomputed| (fp32 scalar, no host sync): the mean |log ratio| at the
    rollout's own parameters."""
    if rollout_log_probs.shape != recomputed_log_probs.shape:
        raise ValueError(f"logprob_mismatch: shapes differ: rollout {tuple(rollout_log_probs.shape)}, "
                         f"recomputed {tuple(recomputed_log_probs.shape)}")
    return (rollout_log_probs.float() - recomputed_log_probs.detach().float()).abs().mean()


@torch.no_grad()
def recompute_log_probs(
    policy, sampler: Sampler, roll: Rollout, *, steps: Sequence[int] | Tensor | None = None,
    backend: str = "sdpa", chunk: int | None = None,
) -> Tensor:
    """log p(states[:, k+1] | states[:, k]) of the stored transitions under `backend` (default the
    trainable bf16 sdpa): fp32 [B, S] for the chosen steps (default all K).

    One forward per chosen step over the batch (at most `chunk` rows per forward; default all B), the
    shape of the rollout's and the trainer's own forwards, so at unchanged weights and backend the
    result equals theirs bitwise (each step function is deterministic per batch). A step outside the
    rollout's SDE window (`roll.window`) and a deterministic step (std 0) get log-prob 0, as the
    rollout stored them (not densities; never trained), without a forward. A multistep sampler's
    steps are scored with the rollout's recorded previous model outputs (`roll.prev_outs`).
    """
    if steps is None:
        steps = list(range(roll.num_steps))
    steps = [int(k) for k in (steps.tolist() if isinstance(steps, Tensor) else steps)]
    bad = [k for k in steps if not 0 <= k < roll.num_steps]
    if bad:
        raise IndexError(f"recompute_log_probs: steps {bad} out of range [0, {roll.num_steps})")
    b = roll.batch_size
    chunk = b if chunk is None else max(1, int(chunk))
    out = torch.empty((b, len(steps)), dtype=torch.float32, device=roll.states.device)
    window = getattr(roll, "window", None)
    prev_outs = getattr(roll, "prev_outs", None)
    with attention_backend(backend):
        for j, k in enumerate(steps):
            if (window is not None and not window[0] <= k < window[0] + window[1]) or not sampler.stochastic_steps[k]:
                out[:, j] = 0  # an ODE or deterministic step: what transition() gives, without the forward
                continue
            for i in range(0, b, chunk):
                rows = slice(i, min(b, i + chunk))
                out[rows, j] = transition(policy, sampler, roll.states[rows, k], k, roll.cond[rows],
                                          x_next=roll.states[rows, k + 1], reduction=roll.reduction,
                                          prev_out=None if prev_outs is None else prev_outs[rows, k]).log_prob
    return out


def rollout_logprob_mismatch(policy, sampler: Sampler, roll: Rollout, *, steps: Sequence[int] | Tensor | None = None,
                             backend: str = "sdpa") -> Tensor:
    """mean |lp_rollout - lp_backend| over the chosen steps of `roll` (a standalone check; in the
    trainer prefer `logprob_mismatch` on the first inner step's own recomputation)."""
    rows = roll.step_rows(steps)
    recomputed = recompute_log_probs(policy, sampler, roll, steps=steps, backend=backend)
    return logprob_mismatch(rows.old_log_prob.reshape(roll.batch_size, -1), recomputed)
