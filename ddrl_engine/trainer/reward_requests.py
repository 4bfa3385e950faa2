"""The trainer's rewards: evaluated in the trainer's process (a `WeightedReward`) or in reward
worker processes (an `AsyncReward`), behind one submit / result interface.

With workers, `submit` returns at once and the trainer computes the data-loss forward and backward
before it needs the advantages, so a slow reward overlaps that work; `RewardResult.wait_s` is the time
the step then still blocked on it (near zero when the reward finishes first). In-process rewards are
computed at submit: the step blocks for all of it, and wait_s says so.

A batch the workers dropped after its retries (AsyncReward on_failure="drop") comes back with every
sample invalid: masked out of the group statistics, advantage 0, counted in `dropped`, with the
causes (the trainer warns with them, or stops when a reward broke its contract under
run.on_invalid_reward = "error"); never a reward of zero.

An in-process reward runs on a helper thread with a deadline (`timeout_s`, the run's
reward_workers.timeout_s): a reward that hangs stops the run with an error naming it instead of
hanging it forever (a thread cannot be killed: reward workers can, and replace a hung one).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ddrl_engine.rewards.async_rewards import AsyncReward, RewardHandle
from ddrl_engine.rewards.base import RewardBatch, WeightedReward


@dataclass
class RewardResult:
    """batch: the RewardBatch; wait_s: seconds the step blocked on it; compute_s: reward time
    (in the workers for an AsyncReward); dropped: the workers gave up on this batch; cause: why (each
    attempt's error); invalid: a reward broke its contract (NaN/inf, wrong shape or type)."""

    batch: RewardBatch
    wait_s: float
    compute_s: float
    dropped: bool
    cause: str = ""
    invalid: bool = False


class RewardTimeoutError(TimeoutError):
    """An in-process reward did not return within the run's deadline."""


class PendingReward:
    """One submitted batch; `result()` blocks until it is done (once; later calls return the same)."""

    def __init__(self, names: list[str], batch_size: int, device, *, handle: RewardHandle | None = None,
                 ready: RewardResult | None = None):
        self._names, self._batch_size, self._device = names, batch_size, device
        self._handle, self._result = handle, ready

    def result(self) -> RewardResult:
        if self._result is None:
            batch = self._handle.result()
            dropped = batch is None
            if dropped:
                batch = dropped_batch(self._names, self._batch_size)
            batch = RewardBatch({k: v.to(self._device) for k, v in batch.components.items()},
                                batch.valid.to(self._device), batch.n_invalid, batch.total.to(self._device))
            h = self._handle
            cause = "\n".join(f"attempt {i + 1}: {c}" for i, c in enumerate(h.causes)) if dropped else ""
            self._result = RewardResult(batch, h.wait_s or 0.0, h.compute_s or 0.0, dropped, cause,
                                        dropped and h.invalid)
        return self._result


def dropped_batch(names: list[str], batch_size: int) -> RewardBatch:
    """A batch with no valid sample (what a dropped reward batch becomes)."""
    zeros = torch.zeros(batch_size, dtype=torch.float32)
    return RewardBatch({n: zeros.clone() for n in names}, torch.zeros(batch_size, dtype=torch.bool),
                       {n: batch_size for n in names}, zeros.clone())


def as_weighted_reward(rewards) -> WeightedReward:
    """A WeightedReward from one reward (any object with a string `name` and `__call__(samples, cond)
    -> [B]`), a list of them (weight 1 each), or a WeightedReward (as it is)."""
    if isinstance(rewards, WeightedReward):
        return rewards
    items = list(rewards) if isinstance(rewards, (list, tuple)) else [rewards]
    for r in items:
        if not isinstance(getattr(r, "name", None), str) or not callable(r):
            raise TypeError(f"rewards: {type(r).__name__} is not a reward: a reward has a string `name` and "
                            "`__call__(samples [B, ...], cond [B]) -> [B] floats` (or pass a WeightedReward / AsyncReward)")
    return WeightedReward(items)


class RewardRequests:
    """Submits rollout batches to `rewards` (a reward, a list of rewards, a WeightedReward or an
    AsyncReward; `self.rewards` is the WeightedReward or AsyncReward used).

    on_invalid: the run's policy for non-finite rewards ("error" or "drop"); an AsyncReward must have
    been built with the same one (its workers apply it). `submit` reads it each time. names / weights: the reward components, in
    the order the advantages stack them.
    """

    def __init__(self, rewards, on_invalid: str, timeout_s: float | None = None):
        self.rewards, self.on_invalid, self.timeout_s = rewards, on_invalid, timeout_s
        if isinstance(rewards, AsyncReward):
            if rewards.on_invalid != on_invalid:
                raise ValueError(f"the AsyncReward was built with on_invalid={rewards.on_invalid!r} but the run has "
                                 f"run.on_invalid_reward = {on_invalid!r}; build it with the run's setting")
            self.names, self.weights = rewards.reward_spec()
        else:
            rewards = self.rewards = as_weighted_reward(rewards)
            self.names, self.weights = [r.name for r in rewards.rewards], list(rewards.weights)

    @property
    def is_async(self) -> bool:
        return isinstance(self.rewards, AsyncReward)

    def submit(self, samples: Tensor, cond) -> PendingReward:
        b, dev = samples.shape[0], samples.device
        if self.is_async:
            return PendingReward(self.names, b, dev, handle=self.rewards.submit(samples, cond))
        t0 = time.perf_counter()
        batch = self._evaluate_in_process(samples, cond)  # warns or raises here
        took = time.perf_counter() - t0
        return PendingReward(self.names, b, dev, ready=RewardResult(batch, took, took, False))

    def _evaluate_in_process(self, samples: Tensor, cond) -> RewardBatch:
        if not self.timeout_s:
            return self.rewards.evaluate(samples, cond, on_invalid=self.on_invalid)
        # A daemon thread per call (a pool's threads are joined at exit: a hung one would block it).
        out: dict = {}

        def call():
            try:
                out["batch"] = self.rewards.evaluate(samples, cond, on_invalid=self.on_invalid)
            except BaseException as e:  # noqa: BLE001 - re-raised in the trainer's thread
                out["error"] = e

        worker = threading.Thread(target=call, name="ddrl-reward", daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            raise RewardTimeoutError(
                f"the reward(s) {', '.join(self.names)} did not return within {self.timeout_s:g} s "
                "(reward_workers.timeout_s); stopping rather than hanging. Raise the timeout, or run the rewards "
                "in worker processes (reward_workers.workers > 0), which replace a hung one")
        if "error" in out:
            raise out["error"]
        return out["batch"]
