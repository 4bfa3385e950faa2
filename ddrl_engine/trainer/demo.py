"""The main job: base model, then GRPO, GRPO+KL and DDRL from the same base with the same budget and
seeds, evaluated the same way; writes summary.json, report.md, curves.png, samples.png."""
from __future__ import annotations

import copy
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from ddrl_engine.algorithms import with_method
from ddrl_engine.trainer.builders import (build_dataset, build_evaluator, build_rewards, build_sampler,
                                          build_training_data)
from ddrl_engine.trainer.config import TrainConfig, load_config
from ddrl_engine.trainer.loop import Trainer
from ddrl_engine.trainer.pretrain import pretrain_base
from ddrl_engine.trainer.report import plot_curves, plot_samples, write_report, write_summary

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.toml"
METHODS = ("grpo", "grpo_kl", "ddrl")
# The regulariser strength of each method (everything else is shared). Chosen on the demo's own
# training runs, never on its evaluation: see configs/demo.toml and the README.
METHOD_OVERRIDES = {"grpo": {}, "grpo_kl": {"beta_kl": 0.1}, "ddrl": {"beta_data": 0.02}}


def method_config(cfg: TrainConfig, method: str, out: Path, overrides: dict | None = None) -> TrainConfig:
    algo = with_method(cfg.algorithm, method)
    algo = replace(algo, **(overrides if overrides is not None else METHOD_OVERRIDES[method]))
    return replace(cfg, algorithm=algo, run=replace(cfg.run, out_dir=str(out / method)))


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def run_demo(out: str | Path, *, config: str | Path | None = None, steps: int | None = None,
             methods=METHODS, progress: bool = True, log=print) -> dict:
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config or DEMO_CONFIG)
    if steps is not None:
        cfg = replace(cfg, run=replace(cfg.run, steps=steps))
    cfg = replace(cfg, run=replace(cfg.run, progress=progress))
    device = cfg.run.device
    dataset = build_dataset(cfg)
    base = pretrain_base(cfg, dataset, device=device, progress=progress, log=log)
    sampler = build_sampler(cfg)
    rewards = build_rewards(cfg)
    evaluator = build_evaluator(cfg, dataset, rewards)
    train_data = build_training_data(cfg, base, sampler, dataset)

    base_metrics, base_samples = evaluator(base, sampler, base.sample_shape, device)
    log(f"base: " + ", ".join(f"{k}={v:.4f}" for k, v in base_metrics.items()))
    results, curves, samples = {"base": base_metrics}, {}, {"base": base_samples}
    for method in methods:
        mcfg = method_config(cfg, method, out)
        trainer = Trainer(mcfg, copy.deepcopy(base), sampler, rewards, train_data, evaluator, log=log)
        evals = trainer.train()
        results[method], curves[method], samples[method] = evals[-1], evals, trainer.last_eval_samples
        log(f"{method}: " + ", ".join(f"{k}={v:.4f}" for k, v in evals[-1].items() if isinstance(v, float)))

    wall = time.time() - t0
    summary = write_summary(out, results, wall)
    notes = [f"{m}: " + ", ".join(f"{k}={v}" for k, v in (METHOD_OVERRIDES[m] or {"regulariser": "none"}).items())
             for m in methods]
    write_report(out, results, wall, machine_description(device), notes)
    plot_curves(out, curves, base_metrics)
    plot_samples(out, samples, base.num_classes)
    log(f"demo done in {wall:.0f} s: {out / 'report.md'}")
    return summary
