"""Rewards served over HTTP: a reward model running in another process (or on another host, e.g. next
to its own GPU) behind a small POST endpoint.

    server = serve_reward(MyAestheticReward(), port=8765)   # in the process that holds the model
    reward = HttpReward("http://127.0.0.1:8765", name="aesthetic", timeout_s=60)
    values = reward(samples, cond)                          # [B] float32, like any Reward

A reward server from the command line: `python -m ddrl_engine.rewards.serve --factory pkg.module:fn`.

Protocol (one request per batch): POST of a safetensors payload with the tensors "samples" [B, ...]
and "cond" [B] (only tensor conditions travel); the answer is a safetensors payload with "rewards"
[B] float32, or HTTP 500 with the server-side traceback as text. Plain stdlib HTTP (no extra
dependency). An `HttpReward` raises on any failure (connection refused, timeout, server error, a
malformed answer); wrap it in an `AsyncReward` to get timeouts, retries and drop counting:

    AsyncReward(functools.partial(HttpReward, url, name="aesthetic"), workers=2, retries=2)
"""
from __future__ import annotations

import threading
import traceback
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

__all__ = ["HttpReward", "RewardServer", "serve_reward"]

_CONTENT_TYPE = "application/octet-stream"


class HttpReward:
    """A `Reward` whose values come from a reward server at `url` (see the module docstring)."""

    def __init__(self, url: str, *, name: str, timeout_s: float = 60.0) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"HttpReward: url must start with http:// or https://, got {url!r}")
        if not timeout_s > 0:
            raise ValueError(f"HttpReward: timeout_s must be > 0, got {timeout_s!r}")
        self.url, self.name, self.timeout_s = url, name, float(timeout_s)

    @torch.no_grad()
    def __call__(self, samples: Tensor, cond: Tensor) -> Tensor:
        if not isinstance(cond, Tensor):
            raise TypeError(f"HttpReward {self.name!r}: cond must be a tensor [B] to be sent, got {type(cond).__name__}")
        body = st_save({"samples": samples.detach().cpu().contiguous(), "cond": cond.detach().cpu().contiguous()})
        request = urllib.request.Request(self.url, data=body, method="POST", headers={"Content-Type": _CONTENT_TYPE})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"HttpReward {self.name!r}: the server at {self.url} answered {e.code}:\n{detail}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConnectionError(f"HttpReward {self.name!r}: no answer from {self.url} ({reason})") from None
        try:
            rewards = st_load(payload)["rewards"]
        except Exception as e:  # noqa: BLE001 - whatever the bytes were, say what was expected
            raise RuntimeError(f"HttpReward {self.name!r}: the answer from {self.url} is not a safetensors "
                               f"payload with a 'rewards' tensor ({type(e).__name__}: {e})") from None
        if rewards.shape != (samples.shape[0],):
            raise RuntimeError(f"HttpReward {self.name!r}: the server returned rewards of shape {tuple(rewards.shape)} "
                               f"for a batch of {samples.shape[0]}")
        return rewards.float().to(samples.device)


class RewardServer:
    """A running reward server (see `serve_reward`); `url` to reach it, `close()` to stop it."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._httpd, self._thread = httpd, thread
        host, port = httpd.server_address[:2]
        self.url = f"http://{host}:{port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> "RewardServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve_reward(reward, *, host: str = "127.0.0.1", port: int = 0) -> RewardServer:
    """Serves `reward` (a callable `(samples, cond) -> [B]`) on host:port (0 = a free port) from a
    background thread of this process; requests run one at a time (the model is not re-entrant)."""
    if not callable(reward):
        raise TypeError(f"serve_reward: reward must be callable, got {type(reward).__name__}")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server hook name
            try:
                tensors = st_load(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with lock, torch.no_grad():
                    values = reward(tensors["samples"], tensors["cond"])
                body, code, kind = st_save({"rewards": torch.as_tensor(values).float().contiguous()}), 200, _CONTENT_TYPE
            except Exception:  # noqa: BLE001 - the client gets the traceback
                body, code, kind = traceback.format_exc().encode(), 500, "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet: one line per batch would flood training logs
            pass

    httpd = ThreadingHTTPServer((host, port), Handler)
    thread = threading.Thread(target=httpd.serve_forever, name="ddrl-reward-server", daemon=True)
    thread.start()
    return RewardServer(httpd, thread)

