"""The optimiser and its learning-rate schedule, built from [optim] (OptimConfig documents the fields).

The scheduler is a LambdaLR stepped once per training step: the lr of training step s (0-based) is
cfg.lr * factor(s), factor(s) = 1.0 for "constant" (so the lr is exactly cfg.lr, bitwise). Its
state_dict (last step, base lrs) together with the optimiser's resumes the same lr sequence; the
schedule itself comes from the config, not from the checkpoint.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ddrl_engine.trainer.config import OptimConfig, check_optim


def build_optimizer(params, cfg: OptimConfig, *, device: str, total_steps: int
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """(optimizer, scheduler) over `params` for a run of total_steps training steps on `device`.

    Call scheduler.step() once after each training step (after optimizer.step(), whatever the number
    of optimizer steps in it). The default ("adamw", "constant") is exactly
    AdamW(params, lr, weight_decay=..., betas=(beta1, beta2), fused=device.startswith("cuda")).
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"build_optimizer: total_steps must be an int >= 1, got {total_steps!r}")
    check_optim(cfg, total_steps)
    fused = device.startswith("cuda")
    if cfg.name == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                                fused=fused)
    elif cfg.name == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                               fused=fused)
    else:  # "sgd" (check_optim allows nothing else)
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.beta1, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, total_steps))


def lr_factor(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """factor(s): the lr of training step s is cfg.lr * factor(s) (see OptimConfig.schedule).

    Warm-up: (s + 1) / (W + 1) for s < W = warmup_steps. Cosine after it: m + (1 - m)(1 + cos(pi p)) / 2
    with m = min_lr / lr and p = min(1, (s - W) / max(1, total_steps - 1 - W)): step W has lr, the last
    step (total_steps - 1) min_lr when the decay has two steps or more, and steps past the run min_lr.
    """
    schedule, warmup = cfg.schedule, cfg.warmup_steps
    if schedule == "constant":
        return _constant
    floor = cfg.min_lr / cfg.lr
    decay_steps = total_steps - 1 - warmup

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if schedule == "linear_warmup":
            return 1.0
        p = min(1.0, (s - warmup) / max(decay_steps, 1))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))

    return factor


def _constant(s: int) -> float:
    return 1.0
