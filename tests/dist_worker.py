"""One rank of a distributed trainer test run (launched by tests/test_distributed.py with torchrun).

python -m torch.distributed.run --nproc_per_node N -m tests.dist_worker OUT PARALLEL STEPS RESULT
    [--resume CKPT] [--full] [--fail-at STEP]
trains the tiny test config for STEPS total steps (checkpoint every 2), resuming from CKPT when given,
and writes (rank 0) RESULT: per step the global advantages and the update's metrics. --full trains
the KL-regularised method with EMA, activation checkpointing and the evaluator through Trainer.train()
and records metrics.jsonl instead. --fail-at STEP runs Trainer.train() (resuming from the latest
checkpoint, as `ddrl-engine train` does) and kills rank 1 of the first attempt when it reaches STEP:
run under `torchrun --max-restarts 1`, the second attempt must finish the run; RESULT then holds the
attempts seen and metrics.jsonl.
Each mode returns with its trainer gone before Distributed.close() (see there: the models hold the
process groups, whose gloo threads must be joined before interpreter exit).
"""
import argparse
import json
import os
from dataclasses import replace

import torch

from ddrl_engine.trainer.config import DistributedConfig, OptimConfig, RewardWorkersConfig
from ddrl_engine.trainer.distributed import Distributed
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
    p.add_argument("--fail-at", type=int)
    p.add_argument("--grad-sync", default="auto")
    p.add_argument("--reward-workers", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=0)
    a = p.parse_args()
    if a.fail_at is not None:
        train_with_failure(a.out, a.parallel, int(a.steps), a.result, a.fail_at)
    elif a.full:
        train_full(a)
    else:
        train_steps(a)
    Distributed.close()


def train_full(a):
    trainer = make_trainer(full_config(a.out, int(a.steps), a.parallel), evaluator=True)
    trainer.train()
    if trainer.dist.rank == 0:
        lines = (trainer.out / "metrics.jsonl").read_text().splitlines()
        with open(a.result, "w") as f:
            json.dump({"world_size": trainer.dist.world_size, "metrics": [json.loads(ln) for ln in lines]}, f)


def train_steps(a):
    steps = int(a.steps)
    cfg = replace(tiny_config(a.out, steps=steps), distributed=DistributedConfig(parallel=a.parallel, grad_sync=a.grad_sync,
                                                                                shard_size=a.shard_size),
                  reward_workers=RewardWorkersConfig(workers=a.reward_workers, timeout_s=60))
    rewards = None
    if a.reward_workers:  # each rank its own reward worker processes
        from ddrl_engine.trainer.builders import build_trainer_rewards

        rewards = build_trainer_rewards(cfg, in_process=None)
    trainer = make_trainer(cfg, rewards=rewards)
    if a.resume:
        assert trainer.resume(a.resume)
    allreduces = count_allreduces(trainer.policy) if a.parallel == "ddp" else None
    records = []
    while trainer.step < cfg.run.steps:
        batch = trainer.collect()
        adv = trainer.dist.gather(trainer.await_rewards(batch).advantages)
        metrics = trainer.update(batch)
        records.append({"step": trainer.step, "advantages": adv.tolist(), "metrics": metrics})
        if allreduces is not None:
            records[-1]["allreduces"], allreduces[0] = allreduces[0], 0
        if trainer.step % cfg.run.ckpt_every == 0:
            trainer.save()
    if trainer.dist.rank == 0:
        with open(a.result, "w") as f:
            placements = [type(pl).__name__ for pl in getattr(next(trainer.policy.parameters()), "placements", ())]
            json.dump({"world_size": trainer.dist.world_size, "records": records, "placements": placements}, f)
    if rewards is not None:
        rewards.close()


def count_allreduces(ddp_model):
    """Counts DDP's gradient all-reduces (bucket reductions) through a comm hook: [count]."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    count = [0]

    def hook(state, bucket):
        count[0] += 1
        return allreduce_hook(state, bucket)

    ddp_model.register_comm_hook(None, hook)
    return count


def train_with_failure(out, parallel, steps, result, fail_at):
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    trainer = make_trainer(replace(tiny_config(out, steps=steps), distributed=DistributedConfig(parallel=parallel)))
    resumed_at = trainer.step if trainer.resume() else None
    train_step = trainer.train_step

    def failing_step():
        if attempt == 0 and trainer.dist.rank == 1 and trainer.step == fail_at:
            os._exit(3)  # a crash: no checkpoint, no clean shutdown
        return train_step()

    trainer.train_step = failing_step
    trainer.train()
    if trainer.dist.rank == 0:
        lines = (trainer.out / "metrics.jsonl").read_text().splitlines()
        with open(result, "w") as f:
            json.dump({"attempt": attempt, "resumed_at": resumed_at, "metrics": [json.loads(ln) for ln in lines]}, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
