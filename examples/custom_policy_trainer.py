"""ddrl-engine's Trainer on YOUR model: your own nn.Module policy, reward class, condition set and data,
configured in Python (no [model] section, no DiT, no digits).

    python examples/custom_policy_trainer.py --out /tmp/custom_run --steps 6

The Trainer needs of the policy only `policy(x, t, cond) -> tensor like x` (here a velocity, for the
rectified-flow sampler) and `sample_shape`; of a reward only `name` and `__call__(samples, cond) -> [B]`;
of the data only `train_x` / `train_y`. Conditions are ids into your own table (here 3 of 10 "styles").
A run writes metrics.jsonl and atomic checkpoints to --out and resumes from them when rerun.
"""
from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from ddrl_engine.algorithms import preset
from ddrl_engine.data import Dataset
from ddrl_engine.trainer import (OptimConfig, RolloutConfig, RunConfig, SamplerConfig, TrainConfig, Trainer)

SHAPE = (1, 6, 6)  # your sample shape: [C, H, W] here; any tuple the policy takes


class TinyVelocityNet(nn.Module):  # your model: any module with forward(x, t, cond) and sample_shape
    sample_shape = SHAPE

    def __init__(self, styles: int = 10, width: int = 64):
        super().__init__()
        n = SHAPE[0] * SHAPE[1] * SHAPE[2]
        self.style = nn.Embedding(styles, width)
        self.net = nn.Sequential(nn.Linear(n + 1 + width, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, n))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x.flatten(1), t[:, None].to(x.dtype), self.style(cond)], dim=1)
        return self.net(h).view_as(x)


class CenterMass:  # your reward: a name and __call__(samples [B, *SHAPE], cond [B]) -> [B]
    name = "center_mass"

    def __call__(self, samples: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return samples[:, :, 2:4, 2:4].mean(dim=(1, 2, 3))


def make_data(n: int = 96, seed: int = 0) -> Dataset:  # your data: x in the policy's space, y condition ids
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([1, 4, 7]).repeat(n // 3)
    x = -torch.ones(n, *SHAPE)
    rows = (y % SHAPE[1]).tolist()
    for i, r in enumerate(rows):  # style s: a bright bar at row s mod 6, plus noise
        x[i, :, r] = 1.0
    x = x + 0.1 * torch.randn(x.shape, generator=g)
    return Dataset.split(x, y, heldout_fraction=0.25)


def evaluate(policy, sampler, sample_shape, device):  # optional: your evaluation, (metrics, samples)
    from ddrl_engine.sampling import rollout

    cond = torch.tensor([1, 4, 7], device=device).repeat_interleave(4)
    ro = rollout(policy, sampler, cond, generator=torch.Generator(device).manual_seed(0), sample_shape=sample_shape)
    return {"reward": CenterMass()(ro.samples, cond).mean().item()}, ro.samples


def config(out: str, steps: int) -> TrainConfig:
    return TrainConfig(
        run=RunConfig(out_dir=out, steps=steps, eval_every=3, ckpt_every=3, progress=False),
        sampler=SamplerConfig(num_steps=6, noise_level=0.7),
        algorithm=preset("ddrl", group_size=4, beta_data=0.1, clip_eps=0.2),
        optim=OptimConfig(lr=3e-4, schedule="cosine", warmup_steps=1),
        rollout=RolloutConfig(conditions_per_step=2),
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="run folder (metrics.jsonl, checkpoints)")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args(argv)

    cfg = config(args.out, args.steps)
    torch.manual_seed(0)
    policy = TinyVelocityNet()
    trainer = Trainer(cfg, policy, cfg.sampler.build(), CenterMass(), make_data(),
                      evaluate, conditions=torch.tensor([1, 4, 7]), decode=lambda x: x, log=lambda *a: None)
    trainer.resume()  # continues a previous run in --out, if any
    evals = trainer.train()
    lines = [json.loads(line) for line in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    return {"train": [r for r in lines if r["kind"] == "train"], "evals": evals, "trainer": trainer}


if __name__ == "__main__":
    result = main()
    print(json.dumps(result["train"][-1], indent=2))
