"""Supervised pretraining of the base model: rectified-flow matching on the training split.

The base model is what every method of the demo starts from, so it is trained once and cached,
keyed by everything that determines it (model, pretraining config, data).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ddrl_engine.algorithms import policy_data_loss
from ddrl_engine.data import Dataset, default_cache_dir
from ddrl_engine.models.trainable import frozen_copy
from ddrl_engine.sampling import RectifiedFlowSDE
from ddrl_engine.trainer.builders import build_model
from ddrl_engine.trainer.config import TrainConfig


def base_cache_path(cfg: TrainConfig, dataset: Dataset) -> Path:
    h = hashlib.sha256()
    h.update(json.dumps({"model": cfg.model.to_dict(), "pretrain": cfg.pretrain.__dict__, "seed": cfg.run.seed,
                         "sampler": cfg.sampler.name}, sort_keys=True, default=str).encode())
    h.update(dataset.train_x.numpy().tobytes())
    return default_cache_dir() / f"base_dit-{h.hexdigest()[:20]}.safetensors"


def flow_matching_loss(model, x0, y, generator) -> torch.Tensor:
    """Velocity loss at t ~ U(0, 1): x_t = (1 - t) x0 + t eps, target eps - x0 (the DDRL data loss
    at a continuous level)."""
    t = torch.rand(x0.shape[0], generator=generator, device=x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    return policy_data_loss(model, x0, y, eps, RectifiedFlowSDE.continuous_level(t))


def pretrain_base(cfg: TrainConfig, dataset: Dataset, *, device="cpu", progress=True, log=print) -> torch.nn.Module:
    """Returns the base policy (EMA of the pretraining weights), from the cache when possible."""
    if cfg.sampler.name != "rectified_flow_sde":
        raise ValueError(f"pretraining is implemented for sampler 'rectified_flow_sde' only, not {cfg.sampler.name!r}; "
                         "bring a pretrained model for other samplers")
    path = base_cache_path(cfg, dataset)
    model = build_model(cfg)
    if cfg.pretrain.cache and path.exists():
        model.load_state_dict(load_file(str(path)))
        log(f"base model: loaded from cache {path}")
        return model.to(device)

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg).to(device)
    ema = frozen_copy(model, share_frozen=False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain.lr, weight_decay=0.0,
                            fused=device != "cpu" and torch.cuda.is_available())
    gen = torch.Generator(device).manual_seed(cfg.run.seed)
    x_all, y_all = dataset.train_x.to(device), dataset.train_y.to(device)
    steps = cfg.pretrain.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / max(steps, 1))).item()))
    bar = tqdm(range(steps), desc="pretrain base", disable=not progress, leave=False)
    for step in bar:
        idx = torch.randint(0, x_all.shape[0], (cfg.pretrain.batch_size,), generator=gen, device=device)
        loss = flow_matching_loss(model, x_all[idx], y_all[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - cfg.pretrain.ema_decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    if cfg.pretrain.cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, str(tmp))
        os.replace(tmp, path)
        log(f"base model: pretrained {steps} steps, cached at {path}")
    return ema.requires_grad_(True)
