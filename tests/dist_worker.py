"""One rank of a distributed trainer test run (launched by tests/test_distributed.py with torchrun).

python -m torch.distributed.run --nproc_per_node N -m tests.dist_worker OUT PARALLEL STEPS RESULT
    [--resume CKPT] [--full]
trains the tiny test config for STEPS total steps (checkpoint every 2), resuming from CKPT when given,
and writes (rank 0) RESULT: per step the global advantages and the update's metrics. --full trains
the KL-regularised method with EMA, activation checkpointing and the evaluator through Trainer.train()
and records metrics.jsonl instead.
"""
import argparse
import json
from dataclasses import replace

import torch

from ddrl_engine.trainer.config import DistributedConfig, OptimConfig
from tests.trainer_helpers import make_trainer, tiny_config


def full_config(out, steps, parallel):
    cfg = tiny_config(out, method="grpo_kl", steps=steps)
    return replace(cfg, optim=OptimConfig(lr=1e-3, ema_decay=0.9),
                   distributed=DistributedConfig(parallel=parallel, activation_checkpointing=parallel != "none"))


def main():
    p = argparse.ArgumentParser()
    for name in ("out", "parallel", "steps", "result"):
        p.add_argument(name)
    p.add_argument("--resume")
    p.add_argument("--full", action="store_true")
    a = p.parse_args()
    steps = int(a.steps)
    if a.full:
        trainer = make_trainer(full_config(a.out, steps, a.parallel), evaluator=True)
        trainer.train()
        if trainer.dist.rank == 0:
            lines = (trainer.out / "metrics.jsonl").read_text().splitlines()
            with open(a.result, "w") as f:
                json.dump({"world_size": trainer.dist.world_size, "metrics": [json.loads(ln) for ln in lines]}, f)
        trainer.dist.close()
        return
    cfg = replace(tiny_config(a.out, steps=steps), distributed=DistributedConfig(parallel=a.parallel))
    trainer = make_trainer(cfg)
    if a.resume:
        assert trainer.resume(a.resume)
    records = []
    while trainer.step < cfg.run.steps:
        batch = trainer.collect()
        adv = trainer.dist.gather(batch.advantages)
        metrics = trainer.update(batch)
        records.append({"step": trainer.step, "advantages": adv.tolist(), "metrics": metrics})
        if trainer.step % cfg.run.ckpt_every == 0:
            trainer.save()
    if trainer.dist.rank == 0:
        with open(a.result, "w") as f:
            json.dump({"world_size": trainer.dist.world_size, "records": records}, f)
    trainer.dist.close()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
