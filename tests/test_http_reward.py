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


# ---- the server's limits (the reliability issue) ------------------------------------------------

def _post(url, body: bytes, headers: dict, timeout=10):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _payload(n=4, m=None):
    from safetensors.torch import save as st_save

    samples, cond = _batch(n)
    return st_save({"samples": samples, "cond": cond[: (n if m is None else m)].contiguous()})


def test_server_checks_content_type_size_and_cond_length():
    octet = {"Content-Type": "application/octet-stream"}
    with serve_reward(BrightnessReward(), max_body_bytes=4096) as server:
        assert _post(server.url, _payload(), octet)[0] == 200
        code, text = _post(server.url, _payload(), {"Content-Type": "application/json"})
        assert code == 415 and "application/octet-stream" in text
        code, text = _post(server.url, _payload(n=64), octet)
        assert code == 413 and "max_body_bytes" in text
        code, text = _post(server.url, _payload(n=4, m=3), octet)
        assert code == 400 and "'cond' must have shape [B] = [4]" in text
        code, text = _post(server.url, b"not safetensors", octet)
        assert code == 400 and "not a safetensors payload" in text


def test_oversized_body_is_refused_before_it_is_read():
    with serve_reward(BrightnessReward(), max_body_bytes=1000) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                      b"Content-Length: 600000000\r\n\r\n")  # 572 MiB announced, nothing sent
            assert s.recv(64).startswith(b"HTTP/1.0 413")


def test_idle_connections_are_closed_after_the_read_timeout():
    with serve_reward(BrightnessReward(), read_timeout_s=0.5) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            start = time.monotonic()
            assert s.recv(64) == b""  # the server hangs up on a client that sends nothing
            assert time.monotonic() - start < 5


def test_requests_past_max_connections_get_503():
    import threading

    release = threading.Event()

    def slow(samples, cond):
        release.wait(10)
        return samples.flatten(1).float().mean(1)

    octet = {"Content-Type": "application/octet-stream"}
    with serve_reward(slow, max_connections=1) as server:
        first = threading.Thread(target=_post, args=(server.url, _payload(), octet))
        first.start()
        time.sleep(0.5)
        code, text = _post(server.url, _payload(), octet)
        release.set()
        first.join()
    assert code == 503 and "max_connections" in text


def test_32_concurrent_clients_are_never_reset():
    import threading

    errors = []

    def client(reward):
        samples, cond = _batch(2)
        for _ in range(40):
            try:
                reward(samples, cond)
            except Exception as e:  # noqa: BLE001 - counted
                errors.append(repr(e))

    with serve_reward(BrightnessReward()) as server:
        threads = [threading.Thread(target=client, args=(HttpReward(server.url, name="b", timeout_s=60),))
                   for _ in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, f"{len(errors)} of {32 * 40} requests failed, e.g. {errors[0]}"
