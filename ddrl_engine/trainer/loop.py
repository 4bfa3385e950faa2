"""The DDRL training loop: rollout -> rewards -> advantages -> clipped policy loss + data loss (+ KL)
-> backward, clip, optimizer, EMA; with evaluation, metrics.jsonl, atomic checkpoints and exact resume.

The Trainer works on any policy (`policy(x, t, cond)` with `sample_shape`; see models.Policy), any
sampler, any rewards and any dataset of (x, condition id) pairs: nothing here knows the DiT or digits.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from ddrl_engine.algorithms import (BaselineForms, clipped_policy_loss, combine, gaussian_kl, group_advantages,
                                   policy_data_loss)
from ddrl_engine.attention import attention_backend, available_backends
from ddrl_engine.data import DataStream
from ddrl_engine.models.trainable import frozen_copy, select_trainable, trainable_keys
from ddrl_engine.monitors import HeldoutLossMonitor
from ddrl_engine.ops import selftest as ops_selftest
from ddrl_engine.profiling import phase
from ddrl_engine.rewards.async_rewards import RewardFailedError
from ddrl_engine.sampling import Rollout, RolloutRunner, group_conditions, logprob_mismatch, recompute_log_probs, transition
from ddrl_engine.sampling.guidance import Guided
from ddrl_engine.sampling.step import draw_noise
from ddrl_engine.trainer.checkpoint import OPTIMIZER_KEY, TRAINER_KEY, CheckpointManager
from ddrl_engine.trainer.manifest import CheckpointError
from ddrl_engine.trainer.manifest import verify as verify_checkpoint
from ddrl_engine.trainer.config import TrainConfig, check_config
from ddrl_engine.trainer.validate import check_runnable
from ddrl_engine.trainer.distributed import Distributed
from ddrl_engine.trainer.evaluate import Evaluator, decode
from ddrl_engine.trainer.optim import build_optimizer
from ddrl_engine.trainer.reward_requests import RewardRequests


def _rng_state(device: str) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: str) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)


def micro_batches(rows: int, micro: int) -> list[tuple[slice, float]]:
    """(rows slice, share of the rows) per micro-batch of at most `micro` rows (0: one batch)."""
    size = rows if micro <= 0 else min(micro, rows)
    return [(slice(a, min(a + size, rows)), (min(a + size, rows) - a) / rows) for a in range(0, rows, size)]


@dataclass
class _UpdatePlan:
    """How one update splits into backwards: the micro-batches of the rollout and data rows, how many
    data steps and trained steps, the scales `combine` applies to each pass, and the batch's trained
    steps (`Trainer.batch_steps`: fixed, or its SDE window's)."""

    n_trained: int
    n_data: int
    policy_pass: bool
    roll_parts: list
    data_parts: list
    backwards: int
    scale: dict
    data_scale: dict
    steps: list = field(default_factory=list)

    @classmethod
    def make(cls, trainer: "Trainer", batch: "RolloutBatch", data) -> "_UpdatePlan":
        algo, micro = trainer.algo, trainer.cfg.optim.micro_batch
        steps = trainer.batch_steps(batch)
        n_trained = len(steps)
        policy_pass = algo.use_reward or trainer.reference is not None
        roll_parts = micro_batches(batch.rollout.states.shape[0], micro)
        data_parts = micro_batches(data[0].shape[0], micro) if data is not None else []
        n_data = (n_trained if algo.data_loss_steps == "all" else 1) if data is not None else 0
        backwards = n_data * len(data_parts) + policy_pass * n_trained * len(roll_parts)
        scale = dict(beta_data=algo.beta_data, beta_kl=algo.beta_kl, num_trained_steps=n_trained,
                     loss_scale=algo.loss_scale)
        data_scale = dict(scale, num_trained_steps=max(n_data, 1))  # the data term: a mean over its steps
        return cls(n_trained, n_data, policy_pass, roll_parts, data_parts, backwards, scale, data_scale, steps)


@dataclass
class _Accumulators:
    """Per-update loss terms (device scalars, summed with one host sync at the end)."""

    sums: dict = field(default_factory=lambda: {"policy_loss": [], "data_loss": [], "kl": [], "clip_frac": []})
    ratio_devs: list = field(default_factory=list)
    first: dict = field(default_factory=dict)


class RolloutBatch:
    """What one step trains on: the rollout, its old log-probs [B, K], the rollout's metrics, and the
    submitted rewards (`pending`, None for sft). With reward workers the rewards may still be
    computing: `Trainer.await_rewards(batch)` waits for them, and the trainer calls it as late as it can.
    trained_steps: the steps this batch trains (its SDE window's with [sampler] sde_window); None: the
    trainer's fixed `trained_steps` (or the rollout's window's steps).
    """

    def __init__(self, rollout: Rollout, old_log_probs: torch.Tensor, metrics: dict, pending=None,
                 trained_steps: list[int] | None = None):
        self.rollout, self.old_log_probs, self.metrics, self.pending = rollout, old_log_probs, metrics, pending
        self.trained_steps = trained_steps
        self.rewards: RewardOutcome | None = None  # set by Trainer.await_rewards


@dataclass
class RewardOutcome:
    """The rewards of a RolloutBatch, resolved: this rank's rows of the group-normalised advantages [B]
    and the reward metrics (reward, invalid_rewards, reward_batches_dropped, adv_abs, time_reward,
    time_reward_wait)."""

    advantages: torch.Tensor
    metrics: dict


class _SDEWindows:
    """The SDE window (first, size) of each rollout batch, from [sampler] sde_window (see SamplerConfig):
    fixed; "random" (start uniform over the valid starts, from a CPU generator seeded with run.seed + 3,
    advanced once per batch on every rank alike; saved in the trainer's state); or "sliding" (start =
    starts[(step // sde_window_every) % len(starts)], a function of the training step). Checked against
    the sampler the Trainer runs (its ODE step, its stochastic steps) when the Trainer is built."""

    def __init__(self, scfg, sampler, seed: int):
        mode = scfg.sde_window
        try:
            if isinstance(mode, str):
                self.mode, self.size = mode, scfg.sde_window_size
                self.starts = sampler.window_starts(self.size, "sampler.sde_window_size")
                self.fixed = None
            else:
                self.mode, self.fixed = "fixed", sampler.check_window(mode, "sampler.sde_window")
        except (TypeError, ValueError) as e:
            raise ValueError(f"config: {e}") from e
        self.every = scfg.sde_window_every or 1
        self.gen = torch.Generator().manual_seed(seed + 3) if self.mode == "random" else None

    def next(self, step: int) -> tuple[int, int]:
        """The window of the batch collected at training step `step` (draws from `gen` when random)."""
        if self.fixed is not None:
            return self.fixed
        if self.gen is not None:
            i = int(torch.randint(len(self.starts), (1,), generator=self.gen).item())
        else:
            i = (step // self.every) % len(self.starts)
        return self.starts[i], self.size


def _trained_steps(algo, sampler, windows: _SDEWindows | None) -> list[int] | None:
    """The steps every batch trains (None when each batch's window decides: random/sliding). Without a
    window: algorithm.train_steps, where "all" / "every_other" leave out the sampler's deterministic
    steps (std 0, e.g. rectified_flow_cps's last) and a list naming one is an error. With a window: the
    window's steps, and algorithm.train_steps must not be a list."""
    name = f"{type(sampler).__name__} ({sampler.name!r})"
    explicit = not isinstance(algo.train_steps, str)
    if windows is not None:
        if explicit:
            shown = list(windows.fixed) if windows.fixed else repr(windows.mode)
            raise ValueError(f"config: algorithm.train_steps = {algo.train_steps} cannot be combined with "
                             f"sampler.sde_window = {shown}: with an SDE window the window's steps are the "
                             "trained steps (leave train_steps 'all' or 'every_other')")
        return None if windows.fixed is None else list(range(windows.fixed[0], sum(windows.fixed)))
    steps = algo.trained_steps(sampler.num_steps)
    stochastic = sampler.stochastic_steps
    det = [k for k in steps if not stochastic[k]]
    if det and explicit:
        raise ValueError(f"config: algorithm.train_steps names deterministic step(s) {det} of {name} (std 0: the "
                         "step has no log-density, so it cannot be trained); remove them")
    steps = [k for k in steps if stochastic[k]]
    if not steps:
        raise ValueError(f"config: algorithm.train_steps = {algo.train_steps!r} leaves no stochastic step of {name} "
                         f"to train (its {sampler.num_steps} step(s) are all deterministic)")
    return steps


def _condition_ids(policy, conditions) -> torch.Tensor:
    """The condition ids rollouts draw from: `conditions` (1-D long), or 0..policy.num_classes - 1."""
    if conditions is None:
        n = getattr(policy, "num_classes", None)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Trainer: the policy ({type(policy).__name__}) has no `num_classes` >= 1 to draw "
                             "rollout conditions from; pass conditions= (a 1-D long tensor of condition ids)")
        return torch.arange(n)
    if not isinstance(conditions, torch.Tensor) or conditions.dtype != torch.long or conditions.dim() != 1 \
            or conditions.numel() == 0:
        raise TypeError(f"Trainer: 'conditions' must be a non-empty 1-D long tensor of condition ids, got "
                        f"{getattr(conditions, 'dtype', type(conditions).__name__)} "
                        f"{tuple(getattr(conditions, 'shape', ()))}")
    return conditions.cpu()


def _sample_shape(policy) -> tuple[int, ...]:
    shape = getattr(policy, "sample_shape", None)
    if not isinstance(shape, (tuple, list)) or not shape or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"Trainer: the policy ({type(policy).__name__}) must have a `sample_shape` attribute: the "
                         f"per-sample state shape, e.g. (C, H, W) or (C, T, H, W); got {shape!r}")
    return tuple(shape)


class Trainer:
    """Trains `policy` with DDRL (or a baseline: the method lives in cfg.algorithm).

    policy: the model to train (its current weights are the base): `policy(x, t, cond) -> like x`,
        with `sample_shape` (the per-sample state shape) and, unless `conditions` is given,
        `num_classes` (rollout conditions are drawn uniformly from 0..num_classes - 1).
    sampler: a `ddrl_engine.sampling.Sampler` (its transitions are the policy's actions).
    rewards: any object with `name` and `__call__(samples, cond) -> [B]` floats, a list of them (equal
        weights), a `WeightedReward`, or an `AsyncReward` (reward workers, which overlap the data-loss
        pass; see ddrl_engine.trainer.reward_requests).
    dataset: the off-policy data, anything with `train_x` [N, *sample_shape] and `train_y` long [N]
        (a `ddrl_engine.data.Dataset`); needed when algorithm.beta_data > 0, else may be None.
    evaluator: called as evaluator(policy, sampler, sample_shape, device) -> (metrics, samples) every
        run.eval_every steps (e.g. `trainer.evaluate.Evaluator`), or None. With rollout.guidance_scale
        != 1 the policy it gets is a `sampling.Guided` (the unguided one is its `.inner`).
    conditions: the condition ids rollouts draw from (1-D long), e.g. the training prompts' ids.
    decode: what the rewards see of a rollout's samples (default: clamped to the [-1, 1] image range;
        for a latent model pass e.g. the identity, or a VAE decode).
    sync_timing: synchronise the device at each timed boundary, so the time_* metrics are device
        time, not launch time (benchmarks; costs a sync per phase).
    Every phase runs inside a named `ddrl_engine.profiling.phase` range (NVTX + torch.profiler).
    The rollout goes through a `RolloutRunner` (eager, or a CUDA graph with rollout.cuda_graph; a
    graphed Rollout views the runner's buffers, valid until the next collect()).
    With cfg.distributed.parallel = "ddp" or "fsdp" (under torchrun) each rank rolls out and trains on
    its rows of the global batch (see ddrl_engine.trainer.distributed); `dist` is then set, else None.
    trained_steps: the steps every batch trains (algorithm.train_steps without the sampler's
        deterministic steps, or a fixed sampler.sde_window's steps); None with a random or sliding
        window, where each RolloutBatch carries its own (`batch_steps`). Each step logs rollout_nfe
        (network evaluations per sample of the rollout, doubled under guidance) and, with a window,
        sde_window_first.
    The trainer's whole state is `state_dict()` / `load_state_dict()`; `save()` / `resume()` write and
    read it through one CheckpointManager (one process or distributed).
    """

    def __init__(self, cfg: TrainConfig, policy, sampler, rewards, dataset=None, evaluator: Evaluator | None = None,
                 *, conditions: torch.Tensor | None = None, log=print, sync_timing: bool = False, decode=decode):
        check_config(cfg)
        check_runnable(cfg, built_from_config=False)  # the device and world size (the objects are given)
        self.sample_shape = _sample_shape(policy)
        self.condition_ids = _condition_ids(policy, conditions)
        if cfg.rollout.cuda_graph:
            RolloutRunner.check_device(cfg.run.device)
        self.cfg, self.log = cfg, log
        self.sync_timing = sync_timing
        par = cfg.distributed.parallel
        self.dist = (Distributed.from_env(par, cfg.run.device, shard_size=cfg.distributed.shard_size,
                                          context_parallel=cfg.distributed.context_parallel,
                                          cp_attention=cfg.distributed.context_parallel_attention)
                     if par != "none" else None)
        self.device = cfg.run.device if self.dist is None else self.dist.device
        usable, why = available_backends(self.device).get(cfg.rollout.attention_backend, (False, "unknown backend"))
        if not usable:
            raise ValueError(f"config: 'rollout.attention_backend' = {cfg.rollout.attention_backend!r} is not "
                             f"usable on {self.device}: {why}")
        self.algo = cfg.algorithm
        self.reward_requests = (RewardRequests(rewards, cfg.run.on_invalid_reward, timeout_s=cfg.reward_workers.timeout_s)
                                if self.algo.use_reward else None)
        self.rewards = self.reward_requests.rewards if self.reward_requests is not None else rewards
        self.rollout_batch = cfg.rollout.conditions_per_step * self.algo.group_size
        self.data = self._data_stream(dataset) if self.algo.beta_data > 0 else None
        self.policy = policy.to(self.device)
        self.sampler = sampler
        self.decode = decode
        self.dataset = dataset
        self.evaluator = evaluator
        self.out = Path(cfg.run.out_dir)
        # SDE windows ([sampler] sde_window; None: every step as the sampler defines it) and the trained
        # steps (per batch with a random/sliding window: then None here, see batch_steps).
        self._windows = (_SDEWindows(cfg.sampler, sampler, cfg.run.seed) if cfg.sampler.sde_window is not None
                         else None)
        self.trained_steps = _trained_steps(self.algo, sampler, self._windows)
        # algorithm.kl_form / logprob_form / data_weighting, checked against the sampler (defaults: no-ops).
        self.forms = BaselineForms.make(self.algo, sampler)
        # Network evaluations per sample of one rollout: guidance runs both branches in one forward on
        # twice the rows (scale 0 and 1: one branch).
        self._rollout_nfe = sampler.nfe * (1 if cfg.rollout.guidance_scale in (0.0, 1.0) else 2)
        # A LoRA run's frozen base is shared by the KL reference and the EMA (they copy only the adapters)
        # except under FSDP2, which shards each model's parameters itself (a shared tensor would be
        # sharded twice): there each is a sharded copy, 1 / W of the base per GPU.
        share = self.dist is None or self.dist.mode != "fsdp"
        self.reference = frozen_copy(policy, share).eval() if self.algo.beta_kl > 0 else None
        self.ema = frozen_copy(policy, share) if cfg.optim.ema_decay > 0 else None
        self._rollout_shard = self._data_shard = None
        if self.dist is not None:
            first, _ = self.dist.shard(self.rollout_batch, "rollout batch (conditions_per_step x group_size)")
            self._rollout_shard = (first, self.rollout_batch)
            if self.data is not None:
                first, _ = self.dist.shard(self.data.batch_size, "data batch")
                self._data_shard = (first, self.data.batch_size)
            self.policy, self.reference, self.ema = self.dist.wrap(
                self.policy, self.reference, self.ema, activation_checkpointing=cfg.distributed.activation_checkpointing)
        # Classifier-free guidance (rollout.guidance_scale): the rollout, the policy loss, the KL's
        # reference, the old-log-prob recomputation and the evaluation's samples see the guided policy;
        # the data loss and the held-out loss the plain one. Scale 1: the plain objects themselves.
        self.guidance_scale = cfg.rollout.guidance_scale
        self._null_cond = getattr(self._module(), "null_class", None)
        self._rollout_policy = self._guided(self.policy)
        self._rollout_reference = self._guided(self.reference) if self.reference is not None else None
        self.runner = RolloutRunner(self._guided(self._module()), sampler, sample_shape=self.sample_shape,
                                    reduction=self.algo.logprob_reduction, cuda_graph=cfg.rollout.cuda_graph)
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"Trainer: the policy ({type(policy).__name__}) has no parameter that requires grad")
        self.opt, self.scheduler = build_optimizer(trainable, cfg.optim, device=self.device, total_steps=cfg.run.steps)
        self.checkpoints = CheckpointManager(self.out / "checkpoints", dist=self.dist, keep=cfg.run.keep_checkpoints)
        self.checkpoints.clean_stale_temps(log=self.log)
        self.rollout_gen = torch.Generator(self.device).manual_seed(cfg.run.seed)
        self.cond_gen = torch.Generator().manual_seed(cfg.run.seed + 1)
        self.data_gen = torch.Generator(self.device).manual_seed(cfg.run.seed + 2)
        self.heldout = HeldoutLossMonitor(cfg.run.heldout_rise_threshold, early_stop=cfg.run.early_stop_on_heldout)
        self.step = 0
        self.invalid_rewards = 0
        self.dropped_reward_batches = 0
        grad_sync = cfg.distributed.grad_sync
        if grad_sync == "auto":
            grad_sync = "update" if cfg.distributed.parallel == "ddp" else "backward"
        self._defer_grad_sync = grad_sync == "update"
        self._stop_signal = 0  # the number of a stop signal received (SIGTERM, SIGINT), else 0
        self._resumed = False

    def _data_stream(self, dataset) -> DataStream:
        if dataset is None or not all(hasattr(dataset, a) for a in ("train_x", "train_y")):
            raise ValueError(f"Trainer: algorithm.beta_data = {self.algo.beta_data} needs a dataset with train_x "
                             f"[N, *sample_shape] and train_y [N] (the off-policy data), got {type(dataset).__name__}")
        x, y = dataset.train_x, dataset.train_y
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"Trainer: dataset.train_x must be [N, *{self.sample_shape}] (the policy's sample_shape), "
                             f"got {tuple(getattr(x, 'shape', ()))}")
        batch = self.cfg.data.batch_size or self.rollout_batch  # equal to the rollout's with data_noise = "rollout" (validate.check_values)
        return DataStream(x, y, batch, seed=self.cfg.run.seed)

    def _module(self):
        """The policy without a DDP wrapper (FSDP2 shards in place: the module itself)."""
        return self.policy if self.dist is None else self.dist.unwrap(self.policy)

    def _guided(self, policy):
        """`policy` under the rollouts' classifier-free guidance: `policy` itself when
        rollout.guidance_scale = 1, else a `sampling.Guided` with the policy's null condition."""
        if self.guidance_scale == 1.0:
            return policy
        return Guided(policy, self.guidance_scale, self._null_cond)

    # ---- one training step: collect, then update ---------------------------------------------

    def _now(self) -> float:
        if self.sync_timing and self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def draw_conditions(self) -> torch.Tensor:
        """conditions_per_step ids drawn uniformly from the condition set (cond_gen), on the CPU."""
        idx = torch.randint(0, self.condition_ids.numel(), (self.cfg.rollout.conditions_per_step,),
                            generator=self.cond_gen)
        return self.condition_ids[idx]

    def collect(self) -> RolloutBatch:
        """Rollout of conditions_per_step x group_size samples; submits their rewards (no grad)."""
        with phase("collect"):
            return self._collect()

    def _collect(self) -> RolloutBatch:
        cfg, algo, dev = self.cfg, self.algo, self.device
        t0 = self._now()
        self.policy.eval()
        cond = group_conditions(self.draw_conditions().to(dev), algo.group_size)
        if self.dist is not None:  # this rank's rows; the noise of the global batch, these rows kept
            cond = self.dist.rows(cond)
        window = self._windows.next(self.step) if self._windows is not None else None
        with attention_backend(cfg.rollout.attention_backend):
            ro = self.runner(cond, generator=self.rollout_gen, shard=self._rollout_shard, window=window)
        t_rollout = self._now()
        metrics = {"time_rollout": t_rollout - t0, "rollout_nfe": self._rollout_nfe}
        if window is not None:
            metrics["sde_window_first"] = window[0]
        steps = self.trained_steps if window is None else list(range(window[0], window[0] + window[1]))
        pending = None
        if algo.use_reward:
            with phase("reward"):  # in-process: the reward itself; with workers: handing the batch over
                pending = self.reward_requests.submit(self.decode(ro.samples), cond)
        metrics["time_reward_submit"] = self._now() - t_rollout
        old_lp = ro.log_probs
        if cfg.rollout.recompute_old_logprobs:
            with phase("old_logprob"):
                old_lp = old_lp.clone()
                old_lp[:, steps] = recompute_log_probs(self._rollout_policy, self.sampler, ro, steps=steps)
        return RolloutBatch(ro, old_lp, metrics, pending, trained_steps=steps)

    def batch_steps(self, batch: RolloutBatch) -> list[int]:
        """The steps `batch` trains: its own (`batch.trained_steps`), else its rollout's SDE window's,
        else the trainer's fixed `trained_steps`."""
        if batch.trained_steps is not None:
            return list(batch.trained_steps)
        window = getattr(batch.rollout, "window", None)
        if window is not None:
            return list(range(window[0], window[0] + window[1]))
        if self.trained_steps is None:
            raise ValueError("Trainer: with a random or sliding sampler.sde_window each RolloutBatch must carry its "
                             "trained steps (collect() sets them) or a rollout with its window")
        return self.trained_steps

    def await_rewards(self, batch: RolloutBatch) -> RewardOutcome:
        """Waits for the rewards of `batch`, gathers them over ranks, and returns this rank's rows of the
        group-normalised advantages with the reward metrics (computed once per batch; every rank calls it)."""
        if batch.rewards is None:
            if batch.pending is None:
                raise ValueError("await_rewards: this batch has no rewards (the method does not use them)")
            batch.rewards = self._resolve_rewards(batch.pending)
        return batch.rewards

    def _resolve_rewards(self, pending) -> RewardOutcome:
        algo = self.algo
        with phase("reward/wait"):
            res = pending.result()
        batch, dropped = res.batch, int(res.dropped)
        wait, invalid = res.wait_s, int(res.invalid)
        if self.dist is not None:  # the global batch's rewards, as on one process
            batch = self._gathered(batch)
            wait = self.dist.reduce({"wait": wait}, "max")["wait"]
            counts = self.dist.reduce({"dropped": dropped, "invalid": invalid}, "sum")
            dropped, invalid = round(counts["dropped"]), round(counts["invalid"])
        self._report_dropped_rewards(res, invalid_anywhere=invalid > 0)
        n_bad = int((~batch.valid).sum())
        self.invalid_rewards += n_bad
        self.dropped_reward_batches += dropped
        with phase("advantage"):
            comps = torch.stack([batch.components[n] for n in self.reward_requests.names])
            weights = torch.tensor(self.reward_requests.weights, device=comps.device)
            adv = group_advantages(comps, algo.group_size, eps=algo.adv_eps, clip=algo.adv_clip,
                                   lambda_transform=algo.adv_lambda, valid=batch.valid, weights=weights,
                                   std=algo.adv_std).to(self.device)
        reward = batch.total[batch.valid].mean().item() if bool(batch.valid.any()) else float("nan")
        metrics = dict(reward=reward, invalid_rewards=n_bad, reward_batches_dropped=dropped,
                       adv_abs=adv.abs().mean().item(), time_reward=res.compute_s, time_reward_wait=wait)
        # computed per group on the global batch; keep this rank's rows
        return RewardOutcome(adv if self.dist is None else self.dist.rows(adv), metrics)

    def _report_dropped_rewards(self, res, *, invalid_anywhere: bool) -> None:
        """A batch the reward workers dropped is never silent: a reward that broke its contract (NaN/inf,
        wrong shape) stops the run under run.on_invalid_reward = "error" (on every rank, when any rank's
        did); any other drop warns with the cause (and is counted in reward_batches_dropped)."""
        if invalid_anywhere and self.cfg.run.on_invalid_reward == "error":
            cause = res.cause if res.invalid else "(on another rank; its log has the cause)"
            raise RewardFailedError(f"step {self.step + 1}: the reward workers got an invalid reward "
                                    f"(run.on_invalid_reward = 'error'):\n{cause}")
        if not res.dropped:
            return
        msg = (f"step {self.step + 1}: the reward workers dropped a batch (after its retries); its samples "
               f"get advantage 0. Cause:\n{res.cause}")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        self.log(f"WARNING {msg}")

    def _gathered(self, local):
        """This rank's RewardBatch, all-gathered into the global batch's (in rank order)."""
        from ddrl_engine.rewards.base import RewardBatch

        g = self.dist.gather
        n_invalid = {k: round(v) for k, v in self.dist.reduce(dict(local.n_invalid), "sum").items()}
        return RewardBatch(components={n: g(local.components[n]) for n in self.reward_requests.names},
                           valid=g(local.valid), n_invalid=n_invalid, total=g(local.total))

    def update(self, batch: RolloutBatch) -> dict:
        """ppo_epochs optimiser steps on one rollout batch: policy loss + data loss (+ KL)."""
        with phase("update"):
            return self._update(batch)

    def _update(self, batch: RolloutBatch) -> dict:
        """Per epoch: the data pass (it needs no rewards, so reward workers still computing overlap it),
        then the rewards awaited, then the policy pass (policy loss and KL), then the optimizer step;
        after the epochs the LR schedule steps. Each pass runs one backward per trained step and
        micro-batch (optim.micro_batch rows), each micro-batch's loss weighted by its share of the
        rank's rows, so the accumulated gradient is the whole batch's (up to rounding)."""
        algo = self.algo
        t0 = self._now()
        data = self._next_data()
        self.policy.train()
        plan = _UpdatePlan.make(self, batch, data)
        acc = _Accumulators()
        lr = self.opt.param_groups[0]["lr"]
        for epoch in range(algo.ppo_epochs):
            self.opt.zero_grad(set_to_none=True)
            synced = self._grad_syncs(plan.backwards)
            if data is not None:
                self._data_pass(data, batch.rollout, plan, synced, acc)
            adv = self.await_rewards(batch).advantages if algo.use_reward else None
            if plan.policy_pass:
                self._policy_pass(batch, adv, plan, synced, acc, first_epoch=epoch == 0)
            grad_norm = self._optimizer_step()
        self.scheduler.step()
        self.step += 1
        metrics = dict(batch.metrics)
        if batch.rewards is not None:
            metrics.update(batch.rewards.metrics)
        metrics.update(self._loss_metrics(acc, plan.n_trained * algo.ppo_epochs,
                                          {"data_loss": max(plan.n_data, 1) * algo.ppo_epochs}))
        metrics.update(grad_norm=grad_norm.item(), time_train=self._now() - t0, lr=lr)
        return metrics

    def _next_data(self):
        """(x0, y) of this update: this rank's rows of the global data batch (None without data loss)."""
        if self.data is None:
            return None
        x0, y = self.data.next_batch()
        x0, y = x0.to(self.device), y.to(self.device)
        if self.dist is not None:
            x0, y = self.dist.rows(x0), self.dist.rows(y)
        return x0, y

    def _data_pass(self, data, ro: Rollout, plan: "_UpdatePlan", synced, acc: "_Accumulators") -> None:
        """The data loss (the forward-KL regulariser) at the update's data steps, with backward."""
        x0, y = data
        for k in self._data_steps(plan.n_data, plan.steps):
            if self.algo.data_noise == "rollout":
                eps, kd = ro.initial_noise, k
            else:
                eps = draw_noise(x0.shape, generator=self.data_gen, device=self.device, shard=self._data_shard)
                kd = int(self.sampler.sample_steps(1, generator=self.data_gen, device=self.data_gen.device).item())
            level = self.sampler.to(self.device).level(kd)
            for part, share in plan.data_parts:
                with phase("train/step", k), next(synced):
                    with phase("train/data_loss"):
                        dat = policy_data_loss(self.policy, x0[part], y[part], eps[part], level,
                                               **self.forms.data_kwargs) * share
                    acc.sums["data_loss"].append(dat.detach())
                    self._backward(combine(None, dat, None, **plan.data_scale))

    def _policy_pass(self, batch: RolloutBatch, adv, plan: "_UpdatePlan", synced, acc: "_Accumulators", *,
                     first_epoch: bool) -> None:
        """The clipped policy loss (with the rewards) and the KL to the reference, per trained step."""
        algo, ro, old_lp = self.algo, batch.rollout, batch.old_log_probs
        cond = ro.cond
        for i, k in enumerate(plan.steps):
            step_devs = []
            for part, share in plan.roll_parts:
                with phase("train/step", k), next(synced):
                    x_k, x_next = ro.states[part, k], ro.states[part, k + 1]
                    prev = None if ro.prev_outs is None else ro.prev_outs[part, k]  # a multistep solver's offset
                    pol = kl = None
                    with phase("train/forward"):
                        res = transition(self._rollout_policy, self.sampler, x_k, k, cond[part], x_next=x_next,
                                         reduction=algo.logprob_reduction, prev_out=prev)
                    if algo.use_reward:
                        pol, stats = clipped_policy_loss(res.log_prob, old_lp[part, k], adv[part], algo.clip_eps,
                                                         log_ratio_scale=self.forms.log_ratio(k))
                        pol = pol * share
                        acc.sums["policy_loss"].append(pol.detach())
                        acc.sums["clip_frac"].append(stats.clip_frac * share)
                        step_devs.append(stats.ratio_max_dev)
                        if first_epoch and i == 0:
                            # What the rollout's attention backend (e.g. fp8) shifts the log-probs by.
                            lm = logprob_mismatch(ro.log_probs[part, k], res.log_prob).detach() * share
                            acc.first["logprob_mismatch"] = acc.first.get("logprob_mismatch", 0) + lm
                    if self.reference is not None:
                        with torch.no_grad(), phase("train/reference"):
                            ref = transition(self._rollout_reference, self.sampler, x_k, k, cond[part], x_next=x_next,
                                             reduction=algo.logprob_reduction, prev_out=prev)
                        std = self.sampler.coefs(k).std.to(self.device).expand(x_k.shape[0])
                        kl = gaussian_kl(res.mean, ref.mean, std, algo.logprob_reduction)
                        kl = self.forms.kl(kl, k).mean() * share  # kl_form: exact, or times |dt_k|
                        acc.sums["kl"].append(kl.detach())
                    self._backward(combine(pol, None, kl, **plan.scale))
            if step_devs:
                acc.ratio_devs.append(torch.stack(step_devs).max())

    def _optimizer_step(self) -> torch.Tensor:
        """Clip, optimizer step, EMA; returns the (global) gradient norm before clipping."""
        with phase("optimizer"):
            max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)
            if self.dist is not None:
                grad_norm = self.dist.full(grad_norm)
            if not torch.isfinite(grad_norm):
                raise FloatingPointError(f"step {self.step}: non-finite gradient norm {grad_norm.item()}; "
                                         "lower optim.lr or check the reward scale")
            self.opt.step()
            self._update_ema()
        return grad_norm

    def _data_steps(self, n_data: int, steps: list[int]) -> list[int]:
        """The trained steps (`steps`, the batch's) the data loss is computed at: all of them, or one
        drawn uniformly (algorithm.data_loss_steps = "one"; from the data generator, so ranks agree)."""
        if n_data in (0, len(steps)):
            return steps[:n_data]
        i = int(torch.randint(0, len(steps), (1,), generator=self.data_gen, device=self.data_gen.device).item())
        return [steps[i]]

    def _backward(self, loss: torch.Tensor) -> None:
        with phase("train/backward"):
            loss.backward()

    def _grad_syncs(self, backwards: int):
        """One context per backward of an update epoch: gradients are reduced across ranks at every
        backward, or only at the last one (distributed.grad_sync)."""
        for i in range(backwards):
            if self.dist is None:
                yield contextlib.nullcontext()
            else:
                yield self.dist.grad_sync(self.policy, enabled=not self._defer_grad_sync or i == backwards - 1)

    def _loss_metrics(self, acc: "_Accumulators", denom: int, denoms: dict) -> dict:
        """Means of the losses over trained steps and epochs (and ranks), with one host sync, and the
        largest |ratio - 1| (over ranks): summed over trained steps, and at the first trained step
        (on-policy it must be 0: exactly on CPU). denoms: per-metric denominators where they differ
        from `denom` (the data loss may run at one step per update)."""
        out = {k: (torch.stack(v).sum().item() / denoms.get(k, denom) if v else 0.0) for k, v in acc.sums.items()}
        devs = torch.stack(acc.ratio_devs).tolist() if acc.ratio_devs else []
        first = {k: v.item() for k, v in acc.first.items()}
        if self.dist is not None:  # means over equal shards: the global batch's means; maxima per trained step
            out = self.dist.reduce(out, "mean")
            first = self.dist.reduce(first, "mean")
            devs = list(self.dist.reduce({f"{i:06d}": d for i, d in enumerate(devs)}, "max").values())
        out["ratio_dev"] = sum(devs) / denom
        if devs:
            out["ratio_dev_first"] = devs[0]
        return out | first

    def train_step(self) -> dict:
        with phase("step"):
            metrics = self.update(self.collect())
        metrics["ops_reference"] = int(ops_selftest.use_reference())  # 1: DDRL_ENGINE_OPS=reference ran
        return metrics

    @torch.no_grad()
    def _update_ema(self):
        if self.ema is not None:
            for pe, pm in zip(self.ema.parameters(), self.policy.parameters()):
                if pm.requires_grad:  # a frozen base (LoRA) stays the base (shared, or a copy under FSDP2)
                    pe.lerp_(pm, 1 - self.cfg.optim.ema_decay)

    # ---- evaluation, logging, checkpoints -----------------------------------------------------

    def eval_policy(self):
        return self.ema if self.ema is not None else self._module()

    def evaluate(self) -> dict | None:
        if self.evaluator is None:
            return None
        with phase("eval"):
            return self._evaluate()

    def _evaluate(self) -> dict:
        # Under guidance the evaluator gets the guided policy (its samples use the rollouts' guidance;
        # `Evaluator` scores the held-out data loss with the unguided `.inner`).
        metrics, self.last_eval_samples = self.evaluator(self._guided(self.eval_policy()), self.sampler,
                                                         self.sample_shape, self.device)
        if self.cfg.eval.save_samples and self._is_writer() and callable(getattr(self.evaluator, "save_samples", None)):
            self.evaluator.save_samples(self.last_eval_samples, self.out / "samples" / f"step_{self.step:07d}")
        if "heldout_data_loss" in metrics:  # the hacking monitor, when the evaluator measures it
            self.heldout.update(self.step, metrics["heldout_data_loss"])  # warns past the threshold
            metrics["heldout_rise"] = self.heldout.rise
        metrics["early_stop"] = bool(self.heldout.should_stop)
        return metrics

    def _is_writer(self) -> bool:
        """Whether this process writes the run's files (rank 0 of a distributed run)."""
        return self.dist is None or self.dist.rank == 0

    def _write_metrics(self, kind: str, metrics: dict):
        if not self._is_writer():
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"kind": kind, "step": self.step, **metrics}) + "\n")

    def modules(self) -> dict:
        """The trainer's networks by checkpoint name: model (unwrapped), and ema / reference when kept."""
        mods = {"model": self._module()}
        if self.ema is not None:
            mods["ema"] = self.ema
        if self.reference is not None:
            mods["reference"] = self.reference
        return mods

    def state_dict(self) -> dict:
        """Everything a checkpoint holds: each module's trained weights (sharded under FSDP2; a LoRA
        run's adapters only, for the EMA and reference too), the optimizer
        (keyed by parameter names) and, under "trainer", the LR schedule, the step, RNG and generator
        states, the data order, the held-out monitor and the reward counters."""
        policy = self._module()  # a LoRA run writes its adapters only (the frozen base is the model folder's)
        sd = {name: select_trainable(m, get_model_state_dict(m), like=policy) for name, m in self.modules().items()}
        sd[OPTIMIZER_KEY] = get_optimizer_state_dict(self._module(), self.opt)
        sd[TRAINER_KEY] = {
            "step": self.step, "scheduler": self.scheduler.state_dict(), "rng": _rng_state(self.device),
            "rollout_gen": self.rollout_gen.get_state(), "cond_gen": self.cond_gen.get_state(),
            "data_gen": self.data_gen.get_state(), "data": None if self.data is None else self.data.state_dict(),
            "heldout": self.heldout.state_dict(), "invalid_rewards": self.invalid_rewards,
            "dropped_reward_batches": self.dropped_reward_batches}
        if self._windows is not None and self._windows.gen is not None:  # a random SDE window's draws
            sd[TRAINER_KEY]["sde_window_gen"] = self._windows.gen.get_state()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        """Restores a `state_dict()` (modules strictly: every weight of every module kept)."""
        policy = self._module()
        for name, module in self.modules().items():
            if name not in sd:
                raise KeyError(f"load_state_dict: the state has no {name!r} weights (this run keeps {sorted(self.modules())})")
            keys = trainable_keys(module, like=policy)
            if keys is not None and set(sd[name]) != keys:  # adapters only: exactly the trained tensors
                diff = sorted(set(sd[name]) ^ keys)
                raise ValueError(f"load_state_dict: the {name!r} state does not hold exactly the trained tensors "
                                 f"({len(diff)} differ, e.g. {', '.join(diff[:3])})")
            set_model_state_dict(module, sd[name], options=StateDictOptions(strict=keys is None))
        opt_sd = sd[OPTIMIZER_KEY]
        if all(isinstance(i, int) for g in opt_sd.get("param_groups", []) for i in g["params"]):
            self.opt.load_state_dict(opt_sd)  # optimizer.state_dict() (one-process checkpoints before 0.2)
        else:
            set_optimizer_state_dict(self._module(), self.opt, opt_sd)
        st = sd[TRAINER_KEY]
        self.step = st["step"]
        if st.get("scheduler") is not None:  # absent in checkpoints from before the LR schedules
            self.scheduler.load_state_dict(st["scheduler"])
        _set_rng_state(st["rng"], self.device)
        self.rollout_gen.set_state(st["rollout_gen"])
        self.cond_gen.set_state(st["cond_gen"])
        self.data_gen.set_state(st["data_gen"])
        if self.data is not None and st["data"] is not None:
            self.data.load_state_dict(st["data"])
        self.heldout.load_state_dict(st["heldout"])
        self.invalid_rewards = st["invalid_rewards"]
        self.dropped_reward_batches = st.get("dropped_reward_batches", 0)  # absent before this counter existed
        if self._windows is not None and self._windows.gen is not None:
            if "sde_window_gen" not in st:
                raise ValueError("load_state_dict: this run draws a random sampler.sde_window per batch, but the state "
                                 "has no 'sde_window_gen' (it was saved by a run without one)")
            self._windows.gen.set_state(st["sde_window_gen"])

    def save(self) -> Path:
        """A checkpoint of `state_dict()` at this step (every rank calls it in a distributed run)."""
        with phase("checkpoint"):
            return self.checkpoints.save(self.step, self.state_dict(), config=self.cfg.to_dict())

    def resume(self, path: str | Path | None = None) -> bool:
        """Loads the given checkpoint, or the one to resume from (`CheckpointManager.resumable`: the one
        `latest` names when whole, else the newest whole one, with a warning); returns False when there
        is none. A damaged checkpoint given by path is an error naming the file."""
        if path:
            path = Path(path)
            why = verify_checkpoint(path)
            if why is not None:
                raise CheckpointError(f"cannot resume from {path}: {why}")
        else:
            path = self.checkpoints.resumable(log=self.log)
        if path is None:
            return False
        self.load_state_dict(self.checkpoints.load(path, self.state_dict(), map_location=self.device))
        self.checkpoints.adopt(path)
        self._resumed = True
        self._truncate_metrics()
        self.log(f"resumed from {path} at step {self.step}")
        return True

    def _truncate_metrics(self):
        """Drops metrics logged after the checkpoint, so a resumed log reads like an uninterrupted one;
        a line that does not parse (a write torn by a kill or a full disk) is dropped with a warning."""
        path = self.out / "metrics.jsonl"
        if not (path.exists() and self._is_writer()):
            return
        keep = []
        for i, ln in enumerate(path.read_text().splitlines(), 1):
            if not ln.strip():
                continue
            try:
                step = json.loads(ln)["step"]
            except (ValueError, KeyError, TypeError):
                self.log(f"WARNING {path}: dropped line {i}, which is not a whole metrics record "
                         f"(a write cut short): {ln[:80]!r}")
                continue
            if step <= self.step:  # the checkpoint was taken after this step's eval line: keep it once
                keep.append(ln)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, path)

    def _set_aside_metrics(self):
        """A run starting at step 0 moves an earlier metrics.jsonl (a run killed before its first
        checkpoint, or one restarted) aside to metrics.jsonl.old-N, so the log holds one run only."""
        path = self.out / "metrics.jsonl"
        if self._resumed or not self._is_writer() or not path.exists() or path.stat().st_size == 0:
            return
        n = 1
        while path.with_name(f"{path.name}.old-{n}").exists():
            n += 1
        os.replace(path, path.with_name(f"{path.name}.old-{n}"))
        self.log(f"{path} of an earlier run moved to {path.name}.old-{n}")

    def _on_sigterm(self, signum, frame):
        self._stop_signal = signum

    def train(self, steps: int | None = None) -> list[dict]:
        """Runs until `steps` (default cfg.run.steps) total steps; returns the eval metrics logged."""
        steps = self.cfg.run.steps if steps is None else steps
        self.out.mkdir(parents=True, exist_ok=True)
        if self._is_writer():
            (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2, default=str))
        in_main = threading.current_thread() is threading.main_thread()
        # SIGTERM and Ctrl-C (SIGINT): finish the step, checkpoint, exit 128 + the signal's number.
        previous = {s: signal.signal(s, self._on_sigterm) for s in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
        evals = []
        try:
            if self.step == 0:
                self._set_aside_metrics()
            if self.step == 0 and self.evaluator is not None:
                m = self.evaluate()
                self._write_metrics("eval", m)
                evals.append({"step": 0, **m})
            bar = tqdm(total=steps, initial=self.step, desc=f"{self.algo.method}", disable=not (self.cfg.run.progress and self._is_writer()),
                       leave=False)
            while self.step < steps:
                m = self.train_step()
                self._write_metrics("train", m)
                bar.update(1)
                bar.set_postfix({k: f"{m[k]:.3g}" for k in ("reward", "data_loss", "kl") if m.get(k)})
                last = self.step == steps
                if self.evaluator is not None and (self.step % self.cfg.run.eval_every == 0 or last):
                    e = self.evaluate()
                    self._write_metrics("eval", e)
                    evals.append({"step": self.step, **e})
                    if e["early_stop"]:
                        self.log(f"early stop at step {self.step}: held-out data loss rose {e['heldout_rise']:.1%}")
                        self.save()
                        break
                if self._stop_signal:
                    name = signal.Signals(self._stop_signal).name
                    self.log(f"{name}: checkpoint at step {self.step}, exiting")
                    self.save()
                    raise SystemExit(128 + int(self._stop_signal))
                if last or (self.cfg.run.ckpt_every and self.step % self.cfg.run.ckpt_every == 0):
                    self.save()
            bar.close()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return evals
