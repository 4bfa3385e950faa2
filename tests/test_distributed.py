"""Distributed training on CPU (gloo) under torchrun: a 2-rank run reproduces the one-process run
(advantages, losses), and DCP checkpoints resume at another world size.

Each torchrun launch (tests/dist_worker.py) takes ~10 s on a 2-core machine; the runs are shared by a
module fixture.
"""
import copy
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ddrl_engine.trainer.config import DistributedConfig, config_from_dict
from ddrl_engine.trainer.checkpoint import is_dcp_checkpoint
from tests.dist_worker import full_config
from tests.trainer_helpers import make_trainer, tiny_config

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
LOSSES = ("policy_loss", "data_loss", "grad_norm", "reward", "adv_abs", "clip_frac")

pytestmark = pytest.mark.slow


def _torchrun(nproc: int, out: Path, parallel: str, steps: int, resume: Path | None = None, full=False,
              fail_at: int | None = None, grad_sync: str = "auto", reward_workers: int = 0,
              shard_size: int = 0) -> dict:
    result = out.with_suffix(".json")
    restarts = ["--max-restarts", "1"] if fail_at is not None else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *restarts,
           "-m", "tests.dist_worker", str(out), parallel, str(steps), str(result)]
    cmd += (["--resume", str(resume)] if resume else []) + (["--full"] if full else [])
    cmd += ["--fail-at", str(fail_at)] if fail_at is not None else []
    cmd += ["--grad-sync", grad_sync, "--reward-workers", str(reward_workers), "--shard-size", str(shard_size)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(result.read_text())


def _plain_records(cfg, resume: Path | None = None) -> list[dict]:
    trainer = make_trainer(cfg)
    if resume is not None:
        assert trainer.resume(resume)
    records = []
    while trainer.step < cfg.run.steps:
        batch = trainer.collect()
        metrics = trainer.update(batch)
        records.append({"step": trainer.step, "advantages": trainer.await_rewards(batch).advantages.tolist(), "metrics": metrics})
    return records


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    return {
        "plain": _plain_records(tiny_config(tmp / "plain", steps=STEPS)),
        ("fsdp", 2): _torchrun(2, tmp / "fsdp2", "fsdp", STEPS),
        ("ddp", 2): _torchrun(2, tmp / "ddp2", "ddp", STEPS),
        "tmp": tmp,
    }


def _assert_same(records, reference, *, atol_adv=1e-6, atol=1e-5, rtol=1e-4):
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for got, want in zip(records, reference):
        torch.testing.assert_close(torch.tensor(got["advantages"]), torch.tensor(want["advantages"]),
                                   atol=atol_adv, rtol=0)
        for k in LOSSES:
            assert got["metrics"][k] == pytest.approx(want["metrics"][k], rel=rtol, abs=atol), (got["step"], k)


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_ranks_reproduce_one_process(runs, parallel):
    run = runs[(parallel, 2)]
    assert run["world_size"] == 2
    plain = runs["plain"]
    # Group advantages of the gathered rewards and the first step's losses: float tolerance.
    _assert_same(run["records"][:1], plain[:1])
    # Later steps train on the updated weights: still the same run, up to accumulated rounding.
    _assert_same(run["records"], plain, atol=1e-4, rtol=1e-3, atol_adv=1e-4)


@pytest.mark.parametrize("parallel, grad_sync", [("ddp", "backward"), ("fsdp", "update")])
def test_gradient_sync_per_update_or_per_backward(runs, tmp_path, parallel, grad_sync):
    """Deferring the gradient reduction to the update's last backward (or not) gives the same run.
    DDP defaults to one all-reduce per update (counted through a comm hook), FSDP2 to one
    reduce-scatter per backward; here each runs the other mode."""
    run = _torchrun(2, tmp_path / "sync", parallel, 2, grad_sync=grad_sync)
    _assert_same(run["records"], runs["plain"][:2], atol=1e-4, rtol=1e-3, atol_adv=1e-4)
    if parallel == "ddp":  # the tiny model's gradients fit one bucket: one all-reduce per synced backward
        backwards = 2 * len(tiny_config("unused").algorithm.trained_steps(tiny_config("unused").sampler.num_steps))
        assert [r["allreduces"] for r in run["records"]] == [backwards, backwards]
        assert [r["allreduces"] for r in runs[("ddp", 2)]["records"]] == [1] * STEPS  # default: "update"


def test_hybrid_sharding_replicates_across_shard_groups(runs, tmp_path):
    """distributed.shard_size = 1 at world size 2: HSDP with two replicas of a one-rank shard group (the
    2-D mesh a multi-node run uses with shard_size = GPUs per node): the same run as one process."""
    run = _torchrun(2, tmp_path / "hsdp", "fsdp", 2, shard_size=1)
    assert run["placements"] == ["Replicate", "Shard"]
    assert runs[("fsdp", 2)]["placements"] == ["Shard"]
    _assert_same(run["records"], runs["plain"][:2], atol=1e-4, rtol=1e-3, atol_adv=1e-4)
    # Its DCP checkpoint resumes in one process like any other.
    resumed = _plain_records(tiny_config(tmp_path / "hsdp_resumed", steps=STEPS),
                             resume=tmp_path / "hsdp" / "checkpoints" / "step_0000002")
    _assert_same(resumed, runs["plain"][2:], atol=1e-4, rtol=1e-3, atol_adv=1e-4)


def test_reward_workers_on_every_rank(runs, tmp_path):
    """Each rank submits its rows to its own reward worker; the rewards are gathered after the data-loss
    pass: the same run as the one-process run with in-process rewards."""
    run = _torchrun(2, tmp_path / "workers", "ddp", 2, reward_workers=1)
    _assert_same(run["records"], runs["plain"][:2], atol=1e-4, rtol=1e-3, atol_adv=1e-4)
    assert all(r["metrics"]["reward_batches_dropped"] == 0 for r in run["records"])


def test_checkpoint_from_two_ranks_resumes_on_one(runs):
    ckpt = runs["tmp"] / "fsdp2" / "checkpoints" / "step_0000002"
    assert is_dcp_checkpoint(ckpt)
    plain_tail = runs["plain"][2:]
    # A 1-process torchrun (DCP, FSDP2 on one rank) ...
    one = _torchrun(1, runs["tmp"] / "resume1", "fsdp", STEPS, resume=ckpt)
    _assert_same(one["records"], plain_tail, atol=1e-4, rtol=1e-3, atol_adv=1e-4)
    # ... and a plain one-process run read the 2-rank checkpoint.
    plain = _plain_records(tiny_config(runs["tmp"] / "resume_plain", steps=STEPS), resume=ckpt)
    _assert_same(plain, plain_tail, atol=1e-4, rtol=1e-3, atol_adv=1e-4)


def test_checkpoint_from_one_rank_resumes_on_two(runs):
    one = _torchrun(1, runs["tmp"] / "fsdp1", "fsdp", 2)
    _assert_same(one["records"], runs["plain"][:2], atol=1e-4, rtol=1e-3, atol_adv=1e-4)
    ckpt = runs["tmp"] / "fsdp1" / "checkpoints" / "step_0000002"
    two = _torchrun(2, runs["tmp"] / "resume2", "ddp", STEPS, resume=ckpt)
    _assert_same(two["records"], runs["plain"][2:], atol=1e-4, rtol=1e-3, atol_adv=1e-4)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_rank_failure_restarts_from_the_last_checkpoint(runs, tmp_path, parallel):
    """Rank 1 dies at step 3 (after the step-2 checkpoint, step 3 logged); torchrun --max-restarts 1
    restarts both ranks, which resume at step 2: the run ends like the uninterrupted one-process run,
    each step logged once, no data lost or repeated (the losses would differ otherwise)."""
    run = _torchrun(2, tmp_path / "restart", parallel, STEPS, fail_at=3)
    assert run["attempt"] == 1 and run["resumed_at"] == 2
    train = [m for m in run["metrics"] if m["kind"] == "train"]
    assert [m["step"] for m in train] == list(range(1, STEPS + 1))
    plain = runs["plain"]
    for got, want in zip(train, plain):
        for k in LOSSES:
            assert got[k] == pytest.approx(want["metrics"][k], rel=1e-3, abs=1e-4), (got["step"], k)


def test_fsdp_with_kl_ema_activation_checkpointing_and_eval(tmp_path):
    """Trainer.train() with a KL reference, EMA weights (both sharded), activation checkpointing and
    the evaluator: rank 0's metrics.jsonl matches the one-process run's."""
    run = _torchrun(2, tmp_path / "full2", "fsdp", 2, full=True)
    plain = make_trainer(full_config(tmp_path / "plain", 2, "none"), evaluator=True)
    plain.train()
    want = [json.loads(ln) for ln in (plain.out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["kind"], m["step"]) for m in run["metrics"]] == [(m["kind"], m["step"]) for m in want]
    for got, ref in zip(run["metrics"], want):
        for k, v in ref.items():
            if k.startswith("time_") or not isinstance(v, float):
                continue
            assert got[k] == pytest.approx(v, rel=1e-3, abs=1e-4), (ref["kind"], ref["step"], k)


def test_parallel_config_is_validated():
    assert config_from_dict({"distributed": {"parallel": "fsdp"}}).distributed.parallel == "fsdp"
    with pytest.raises(ValueError, match="distributed.parallel"):
        config_from_dict({"distributed": {"parallel": "zero3"}})
    with pytest.raises(ValueError, match="activation_checkpointing"):
        config_from_dict({"distributed": {"activation_checkpointing": True}})
    with pytest.raises(ValueError, match="shard_size"):
        config_from_dict({"distributed": {"parallel": "fsdp", "shard_size": -2}})


def test_parallel_outside_torchrun_is_an_error(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    cfg = replace(tiny_config(tmp_path), distributed=DistributedConfig(parallel="ddp"))
    with pytest.raises(RuntimeError, match="torchrun"):
        make_trainer(cfg)


def test_fsdp_mixed_precision_keeps_the_noise_level_exact(tmp_path, monkeypatch):
    """FSDP2 with bf16 compute (CUDA's policy, forced here on CPU): the blocks compute in bf16 but the
    root does not cast the policy's inputs, so the timestep embedding sees the exact fp32 level."""
    import torch.distributed as dist

    import ddrl_engine.models.dit as dit_module
    from ddrl_engine.trainer.distributed import Distributed

    seen = []
    features = dit_module.timestep_features

    def spy(t, dim):
        seen.append(t.detach().clone())
        return features(t, dim)

    monkeypatch.setattr(dit_module, "timestep_features", spy)
    cfg = tiny_config(tmp_path)
    torch.manual_seed(0)
    plain = make_trainer(cfg).policy
    for p in plain.parameters():  # adaLN-Zero starts at 0: make the output depend on the weights
        torch.nn.init.normal_(p, std=0.1)
    sharded = copy.deepcopy(plain)
    x = torch.randn(4, *cfg.model.sample_shape)
    t = torch.full((4,), 0.7)
    y = torch.arange(4) % cfg.model.num_classes
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        Distributed("fsdp", 0, 1, "cpu").fully_shard(sharded, compute_dtype=torch.bfloat16)
        out = sharded(x, t, y)
        out.float().square().mean().backward()
    finally:
        dist.destroy_process_group()
    assert seen[-1].dtype == torch.float32 and torch.equal(seen[-1], t)
    assert out.dtype == torch.float32  # returned in x's dtype
    ref = plain(x, t, y)
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0.05)  # bf16 compute
    assert all(p.grad is not None for p in sharded.parameters())
