"""Whole-config checks that must pass before anything expensive (pretraining, model loading) starts.

`check_values(cfg)`: what a config means on any machine: every number finite, ranges that span
sections (trained steps within the sampler's steps, the data batch against the rollout batch, reward
weights). Run by `check_config`, so on every load and by the Trainer.
`check_runnable(cfg)`: what this machine and launch must offer: the device exists, the world size
divides the batches, the built-in rewards are known, the rollout buffers and the model fit in memory.
Run by the command line right after the config is loaded (with its overrides) and by the Trainer.
Each error is one line naming the field.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch

_SECTIONS = ("run", "optim", "rollout", "data", "eval", "pretrain", "distributed", "reward_workers", "model")


def _finite_floats(section: str, obj) -> None:
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        values = v if isinstance(v, (list, tuple)) else [v]
        for x in values:
            if isinstance(x, float) and not math.isfinite(x):
                raise ValueError(f"config: '{section}.{f.name}' must be finite, got {v!r}")


def check_values(cfg) -> None:
    """Machine-independent checks across fields and sections (see the module docstring)."""
    for name in _SECTIONS:
        _finite_floats(name, getattr(cfg, name))
    if not 0 <= cfg.optim.ema_decay < 1:
        raise ValueError(f"config: 'optim.ema_decay' must be in [0, 1) (0 = no EMA), got {cfg.optim.ema_decay}")
    if cfg.run.seed < 0:
        raise ValueError(f"config: 'run.seed' must be >= 0, got {cfg.run.seed}")
    if not cfg.run.heldout_rise_threshold > 0:
        raise ValueError(f"config: 'run.heldout_rise_threshold' must be > 0, got {cfg.run.heldout_rise_threshold}")
    for name, w in cfg.rewards.items():
        if not math.isfinite(w):
            raise ValueError(f"config: 'rewards.{name}' (a weight) must be finite, got {w}")
    try:
        cfg.algorithm.trained_steps(cfg.sampler.num_steps)  # the Trainer's own check, made at load
    except ValueError as e:
        raise ValueError(f"config: {e} (sampler.num_steps = {cfg.sampler.num_steps})") from None
    rollout_batch = cfg.rollout.conditions_per_step * cfg.algorithm.group_size
    batch = cfg.data.batch_size or rollout_batch
    if cfg.algorithm.beta_data > 0 and cfg.algorithm.data_noise == "rollout" and batch != rollout_batch:
        raise ValueError(f"config: 'data.batch_size' = {batch} must equal the rollout batch ({rollout_batch} = "
                         "rollout.conditions_per_step x algorithm.group_size) when algorithm.data_noise = 'rollout' "
                         "(each data sample is paired with a rollout's noise)")


def _device(cfg) -> torch.device:
    text = cfg.run.device
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"config: 'run.device' = {text!r} is not a device (use 'cpu' or 'cuda[:N]'): {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"config: 'run.device' = {text!r}: the engine runs on 'cpu' or 'cuda[:N]'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"config: 'run.device' = {text!r}, but torch sees no CUDA GPU here "
                             f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use run.device = 'cpu' "
                             "or --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"config: 'run.device' = {text!r}, but only {torch.cuda.device_count()} CUDA device(s) "
                             "are visible")
    return dev


def _available_bytes(dev: torch.device) -> int | None:
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev.index or 0).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _dit_bytes(cfg) -> tuple[int, int]:
    """(rollout buffers, weights and optimizer state) of the built-in DiT run, in bytes, a lower bound."""
    m = cfg.model
    sample = m.in_channels * math.prod(m.sample_size)
    rollout_batch = cfg.rollout.conditions_per_step * cfg.algorithm.group_size
    states = rollout_batch * (cfg.sampler.num_steps + 2) * sample * 4
    per_block = (4 + 2 * m.mlp_ratio) * m.hidden ** 2  # attention + MLP weights of one block
    params = m.depth * per_block + m.hidden * (m.timestep_freq_dim + m.num_classes + 1)
    copies = 4 + (cfg.optim.ema_decay > 0) + (cfg.algorithm.beta_kl > 0)  # weights, grads, two Adam moments
    return int(states), int(params * 4 * copies)


def check_runnable(cfg, *, built_from_config: bool = True) -> None:
    """Machine- and launch-dependent checks (see the module docstring). built_from_config=False (the
    Trainer, given its policy and reward objects): only the device and the world size."""
    from ddrl_engine.models.dit import DiTConfig

    dev = _device(cfg)
    if cfg.distributed.parallel != "none" and "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        cp = getattr(cfg.distributed, "context_parallel", 1) or 1
        if world % cp:
            raise ValueError(f"config: 'distributed.context_parallel' = {cp} must divide the world size ({world})")
        data_ranks = world // cp  # the ranks of a context-parallel group hold the same samples
        what = f"the number of data ranks ({data_ranks} = world size {world} / context_parallel {cp})" if cp > 1 \
            else f"the world size ({world})"
        rollout_batch = cfg.rollout.conditions_per_step * cfg.algorithm.group_size
        if rollout_batch % data_ranks:
            raise ValueError(f"config: the rollout batch ({rollout_batch} = rollout.conditions_per_step x "
                             f"algorithm.group_size) must be divisible by {what}")
        data_batch = cfg.data.batch_size or rollout_batch
        if cfg.algorithm.beta_data > 0 and data_batch % data_ranks:
            raise ValueError(f"config: 'data.batch_size' = {data_batch} must be divisible by {what}")
    if not built_from_config or not isinstance(cfg.model, DiTConfig):
        return  # objects given to the Trainer; pipeline rewards, folders, sizes: pipelines.preflight
    from ddrl_engine.trainer.builders import check_reward_names

    check_reward_names(cfg.rewards, cfg.data.dataset == "digits")
    need_states, need_model = _dit_bytes(cfg)
    have = _available_bytes(dev)
    if have is not None and need_states + need_model > have:
        gib = 1 << 30
        raise ValueError(f"config: this run needs at least {(need_states + need_model) / gib:.1f} GiB on {dev} "
                         f"(rollout states {need_states / gib:.1f} GiB: rollout.conditions_per_step x group_size x "
                         f"(sampler.num_steps + 1) samples; model and optimizer {need_model / gib:.1f} GiB: "
                         f"model.hidden / model.depth), but the device has {have / gib:.1f} GiB")
