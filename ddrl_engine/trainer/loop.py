"""The DDRL training loop: rollout -> rewards -> advantages -> clipped policy loss + data loss (+ KL)
-> backward, clip, AdamW, EMA; with evaluation, metrics.jsonl, atomic checkpoints and exact resume.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ddrl_engine.algorithms import clipped_policy_loss, combine, data_loss, gaussian_kl, group_advantages
from ddrl_engine.attention import attention_backend, available_backends
from ddrl_engine.monitors import HeldoutLossMonitor
from ddrl_engine.profiling import phase
from ddrl_engine.sampling.mismatch import logprob_mismatch
from ddrl_engine.sampling import Rollout, RolloutRunner, group_conditions, transition
from ddrl_engine.sampling.step import draw_noise
from ddrl_engine.trainer.builders import build_data_stream
from ddrl_engine.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ddrl_engine.trainer.config import TrainConfig, check_config
from ddrl_engine.trainer.distributed import Distributed, is_dcp_checkpoint, load_dcp_checkpoint, save_dcp_checkpoint
from ddrl_engine.trainer.evaluate import Evaluator, decode
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


class RolloutBatch:
    """What one step trains on: the rollout, its old log-probs [B, K] and metrics, and its advantages
    [B] (None for sft). With reward workers the rewards may still be computing: `advantages` waits
    for them on first access (and adds the reward metrics), so the trainer reads it as late as it can.
    """

    def __init__(self, rollout: Rollout, old_log_probs: torch.Tensor, metrics: dict, resolve=None):
        self.rollout, self.old_log_probs, self.metrics = rollout, old_log_probs, metrics
        self._resolve, self._advantages = resolve, None

    @property
    def advantages(self) -> torch.Tensor | None:
        if self._resolve is not None:
            resolve, self._resolve = self._resolve, None
            self._advantages = resolve()
        return self._advantages


class Trainer:
    """Trains `policy` with DDRL (or a baseline: the method lives in cfg.algorithm).

    policy: the model to train (its current weights are the base). sampler, rewards, dataset and
    evaluator come from trainer.builders for the built-in default, or from the user.
    rewards: a WeightedReward (computed in this process) or an AsyncReward (reward workers, which
        overlap the data-loss pass; see ddrl_engine.trainer.reward_requests).
    decode: what the rewards see of a rollout's samples (default: clamped to the [-1, 1] image range;
        for a latent model pass e.g. the identity, or a VAE decode).
    sync_timing: synchronise the device at each timed boundary, so the time_* metrics are device
        time, not launch time (benchmarks; costs a sync per phase).
    Every phase runs inside a named `ddrl_engine.profiling.phase` range (NVTX + torch.profiler).
    The rollout goes through a `RolloutRunner` (eager, or a CUDA graph with rollout.cuda_graph);
    its Rollout views the runner's buffers, valid until the next collect().
    With cfg.distributed.parallel = "ddp" or "fsdp" (under torchrun) each rank rolls out and trains on
    its rows of the global batch (see ddrl_engine.trainer.distributed); `dist` is then set, else None.
    """

    def __init__(self, cfg: TrainConfig, policy, sampler, rewards, dataset, evaluator: Evaluator | None = None,
                 *, log=print, sync_timing: bool = False, decode=decode):
        check_config(cfg)
        if cfg.rollout.cuda_graph:
            RolloutRunner.check_device(cfg.run.device)
        usable, why = available_backends().get(cfg.rollout.attention_backend, (False, "unknown backend"))
        if not usable:
            raise ValueError(f"config: 'rollout.attention_backend' = {cfg.rollout.attention_backend!r} is not "
                             f"usable here: {why}")
        self.cfg, self.log = cfg, log
        self.sync_timing = sync_timing
        par = cfg.distributed.parallel
        self.dist = (Distributed.from_env(par, cfg.run.device, shard_size=cfg.distributed.shard_size)
                     if par != "none" else None)
        self.device = cfg.run.device if self.dist is None else self.dist.device
        self.algo = cfg.algorithm
        self.policy = policy.to(self.device)
        self.sampler = sampler
        self.rewards = rewards
        self.decode = decode
        self.reward_requests = RewardRequests(rewards, cfg.run.on_invalid_reward) if self.algo.use_reward else None
        self.dataset = dataset
        self.evaluator = evaluator
        self.sample_shape = tuple(cfg.model.sample_shape)
        self.out = Path(cfg.run.out_dir)
        self.rollout_batch = cfg.rollout.conditions_per_step * self.algo.group_size
        self.trained_steps = self.algo.trained_steps(sampler.num_steps)
        needs_data = self.algo.beta_data > 0
        self.data = build_data_stream(cfg, dataset, self.rollout_batch) if needs_data else None
        self.reference = copy.deepcopy(policy).requires_grad_(False).eval() if self.algo.beta_kl > 0 else None
        self.ema = copy.deepcopy(policy).requires_grad_(False) if cfg.optim.ema_decay > 0 else None
        self._rollout_shard = self._data_shard = None
        if self.dist is not None:
            first, _ = self.dist.shard(self.rollout_batch, "rollout batch (conditions_per_step x group_size)")
            self._rollout_shard = (first, self.rollout_batch)
            if self.data is not None:
                first, _ = self.dist.shard(self.data.batch_size, "data batch")
                self._data_shard = (first, self.data.batch_size)
            self.policy, self.reference, self.ema = self.dist.wrap(
                self.policy, self.reference, self.ema, activation_checkpointing=cfg.distributed.activation_checkpointing)
        self.runner = RolloutRunner(self._module(), sampler, sample_shape=self.sample_shape,
                                    reduction=self.algo.logprob_reduction, cuda_graph=cfg.rollout.cuda_graph)
        fused = self.device.startswith("cuda")
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                     betas=(cfg.optim.beta1, cfg.optim.beta2), fused=fused)
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
        self._stop_signal = False

    def _module(self):
        """The policy without a DDP wrapper (FSDP2 shards in place: the module itself)."""
        return self.policy if self.dist is None else self.dist.unwrap(self.policy)

    # ---- one training step ------------------------------------------------------------------

    def _now(self) -> float:
        if self.sync_timing and self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _data_loss(self, x0, y, eps, k):
        """The policy's diffusion loss on data at step k's level (with the given noise)."""
        level = self.sampler.network_level(k).to(self.device).expand(x0.shape[0])
        pred = self.policy(self.sampler.noised(x0, eps, k), level, y)
        nc, dc = self.sampler.target_coefs(k)
        return data_loss(pred, x0, eps, nc, dc)

    def collect(self) -> RolloutBatch:
        """Rollout of conditions_per_step x group_size samples, rewards and advantages (no grad)."""
        with phase("collect"):
            return self._collect()

    def _collect(self) -> RolloutBatch:
        cfg, algo, dev = self.cfg, self.algo, self.device
        t0 = self._now()
        self.policy.eval()
        classes = torch.randint(0, cfg.model.num_classes, (cfg.rollout.conditions_per_step,), generator=self.cond_gen)
        cond = group_conditions(classes.to(dev), algo.group_size)
        if self.dist is not None:  # this rank's rows; the noise of the global batch, these rows kept
            cond = self.dist.rows(cond)
        with attention_backend(cfg.rollout.attention_backend):
            ro = self.runner(cond, generator=self.rollout_gen, shard=self._rollout_shard)
        t_rollout = self._now()
        metrics = {"time_rollout": t_rollout - t0}
        resolve = None
        if algo.use_reward:
            with phase("reward"):  # in-process: the reward itself; with workers: handing the batch over
                pending = self.reward_requests.submit(self.decode(ro.samples), cond)
            resolve = functools.partial(self._advantages, pending, metrics)
        metrics["time_reward_submit"] = self._now() - t_rollout
        old_lp = ro.log_probs
        if cfg.rollout.recompute_old_logprobs:
            with torch.no_grad(), phase("old_logprob"):
                old_lp = old_lp.clone()
                for k in self.trained_steps:
                    old_lp[:, k] = transition(self.policy, self.sampler, ro.states[:, k], k, cond,
                                              x_next=ro.states[:, k + 1], reduction=algo.logprob_reduction).log_prob
        return RolloutBatch(ro, old_lp, metrics, resolve)

    def _advantages(self, pending, metrics: dict) -> torch.Tensor:
        """Waits for the rewards of `pending`, gathers them over ranks, and returns this rank's rows of
        the group-normalised advantages; adds the reward metrics to `metrics`."""
        algo = self.algo
        with phase("reward/wait"):
            res = pending.result()
        batch, dropped = res.batch, int(res.dropped)
        wait = res.wait_s
        if self.dist is not None:  # the global batch's rewards, as on one process
            batch = self._gathered(batch)
            wait = self.dist.reduce({"wait": wait}, "max")["wait"]
            dropped = round(self.dist.reduce({"dropped": dropped}, "sum")["dropped"])
        n_bad = int((~batch.valid).sum())
        self.invalid_rewards += n_bad
        self.dropped_reward_batches += dropped
        with phase("advantage"):
            comps = torch.stack([batch.components[n] for n in self.reward_requests.names])
            weights = torch.tensor(self.reward_requests.weights, device=comps.device)
            adv = group_advantages(comps, algo.group_size, eps=algo.adv_eps, clip=algo.adv_clip,
                                   lambda_transform=algo.adv_lambda, valid=batch.valid, weights=weights).to(self.device)
        reward = batch.total[batch.valid].mean().item() if bool(batch.valid.any()) else float("nan")
        metrics.update(reward=reward, invalid_rewards=n_bad, reward_batches_dropped=dropped,
                       adv_abs=adv.abs().mean().item(), time_reward=res.compute_s, time_reward_wait=wait)
        # computed per group on the global batch; keep this rank's rows
        return adv if self.dist is None else self.dist.rows(adv)

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
        """Per epoch: the data-loss pass over the trained steps (it needs no rewards, so reward workers
        still computing overlap it), then the policy pass (waits for the advantages; policy loss and
        KL), one backward per trained step and micro-batch (optim.micro_batch rows) in each pass; then
        clip, AdamW and EMA. Each micro-batch's loss is weighted by its share of the rank's rows, so
        the accumulated gradient is the whole batch's (up to rounding)."""
        algo, dev, ro = self.algo, self.device, batch.rollout
        t0 = self._now()
        cond, old_lp = ro.cond, batch.old_log_probs
        if self.data is not None:
            x0, y = self.data.next_batch()
            x0, y = x0.to(dev), y.to(dev)
            if self.dist is not None:  # this rank's rows of the global data batch
                x0, y = self.dist.rows(x0), self.dist.rows(y)
        self.policy.train()
        n_trained = len(self.trained_steps)
        policy_pass = algo.use_reward or self.reference is not None
        roll_parts = micro_batches(ro.states.shape[0], self.cfg.optim.micro_batch)
        data_parts = micro_batches(x0.shape[0], self.cfg.optim.micro_batch) if self.data is not None else []
        n_data = (n_trained if algo.data_loss_steps == "all" else 1) if self.data is not None else 0
        backwards = n_data * len(data_parts) + policy_pass * n_trained * len(roll_parts)
        scale = dict(beta_data=algo.beta_data, beta_kl=algo.beta_kl, num_trained_steps=n_trained)
        data_scale = dict(scale, num_trained_steps=max(n_data, 1))  # the data term: a mean over its steps
        sums: dict[str, list[torch.Tensor]] = {"policy_loss": [], "data_loss": [], "kl": [], "clip_frac": []}
        ratio_devs, first = [], {}
        for epoch in range(algo.ppo_epochs):
            self.opt.zero_grad(set_to_none=True)
            synced = self._grad_syncs(backwards)
            for k in self._data_steps(n_data):
                if algo.data_noise == "rollout":
                    eps, kd = ro.initial_noise, k
                else:
                    eps = draw_noise(x0.shape, generator=self.data_gen, device=dev, shard=self._data_shard)
                    kd = int(torch.randint(0, self.sampler.num_steps, (1,), generator=self.data_gen,
                                           device=self.data_gen.device).item())
                for part, share in data_parts:
                    with phase("train/step", k), next(synced):
                        with phase("train/data_loss"):
                            dat = self._data_loss(x0[part], y[part], eps[part], kd) * share
                        sums["data_loss"].append(dat.detach())
                        self._backward(combine(None, dat, None, **data_scale))
            adv = batch.advantages if algo.use_reward else None  # waits for the rewards
            for i, k in enumerate(self.trained_steps if policy_pass else ()):
                step_devs = []
                for part, share in roll_parts:
                    with phase("train/step", k), next(synced):
                        x_k, x_next = ro.states[part, k], ro.states[part, k + 1]
                        pol = kl = None
                        with phase("train/forward"):
                            res = transition(self.policy, self.sampler, x_k, k, cond[part], x_next=x_next,
                                             reduction=algo.logprob_reduction)
                        if algo.use_reward:
                            pol, stats = clipped_policy_loss(res.log_prob, old_lp[part, k], adv[part], algo.clip_eps)
                            pol = pol * share
                            sums["policy_loss"].append(pol.detach())
                            sums["clip_frac"].append(stats.clip_frac * share)
                            step_devs.append(stats.ratio_max_dev)
                            if epoch == 0 and i == 0:
                                # What the rollout's attention backend (e.g. fp8) shifts the log-probs by.
                                lm = logprob_mismatch(ro.log_probs[part, k], res.log_prob).detach() * share
                                first["logprob_mismatch"] = first.get("logprob_mismatch", 0) + lm
                        if self.reference is not None:
                            with torch.no_grad(), phase("train/reference"):
                                ref = transition(self.reference, self.sampler, x_k, k, cond[part], x_next=x_next,
                                                 reduction=algo.logprob_reduction)
                            std = self.sampler.coefs(k).std.to(dev).expand(x_k.shape[0])
                            kl = gaussian_kl(res.mean, ref.mean, std, algo.logprob_reduction).mean() * share
                            sums["kl"].append(kl.detach())
                        self._backward(combine(pol, None, kl, **scale))
                if step_devs:
                    ratio_devs.append(torch.stack(step_devs).max())
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
        self.step += 1
        metrics = dict(batch.metrics)
        metrics.update(self._loss_metrics(sums, ratio_devs, first, n_trained * algo.ppo_epochs,
                                          {"data_loss": max(n_data, 1) * algo.ppo_epochs}))
        metrics.update(grad_norm=grad_norm.item(), time_train=self._now() - t0)
        return metrics

    def _data_steps(self, n_data: int) -> list[int]:
        """The trained steps the data loss is computed at: all of them, or one drawn uniformly
        (algorithm.data_loss_steps = "one"; from the data generator, so ranks agree)."""
        if n_data in (0, len(self.trained_steps)):
            return self.trained_steps[:n_data]
        i = int(torch.randint(0, len(self.trained_steps), (1,), generator=self.data_gen,
                              device=self.data_gen.device).item())
        return [self.trained_steps[i]]

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

    def _loss_metrics(self, sums: dict, ratio_devs: list, first: dict, denom: int, denoms: dict) -> dict:
        """Means of the losses over trained steps and epochs (and ranks), with one host sync, and the
        largest |ratio - 1| (over ranks): summed over trained steps, and at the first trained step
        (on-policy it must be 0: exactly on CPU). denoms: per-metric denominators where they differ
        from `denom` (the data loss may run at one step per update)."""
        out = {k: (torch.stack(v).sum().item() / denoms.get(k, denom) if v else 0.0) for k, v in sums.items()}
        devs = torch.stack(ratio_devs).tolist() if ratio_devs else []
        first = {k: v.item() for k, v in first.items()}
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
            return self.update(self.collect())

    @torch.no_grad()
    def _update_ema(self):
        if self.ema is not None:
            for pe, pm in zip(self.ema.parameters(), self.policy.parameters()):
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
        metrics, self.last_eval_samples = self.evaluator(self.eval_policy(), self.sampler, self.sample_shape, self.device)
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

    def state(self) -> dict:
        return {"step": self.step, "optimizer": self.opt.state_dict(), "rng": _rng_state(self.device),
                "rollout_gen": self.rollout_gen.get_state(), "cond_gen": self.cond_gen.get_state(),
                "data_gen": self.data_gen.get_state(), "data": None if self.data is None else self.data.state_dict(),
                "heldout": self.heldout.state_dict(), "invalid_rewards": self.invalid_rewards,
                "dropped_reward_batches": self.dropped_reward_batches}

    def modules(self) -> dict:
        mods = {"model": self._module()}
        if self.ema is not None:
            mods["ema"] = self.ema
        if self.reference is not None:
            mods["reference"] = self.reference
        return mods

    def save(self) -> Path:
        with phase("checkpoint"):
            if self.dist is not None:
                state = self.state()
                del state["optimizer"]  # in the DCP shards
                return save_dcp_checkpoint(self.dist, self.out / "checkpoints", self.step, modules=self.modules(),
                                           optimizer=self.opt, state=state, config=self.cfg.to_dict(),
                                           keep=self.cfg.run.keep_checkpoints)
            return save_checkpoint(self.out / "checkpoints", self.step, modules=self.modules(), state=self.state(),
                                   config=self.cfg.to_dict(), keep=self.cfg.run.keep_checkpoints)

    def resume(self, path: str | Path | None = None) -> bool:
        """Loads the given (or latest) checkpoint; returns False when there is none."""
        path = Path(path) if path else latest_checkpoint(self.out / "checkpoints")
        if path is None:
            return False
        if is_dcp_checkpoint(path):  # written by a distributed run, at any world size
            st = load_dcp_checkpoint(path, modules=self.modules(), optimizer=self.opt, map_location=self.device)
        else:
            if self.dist is not None:
                raise ValueError(f"{path} is a one-process checkpoint; a distributed run resumes from checkpoints "
                                 "of distributed runs (any world size, including a 1-process torchrun)")
            st = load_checkpoint(path, self.modules(), map_location=self.device)
            self.opt.load_state_dict(st["optimizer"])
        self.step = st["step"]
        _set_rng_state(st["rng"], self.device)
        self.rollout_gen.set_state(st["rollout_gen"])
        self.cond_gen.set_state(st["cond_gen"])
        self.data_gen.set_state(st["data_gen"])
        if self.data is not None and st["data"] is not None:
            self.data.load_state_dict(st["data"])
        self.heldout.load_state_dict(st["heldout"])
        self.invalid_rewards = st["invalid_rewards"]
        self.dropped_reward_batches = st.get("dropped_reward_batches", 0)  # absent before this counter existed
        self._truncate_metrics()
        self.log(f"resumed from {path} at step {self.step}")
        return True

    def _truncate_metrics(self):
        """Drops metrics logged after the checkpoint, so a resumed log reads like an uninterrupted one."""
        path = self.out / "metrics.jsonl"
        if path.exists() and self._is_writer():
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            # The checkpoint was taken after this step's eval line was written: keep it once.
            path.write_text("".join(ln + "\n" for ln in keep))

    def _on_sigterm(self, signum, frame):
        self._stop_signal = True

    def train(self, steps: int | None = None) -> list[dict]:
        """Runs until `steps` (default cfg.run.steps) total steps; returns the eval metrics logged."""
        steps = self.cfg.run.steps if steps is None else steps
        self.out.mkdir(parents=True, exist_ok=True)
        if self._is_writer():
            (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2, default=str))
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if in_main else None
        evals = []
        try:
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
                    self.log(f"SIGTERM: checkpoint at step {self.step}, exiting")
                    self.save()
                    raise SystemExit(143)
                if last or (self.cfg.run.ckpt_every and self.step % self.cfg.run.ckpt_every == 0):
                    self.save()
            bar.close()
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)
        return evals
