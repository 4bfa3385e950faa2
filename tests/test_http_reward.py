"""Rewards over HTTP: a served reward gives the same values as in process; every failure raises with
its cause; inside an AsyncReward a failing server is retried, then dropped and counted."""
import functools
import socket
import time

import pytest
import torch

from ddrl_engine.rewards import BrightnessReward
from ddrl_engine.rewards.async_rewards import AsyncReward
from ddrl_engine.rewards.http import HttpReward, serve_reward


def _batch(n=6):
    return torch.rand(n, 1, 8, 8) * 2 - 1, torch.arange(n) % 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_served_reward_equals_the_local_one(dtype):
    samples, cond = _batch()
    samples = samples.to(dtype)
    with serve_reward(BrightnessReward()) as server:
        got = HttpReward(server.url, name="brightness")(samples, cond)
    want = BrightnessReward()(samples, cond)
    assert got.dtype == torch.float32 and got.shape == (6,)
    torch.testing.assert_close(got, want.float(), rtol=0, atol=0)


def test_server_errors_and_bad_answers_raise_with_the_cause():
    samples, cond = _batch()

    def broken(samples, cond):
        raise FileNotFoundError("aesthetic head weights missing")

    with serve_reward(broken) as server:
        with pytest.raises(RuntimeError, match="answered 500(.|\n)*aesthetic head weights missing"):
            HttpReward(server.url, name="aesthetic")(samples, cond)
    with serve_reward(lambda s, c: torch.zeros(3)) as server:
        with pytest.raises(RuntimeError, match=r"shape \(3,\) for a batch of 6"):
            HttpReward(server.url, name="short")(samples, cond)
    with pytest.raises(ValueError, match="url"):
        HttpReward("localhost:1", name="x")
    with pytest.raises(TypeError, match="cond must be a tensor"):
        HttpReward("http://127.0.0.1:1", name="x")(samples, ["a"] * 6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_server_and_a_slow_server_raise():
    samples, cond = _batch()
    with pytest.raises(ConnectionError, match="no answer"):
        HttpReward(f"http://127.0.0.1:{_free_port()}", name="gone", timeout_s=2)(samples, cond)

    def slow(samples, cond):
        time.sleep(1.0)
        return samples.flatten(1).mean(1)

    with serve_reward(slow) as server:
        with pytest.raises(ConnectionError, match="no answer"):
            HttpReward(server.url, name="slow", timeout_s=0.2)(samples, cond)


def test_async_reward_retries_then_drops_an_unreachable_server():
    samples, cond = _batch()
    url = f"http://127.0.0.1:{_free_port()}"
    with AsyncReward(functools.partial(HttpReward, url, name="gone", timeout_s=1), retries=1, timeout_s=30) as rewards:
        assert rewards.submit(samples, cond).result() is None
        assert rewards.stats.dropped == 1 and rewards.stats.retried == 1 and rewards.stats.errors == 2
    with serve_reward(BrightnessReward()) as server:
        with AsyncReward(functools.partial(HttpReward, server.url, name="brightness"), timeout_s=30) as rewards:
            batch = rewards.submit(samples, cond).result()
    torch.testing.assert_close(batch.total, BrightnessReward()(samples, cond))


def test_reward_server_from_the_command_line():
    import subprocess
    import sys

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ddrl_engine.rewards.serve", "--factory",
                             "tests.async_reward_helpers:weighted_pixels", "--port", str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert "serving" in proc.stdout.readline()
        samples, cond = _batch()
        got = HttpReward(f"http://127.0.0.1:{port}", name="weighted")(samples, cond)
        from tests.async_reward_helpers import weighted_pixels

        torch.testing.assert_close(got, weighted_pixels()(samples, cond))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "ddrl_engine.rewards.serve", "--factory", "no_colon"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "package.module:function" in bad.stderr
