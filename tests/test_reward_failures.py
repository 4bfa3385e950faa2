"""Reward failures are never silent (the reliability issue): under reward workers an invalid reward
stops the run when run.on_invalid_reward = "error" (not retried: it is deterministic), any other
dropped batch warns with its cause; an in-process reward that hangs stops the run at the deadline;
a reward that requires grad is detached with a warning."""
import threading
import time
from dataclasses import replace

import pytest
import torch

from ddrl_engine.rewards import InvalidRewardError, validate_rewards
from ddrl_engine.rewards.async_rewards import AsyncReward, RewardFailedError
from ddrl_engine.trainer.config import RewardWorkersConfig
from ddrl_engine.trainer.reward_requests import RewardTimeoutError
from tests.async_reward_helpers import FailingBrightness, NaNBrightness, WrongShapeBrightness
from tests.trainer_helpers import make_trainer, tiny_config, with_run


def _with_workers(cfg, factory, on_invalid="error", **kw):
    cfg = with_run(cfg, on_invalid_reward=on_invalid)
    rewards = AsyncReward(factory, workers=1, timeout_s=30, on_invalid=on_invalid, **kw)
    return make_trainer(cfg, rewards=rewards), rewards


@pytest.mark.parametrize("factory, cause", [(NaNBrightness, "non-finite"), (WrongShapeBrightness, "shape")])
def test_invalid_reward_under_workers_stops_the_run(tmp_path, factory, cause):
    trainer, rewards = _with_workers(tiny_config(tmp_path, steps=1), factory, retries=2)
    with rewards, pytest.raises(RewardFailedError, match=f"(?s)invalid reward.*'brightness'.*{cause}"):
        trainer.train_step()
    assert rewards.stats.retried == 0  # an invalid reward is deterministic: never retried


def test_invalid_reward_under_workers_with_drop_warns_and_counts(tmp_path):
    trainer, rewards = _with_workers(tiny_config(tmp_path, steps=1), WrongShapeBrightness, on_invalid="drop")
    with rewards, pytest.warns(RuntimeWarning, match="(?s)dropped a batch.*shape"):
        m = trainer.train_step()
    assert m["reward_batches_dropped"] == 1


def test_failing_reward_under_workers_warns_with_the_cause(tmp_path):
    trainer, rewards = _with_workers(tiny_config(tmp_path, steps=1), FailingBrightness, retries=1)
    with rewards, pytest.warns(RuntimeWarning, match="(?s)attempt 1.*unreachable.*attempt 2"):
        m = trainer.train_step()
    assert m["reward_batches_dropped"] == 1 and rewards.stats.retried == 1


class HangingBrightness:
    name = "brightness"

    def __init__(self):
        self.release = threading.Event()

    def __call__(self, samples, cond):
        self.release.wait(60)
        return samples.flatten(1).float().mean(1)


def test_in_process_reward_that_hangs_stops_at_the_deadline(tmp_path):
    cfg = replace(tiny_config(tmp_path, steps=1), reward_workers=RewardWorkersConfig(timeout_s=0.5))
    hang = HangingBrightness()
    trainer = make_trainer(cfg, rewards=hang)
    start = time.monotonic()
    with pytest.raises(RewardTimeoutError, match="brightness.*0.5 s.*reward_workers.timeout_s"):
        trainer.train_step()
    assert time.monotonic() - start < 30
    hang.release.set()


def test_in_process_rewards_on_the_thread_equal_direct_calls(tmp_path):
    """The deadline thread changes nothing: the same step with and without it."""
    a = make_trainer(replace(tiny_config(tmp_path / "a", steps=1), reward_workers=RewardWorkersConfig(timeout_s=60)))
    b = make_trainer(tiny_config(tmp_path / "b", steps=1))
    b.reward_requests.timeout_s = None
    ma, mb = a.train_step(), b.train_step()
    for k in ("reward", "adv_abs", "policy_loss", "data_loss", "grad_norm"):
        assert ma[k] == mb[k], k


def test_reward_that_requires_grad_is_detached_with_a_warning():
    w = torch.ones(4, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="requires grad"):
        r, valid, n = validate_rewards(w * 2, name="learned", batch_size=4)
    assert not r.requires_grad and valid.all() and n == 0


@pytest.mark.parametrize("bad, match", [(torch.ones(3), "shape"), (torch.ones(4, dtype=torch.long), "dtype"),
                                        (torch.tensor([1.0, float("nan"), 0.0, 0.0]), "non-finite")])
def test_invalid_reward_error_is_a_value_and_type_error(bad, match):
    for cls in (InvalidRewardError, ValueError, TypeError):
        with pytest.raises(cls, match=match):
            validate_rewards(bad, name="r", batch_size=4)
