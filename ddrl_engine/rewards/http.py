"""Rewards served over HTTP: a reward model running in another process (or on another host, e.g. next
to its own GPU) behind a small POST endpoint.

    server = serve_reward(MyAestheticReward(), port=8765)   # in the process that holds the model
    reward = HttpReward("http://127.0.0.1:8765", name="aesthetic", timeout_s=60)
    values = reward(samples, cond)                          # [B] float32, like any Reward

A reward server from the command line: `python -m ddrl_engine.rewards.serve --factory pkg.module:fn`.

Protocol (one request per batch): POST of a safetensors payload with the tensors "samples" [B, ...]
and "cond" [B] (only tensor conditions travel); the answer is a safetensors payload with "rewards"
[B] float32, or HTTP 500 with the server-side traceback as text. Plain stdlib HTTP (no extra
dependency), with the limits a server needs: the content type checked (415), a body size limit
(413; `max_body_bytes`), a read timeout per connection (idle or slow clients are dropped), `cond`'s
length checked against the samples (400), at most `max_connections` requests at once (503 past
that), and a listen backlog deep enough that bursts of clients are queued, never reset. An `HttpReward` raises on any failure (connection refused, timeout, server error, a
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


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the listen backlog: 5 (the default) reset connections under 32 clients
    daemon_threads = True


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


def serve_reward(reward, *, host: str = "127.0.0.1", port: int = 0, max_body_bytes: int = 1 << 30,
                 read_timeout_s: float = 60.0, max_connections: int = 64) -> RewardServer:
    """Serves `reward` (a callable `(samples, cond) -> [B]`) on host:port (0 = a free port) from a
    background thread of this process; requests run one at a time (the model is not re-entrant).

    max_body_bytes: larger requests are refused (413) before their body is read (default 1 GiB).
    read_timeout_s: a connection that sends nothing for this long is closed (no thread held forever).
    max_connections: requests handled at once (waiting for the model included); more get 503.
    """
    if not callable(reward):
        raise TypeError(f"serve_reward: reward must be callable, got {type(reward).__name__}")
    for name, value in (("max_body_bytes", max_body_bytes), ("read_timeout_s", read_timeout_s),
                        ("max_connections", max_connections)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"serve_reward: {name} must be > 0, got {value!r}")
    lock = threading.Lock()
    slots = threading.BoundedSemaphore(int(max_connections))

    class Handler(BaseHTTPRequestHandler):
        timeout = float(read_timeout_s)  # socket timeout of every read (StreamRequestHandler)

        def do_POST(self):  # noqa: N802 - the http.server hook name
            if not slots.acquire(blocking=False):
                return self._answer(503, f"busy: {max_connections} requests in progress (max_connections)")
            try:
                self._handle()
            finally:
                slots.release()

        def _handle(self):
            kind = self.headers.get("Content-Type", "").split(";")[0].strip()
            if kind != _CONTENT_TYPE:
                return self._answer(415, f"Content-Type must be {_CONTENT_TYPE} (a safetensors payload), got {kind!r}")
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                return self._answer(411, "a Content-Length header is required")
            if int(length) > max_body_bytes:
                return self._answer(413, f"the body has {int(length)} bytes, more than max_body_bytes = {max_body_bytes}")
            try:
                body = self.rfile.read(int(length))
            except OSError:  # read timeout or a dropped client: nobody to answer
                self.close_connection = True
                return
            try:
                tensors = st_load(body)
                samples, cond = tensors["samples"], tensors["cond"]
            except Exception as e:  # noqa: BLE001 - say what was expected
                return self._answer(400, f"the body is not a safetensors payload with 'samples' and 'cond' "
                                         f"({type(e).__name__}: {e})")
            if samples.dim() < 1 or cond.shape != (samples.shape[0],):
                return self._answer(400, f"'cond' must have shape [B] = [{samples.shape[0] if samples.dim() else '?'}] "
                                         f"matching 'samples' {list(samples.shape)}, got {list(cond.shape)}")
            try:
                with lock, torch.no_grad():
                    values = reward(samples, cond)
                body = st_save({"rewards": torch.as_tensor(values).float().contiguous()})
            except Exception:  # noqa: BLE001 - the client gets the traceback
                return self._answer(500, traceback.format_exc())
            self._answer(200, body, _CONTENT_TYPE)

        def _answer(self, code: int, body, kind: str = "text/plain"):
            body = body.encode() if isinstance(body, str) else body
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            if code != 200:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet: one line per batch would flood training logs
            pass

    httpd = _Server((host, port), Handler)
    thread = threading.Thread(target=httpd.serve_forever, name="ddrl-reward-server", daemon=True)
    thread.start()
    return RewardServer(httpd, thread)
