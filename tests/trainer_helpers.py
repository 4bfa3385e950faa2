"""A tiny configuration for trainer tests (seconds on CPU)."""
from dataclasses import replace

from ddrl_engine.algorithms import preset
from ddrl_engine.models.dit import DiTConfig
from ddrl_engine.trainer.builders import build_dataset, build_model, build_rewards, build_sampler
from ddrl_engine.trainer.config import (EvalConfig, OptimConfig, RolloutConfig, RunConfig, SamplerConfig,
                                        TrainConfig)
from ddrl_engine.trainer.loop import Trainer


# A tiny run as a TOML file (CLI and demo tests; tiny_config below is the Python one).
TINY_TOML = """
[run]
steps = 2
eval_every = 2
ckpt_every = 0
[model]
hidden = 32
depth = 1
heads = 2
[sampler]
num_steps = 4
[algorithm]
group_size = 4
clip_eps = 0.2
[rollout]
conditions_per_step = 2
[eval]
samples_per_class = 2
heldout_loss_levels = 2
[pretrain]
steps = 20
batch_size = 32
[rewards]
brightness = 1.0
"""


def tiny_config(out_dir, method="ddrl", steps=4, **algo) -> TrainConfig:
    algo.setdefault("group_size", 4)
    algo.setdefault("clip_eps", 0.2)
    if method == "ddrl":
        algo.setdefault("beta_data", 0.1)
    if method == "grpo_kl":
        algo.setdefault("beta_kl", 0.1)
    return TrainConfig(
        run=RunConfig(out_dir=str(out_dir), steps=steps, eval_every=2, ckpt_every=2, progress=False),
        model=DiTConfig(hidden=32, depth=1, heads=2),
        sampler=SamplerConfig(num_steps=4),
        algorithm=preset(method, **algo),
        optim=OptimConfig(lr=1e-3),
        rollout=RolloutConfig(conditions_per_step=2),
        eval=EvalConfig(samples_per_class=2, heldout_loss_levels=2),
    )


def make_trainer(cfg, evaluator=False, policy=None, rewards=None):
    dataset = build_dataset(cfg)
    rewards = rewards if rewards is not None else build_rewards(cfg)
    ev = None
    if evaluator:
        from ddrl_engine.trainer.builders import build_evaluator

        ev = build_evaluator(cfg, dataset, rewards)
    import torch

    torch.manual_seed(0)
    policy = policy if policy is not None else build_model(cfg)
    return Trainer(cfg, policy, build_sampler(cfg), rewards, dataset, ev, log=lambda *a: None)


def with_run(cfg, **kw):
    return replace(cfg, run=replace(cfg.run, **kw))


def torchrun_train(config_path, cache_dir, nproc: int = 2, timeout: int = 300):
    """`ddrl-engine train --config config_path` under torchrun (CPU ranks, gloo) with its own cache
    folder; asserts it succeeded (showing the end of stderr otherwise)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, DDRL_ENGINE_CACHE=str(cache_dir),
               PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                           "-m", "ddrl_engine.cli", "train", "--config", str(config_path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc
