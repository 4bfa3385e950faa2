"""The trainer with reward workers (AsyncReward): same results as in-process rewards, the reward
overlapped with the data-loss pass (time_reward_wait), dropped batches masked and counted."""
import functools
import json
import math
import time

import pytest
import torch

from ddrl_engine.models.dit import DiT
from ddrl_engine.rewards.async_rewards import AsyncReward
from tests.async_reward_helpers import FailingBrightness, SlowBrightness
from tests.trainer_helpers import TINY_TOML, make_trainer, tiny_config

LOSSES = ("reward", "adv_abs", "policy_loss", "data_loss", "clip_frac", "grad_norm", "ratio_dev")


class SleepyDiT(DiT):
    """Sleeps in every forward with grad (the trained forwards), so the data-loss pass takes a known time."""

    sleep_s = 0.15

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            time.sleep(self.sleep_s)
        return super().forward(*args, **kwargs)


def _async_trainer(cfg, factory, policy=None, **kw):
    rewards = AsyncReward(factory, workers=1, timeout_s=30, **kw)
    return make_trainer(cfg, policy=policy, rewards=rewards), rewards


def test_async_rewards_reproduce_in_process_rewards(tmp_path):
    cfg = tiny_config(tmp_path / "a", steps=2)
    plain = make_trainer(cfg)
    want = [plain.train_step() for _ in range(2)]
    trainer, rewards = _async_trainer(tiny_config(tmp_path / "b", steps=2), SlowBrightness)
    with rewards:
        got = [trainer.train_step() for _ in range(2)]
    for g, w in zip(got, want):
        for k in LOSSES:
            assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-7), k
        assert g["reward_batches_dropped"] == 0 and g["time_reward_wait"] >= 0


def test_reward_overlaps_the_data_loss_pass(tmp_path):
    """A reward faster than the data-loss pass costs the step (almost) no wait; a slower one costs
    what it takes beyond the pass."""
    cfg = tiny_config(tmp_path / "fast", steps=2)
    n_trained = len(cfg.algorithm.trained_steps(cfg.sampler.num_steps))
    data_pass_s = n_trained * SleepyDiT.sleep_s
    assert data_pass_s >= 0.3
    torch.manual_seed(0)
    policy = SleepyDiT(cfg.model)
    trainer, rewards = _async_trainer(cfg, functools.partial(SlowBrightness, 0.02), policy=policy)
    with rewards:
        fast = [trainer.train_step() for _ in range(2)]
    assert max(m["time_reward_wait"] for m in fast) < 0.1, fast
    slow_delay = data_pass_s + 2.0
    cfg = tiny_config(tmp_path / "slow", steps=1)
    trainer, rewards = _async_trainer(cfg, functools.partial(SlowBrightness, slow_delay), policy=SleepyDiT(cfg.model))
    with rewards:
        m = trainer.train_step()
    assert m["time_reward"] >= slow_delay
    # What is left after the overlapped pass: the 2 s of reward beyond its sleeps, less the pass's own
    # compute (up to 1 s of slack, so a machine loaded by other jobs does not fail it).
    assert 1.0 < m["time_reward_wait"] < slow_delay


def test_dropped_reward_batch_is_masked_and_counted(tmp_path):
    cfg = tiny_config(tmp_path, steps=1)
    trainer, rewards = _async_trainer(cfg, FailingBrightness, retries=1, on_failure="drop")
    with rewards:
        m = trainer.train_step()
    assert m["reward_batches_dropped"] == 1 and trainer.dropped_reward_batches == 1
    assert rewards.stats.dropped == 1 and rewards.stats.retried == 1
    # No valid sample: no reward, no advantage, no policy gradient; the data loss still trains.
    assert math.isnan(m["reward"]) and m["adv_abs"] == 0 and m["policy_loss"] == 0
    assert m["invalid_rewards"] == trainer.rollout_batch and math.isfinite(m["data_loss"]) and m["grad_norm"] > 0
    assert trainer.state_dict()["trainer"]["dropped_reward_batches"] == 1


def test_async_reward_must_share_the_runs_invalid_policy(tmp_path):
    from ddrl_engine.trainer.reward_requests import RewardRequests

    with AsyncReward(SlowBrightness, on_invalid="drop") as rewards:
        with pytest.raises(ValueError, match="on_invalid"):
            RewardRequests(rewards, "error")
        assert RewardRequests(rewards, "drop").names == ["brightness"]


def test_reward_workers_from_the_config(tmp_path):
    """[reward_workers] workers = 1: the built-in rewards in a worker, same run as in process."""
    from dataclasses import replace

    from ddrl_engine.trainer.builders import build_rewards, build_trainer_rewards
    from ddrl_engine.trainer.config import RewardWorkersConfig

    cfg = replace(tiny_config(tmp_path / "w", steps=2), rewards={"brightness": 1.0, "contrast": 0.5},
                  reward_workers=RewardWorkersConfig(workers=1, timeout_s=60))
    in_process = build_rewards(cfg)
    assert build_trainer_rewards(replace(cfg, reward_workers=RewardWorkersConfig()), in_process) is in_process
    with build_trainer_rewards(cfg, in_process) as rewards:
        assert isinstance(rewards, AsyncReward)
        got = [make_trainer(cfg, rewards=rewards).train_step() for _ in range(1)]
    want = [make_trainer(replace(cfg, reward_workers=RewardWorkersConfig())).train_step()]
    for g, w in zip(got, want):
        for k in LOSSES:
            assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-7), k


def test_cli_train_with_reward_workers(tmp_path, capsys):
    from ddrl_engine.cli import main

    toml = tmp_path / "run.toml"
    toml.write_text(TINY_TOML + "[reward_workers]\nworkers = 1\ntimeout_s = 60\n")
    assert main(["train", "--config", str(toml), "--out", str(tmp_path / "out")]) == 0
    lines = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2]
    assert all(m["reward_batches_dropped"] == 0 and m["time_reward_wait"] >= 0 for m in train)


@pytest.mark.parametrize("field, value, match", [("workers", -1, "reward_workers.workers"),
                                                 ("on_failure", "ignore", "reward_workers.on_failure"),
                                                 ("timeout_s", 0, "reward_workers.timeout_s")])
def test_reward_workers_config_is_validated(field, value, match):
    from ddrl_engine.trainer.config import config_from_dict

    with pytest.raises(ValueError, match=match):
        config_from_dict({"reward_workers": {field: value}})
