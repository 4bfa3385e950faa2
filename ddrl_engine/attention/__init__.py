"""The single attention entry point of the engine, and the context that picks its backend.

Models call `attention(q, k, v)` and never a backend directly, so the backend can be switched for a
block of code (`with attention_backend("fp8"): ...`) without touching model code. The choice lives in
a `ContextVar`, so it is scoped to the `with` block and to the current thread/task; nothing changes
at import time.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator, Optional

import torch
from torch import Tensor

from .backends import BACKENDS

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "attention", "attention_backend", "available_backends", "current_attention_backend"]

DEFAULT_BACKEND = "sdpa"

_backend: ContextVar[str] = ContextVar("ddrl_engine_attention_backend", default=DEFAULT_BACKEND)


def _check_backend_name(name: object, arg: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{arg}={name!r} is not an attention backend; known: {sorted(BACKENDS)}")
    return name


def current_attention_backend() -> str:
    """The backend `attention` uses when none is passed (default "sdpa")."""
    return _backend.get()


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[str]:
    """Use backend `name` as the default inside the `with` block (restored on exit, even on error)."""
    token = _backend.set(_check_backend_name(name, "name"))
    try:
        yield name
    finally:
        _backend.reset(token)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{arg} must have shape [B, H, S, D], got {tuple(t.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"q, k, v must share batch and heads [B, H]: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same sequence length: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device: {q.device}, {k.device}, {v.device}")


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, backend: Optional[str] = None, scale: Optional[float] = None,
    cp_group=None, cp_attention: str = "ulysses",
) -> Tensor:
    """Softmax attention over q, k, v of shape [B, H, S, D]; returns [B, H, S_q, D].

    backend: "sdpa" or "fp8"; None uses `current_attention_backend()`.
    scale: softmax scale; None means 1/sqrt(D).
    cp_group: a torch.distributed process group over which the sequence is sharded (context
        parallelism): q, k, v hold this rank's tokens [B, H, S/N, D] and the backend sees whole
        sequences for H/N heads (Ulysses all-to-all, `attention.context_parallel`); None: no sharding.
    cp_attention: how a sharded sequence is attended: "ulysses" (any backend) or "ring" (torch's ring,
        `attention.ring`: the keys and values travel round the group; the sdpa backend only).
    """
    name = current_attention_backend() if backend is None else _check_backend_name(backend, "backend")
    _check_qkv(q, k, v)
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")
    if cp_group is not None:
        from .context_parallel import check_cp_attention, ulysses_attention

        if check_cp_attention(cp_attention) == "ring":
            from .ring import RING_ATTENTION_ERROR, ring_attention

            if name != "sdpa":
                raise ValueError(f"{RING_ATTENTION_ERROR}; the attention backend is {name!r} (set "
                                 "rollout.attention_backend = 'sdpa' or context_parallel_attention = 'ulysses')")
            return ring_attention(q, k, v, cp_group, scale)
        return ulysses_attention(q, k, v, cp_group, lambda q_, k_, v_: BACKENDS[name](q_, k_, v_, scale))
    return BACKENDS[name](q, k, v, scale)


def available_backends(device: str | torch.device | None = None) -> dict[str, tuple[bool, str]]:
    """{backend: (usable on `device`, note)}: what the trainer checks rollout.attention_backend against,
    and what `python -m ddrl_engine.info` prints.

    device: the device the caller will run attention on; None means the default device ("cuda" when
    torch.cuda.is_available(), else "cpu").
    "sdpa" is always usable. "fp8" is usable on a CPU device (an exact emulation of the CUDA kernel,
    not a fast path; the note says so) and on a CUDA device only when
    `ddrl_engine.ops.fp8_attention.fp8_cuda_status()` says the kernel can run; otherwise it is
    (False, the reason). Other device types: fp8 is refused.
    """
    from ddrl_engine.ops.fp8_attention import fp8_cuda_status

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if kind == "cpu":
        fp8 = (True, "cpu: exact emulation of the CUDA kernel (for tests, not speed)")
    elif kind == "cuda":
        cuda_ok, why = _on_cuda_device(torch.device(device), fp8_cuda_status)
        fp8 = (True, "cuda: sm_90 kernel") if cuda_ok else (False, f"cuda: {why}")
    else:
        fp8 = (False, f"no fp8 attention kernel for device type {kind!r} (only cpu emulation and cuda sm_90)")
    return {"sdpa": (True, ""), "fp8": fp8}


def _on_cuda_device(device: torch.device, status):
    """status() evaluated with `device` current (fp8_cuda_status reads the current device's
    capability), so "cuda:N" is judged by GPU N."""
    if device.index is None or not torch.cuda.is_available():
        return status()
    if device.index >= torch.cuda.device_count():
        return False, f"no CUDA device {device.index} (torch sees {torch.cuda.device_count()})"
    with torch.cuda.device(device):
        return status()
