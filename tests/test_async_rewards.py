"""AsyncReward: rewards in spawned worker processes, with timeouts, retries and drop counting.

Most tests share one pool of a scripted reward whose misbehaviour is chosen per batch, and compare
counter deltas (starting the fork server costs a torch import)."""

import dataclasses
import functools
import time

import pytest
import torch

from ddrl_engine.rewards import RewardBatch
from ddrl_engine.rewards.async_rewards import AsyncReward, RewardFailedError, RewardWorkerError
from tests.async_reward_helpers import ScriptedReward, SlowReward, broken_factory, weighted_pixels

TIMEOUT_S = 0.75


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.arange(n) % 3


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    factory = functools.partial(ScriptedReward, str(tmp_path_factory.mktemp("markers")))
    with AsyncReward(factory, workers=1, timeout_s=TIMEOUT_S, retries=1) as rewards:
        yield rewards


@pytest.fixture
def counters(pool):
    """Counter deltas over one test."""
    before = dataclasses.replace(pool.stats)
    return lambda: {k: v - getattr(before, k) for k, v in pool.stats.as_dict().items() if k not in ("wait_s", "compute_s")}


@pytest.mark.parametrize("start_method, workers", [("forkserver", 2), ("spawn", 1)])
def test_results_equal_the_synchronous_reward(start_method, workers):
    sync = weighted_pixels()
    with AsyncReward(weighted_pixels, workers=workers, timeout_s=30, start_method=start_method) as rewards:
        inputs = [batch(seed=s) for s in range(3)]
        handles = [rewards.submit(x, c) for x, c in inputs]
        for (x, c), h in zip(inputs, handles):
            got, want = h.result(), sync.evaluate(x, c)
            assert isinstance(got, RewardBatch)
            torch.testing.assert_close(got.total, want.total, rtol=0, atol=0)
            for name in want.components:
                torch.testing.assert_close(got.components[name], want.components[name], rtol=0, atol=0)
            assert torch.equal(got.valid, want.valid) and got.n_invalid == want.n_invalid
            assert h.attempts == 1 and h.compute_s is not None and h.wait_s is not None
        assert rewards.stats.submitted == rewards.stats.completed == 3
        assert rewards.stats.dropped == rewards.stats.retried == 0


def test_slow_reward_overlaps_with_other_work(pool, counters):
    x, _ = batch()
    delay = 0.5
    pool.evaluate(x, None)  # the worker is up
    handle = pool.submit(x, {"mode": "slow", "delay": delay})
    time.sleep(delay + 0.4)  # the next rollout / the data-loss forward
    torch.testing.assert_close(handle.result().total, x.flatten(1).mean(1))
    assert handle.wait_s < 0.15, handle.wait_s
    blocking = pool.submit(x, {"mode": "slow", "delay": delay})
    blocking.result()
    assert blocking.wait_s > delay - 0.2, blocking.wait_s
    assert counters()["completed"] == 3


def test_timeout_retry_then_success(pool, counters):
    x, _ = batch()
    handle = pool.submit(x, {"mode": "hang", "once": "hang"})
    torch.testing.assert_close(handle.result(timeout=30).total, x.flatten(1).mean(1))
    assert handle.attempts == 2
    c = counters()
    assert (c["timeouts"], c["retried"], c["dropped"], c["completed"]) == (1, 1, 0, 1)


def test_hanging_reward_is_dropped_after_retries(pool, counters):
    handle = pool.submit(batch()[0], {"mode": "hang"})
    assert handle.result(timeout=30) is None and handle.dropped and handle.attempts == 2
    c = counters()
    assert (c["timeouts"], c["retried"], c["dropped"], c["completed"]) == (2, 1, 1, 0)
    assert pool.evaluate(*batch()) is not None  # the pool is healthy again


def test_failures_are_retried_then_dropped_and_counted(pool, counters):
    x, _ = batch()
    handle = pool.submit(x, {"mode": "fail"})
    assert handle.result(timeout=30) is None and handle.attempts == 2  # dropped, never zeros
    assert pool.submit(x, {"mode": "fail", "once": "fail"}).result(timeout=30) is not None
    c = counters()
    assert (c["errors"], c["retried"], c["dropped"], c["completed"]) == (3, 2, 1, 1)


def test_crash_and_non_finite_rewards(pool, counters):
    x, _ = batch()
    assert pool.submit(x, {"mode": "crash", "once": "crash"}).result(timeout=30) is not None
    nan = pool.submit(x, {"mode": "nan"})
    assert nan.result(timeout=30) is None  # on_invalid="error": a failure, not retried (deterministic)
    assert nan.invalid and "non-finite" in nan.causes[0]
    c = counters()
    assert (c["crashes"], c["errors"], c["retried"], c["dropped"], c["completed"]) == (1, 1, 1, 1, 1)


def test_raise_mode_and_dropping_invalid_samples(tmp_path):
    x, _ = batch()
    factory = functools.partial(ScriptedReward, str(tmp_path))
    with AsyncReward(factory, workers=2, timeout_s=30, retries=0, on_failure="raise", on_invalid="drop") as rewards:
        nan = rewards.submit(x, {"mode": "nan"})
        fail = rewards.submit(x, {"mode": "fail"})
        got = nan.result(timeout=30)
        assert not got.valid.any() and got.n_invalid == {"scripted": x.shape[0]}
        with pytest.raises(RewardFailedError, match="reward server unreachable"):
            fail.result(timeout=30)
        assert rewards.stats.dropped == 1


def test_broken_factory_and_clean_shutdown():
    rewards = AsyncReward(broken_factory, timeout_s=30)
    handle = rewards.submit(*batch())
    with pytest.raises(RewardWorkerError, match="reward weights not found"):
        handle.result(timeout=30)
    with pytest.raises(RewardWorkerError):
        rewards.submit(*batch())
    rewards.close()
    assert all(not w.process.is_alive() for w in rewards._workers)
    rewards.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        rewards.submit(*batch())


def test_close_fails_unfinished_batches():
    rewards = AsyncReward(functools.partial(SlowReward, 30.0), timeout_s=60)
    handle = rewards.submit(*batch())
    start = time.perf_counter()
    rewards.close(timeout_s=0.5)
    with pytest.raises(RuntimeError, match="closed before"):
        handle.result(timeout=1)
    assert time.perf_counter() - start < 5
    assert all(not w.process.is_alive() for w in rewards._workers)


def test_argument_checks():
    with pytest.raises(ValueError, match="workers"):
        AsyncReward(weighted_pixels, workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        AsyncReward(weighted_pixels, timeout_s=0)
    with pytest.raises(ValueError, match="retries"):
        AsyncReward(weighted_pixels, retries=-1)
    with pytest.raises(ValueError, match="on_failure"):
        AsyncReward(weighted_pixels, on_failure="zero")
    with pytest.raises(ValueError, match="start_method"):
        AsyncReward(weighted_pixels, start_method="fork")

