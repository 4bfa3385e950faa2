"""The rollout as a reusable runner: eager, or captured once per shape into a CUDA graph and replayed.

Both modes run the same loop, `rollout.run_chain`, on the same plan: one set of static buffers per
key (batch size, K, state dtype, sample shape, log-prob reduction, attention backend, generator),
kept by the runner and overwritten by every call with that key. In graph mode that loop is captured
once per key and replayed:

- inputs: the conditions are copied into a static [B] tensor before each replay;
- multistep samplers (`sampler.multistep`): the previous step's model output of every step
  (`Rollout.prev_outs`) is one more static buffer, written and read inside the captured loop;
- noise: the initial noise and every step's eps come from the caller's CUDA generator, registered
  with the graph (`CUDAGraph.register_generator_state`). Each replay reads the generator's current
  seed and offset and advances it by the whole graph's draws, so a replay gives the samples an eager
  run from the same generator state gives (bitwise, on one stream) and fresh noise every call;
- weights: the graph reads the policy's parameter storage; in-place updates (the optimiser step,
  `load_state_dict`) are seen by the next replay without recapture. If a parameter or buffer is
  replaced by a new tensor (other storage; for FSDP2's DTensor parameters, of the local shard) or the
  sampler's tables move, the runner recaptures (counted in `captures`), since the old graph would
  read stale memory;
- mode: the policy's train/eval flags and an enclosing CUDA autocast are part of the key (a graph
  replays the kernels it captured); under autocast the weights are cast inside the graph (no autocast
  weight cache), so optimiser steps are seen.

In graph mode (and in eager mode with reuse_buffers=True) the returned Rollout's tensors are views of
the static buffers: valid until the next call with the same key (clone what must outlive it). By
default an eager runner allocates fresh buffers per call, so each Rollout is the caller's own. A graph request that cannot be honoured raises (CPU device,
no CUDA, no explicit CUDA generator, a capture error such as a host sync in the policy); the runner
never falls back to eager on its own.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from ddrl_engine.attention import current_attention_backend
from ddrl_engine.profiling import phase
from ddrl_engine.sampling.base import Sampler
from ddrl_engine.sampling.rollout import Rollout, RolloutBuffers, as_rollout, check_cond, run_chain

_REDUCTIONS = ("mean", "sum")
_FAILED_CAPTURES: list = []  # graphs whose capture raised, kept alive (see RolloutRunner._capture)


def graph_unavailable_reason(device) -> str | None:
    """Why a CUDA graph rollout cannot run on `device` here, or None when it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"CUDA graphs capture CUDA work; the rollout runs on '{device}'. Use a CUDA device "
                "(run.device = 'cuda') or set rollout.cuda_graph = false")
    if not torch.cuda.is_available():
        return "CUDA graphs need a CUDA GPU, and torch.cuda.is_available() is False here"
    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        return (f"torch {torch.__version__} lacks CUDAGraph.register_generator_state (graph-safe custom "
                "generators); fresh noise per replay needs torch >= 2.5")
    return None


@dataclass
class _Entry:
    """One key's plan: static inputs/outputs, and in graph mode the captured graph and what it read."""

    cond: Tensor
    buffers: RolloutBuffers
    graph: object = None
    tables: object = None
    weight_ptrs: tuple = ()
    generator: torch.Generator | None = None
    keep: list = field(default_factory=list)


class RolloutRunner:
    """`runner(cond, generator=...) -> Rollout`: the rollout of `policy` under `sampler`.

    cuda_graph: False runs `run_chain` eagerly (any device); True captures it into a CUDA graph per
        key and replays it (needs a CUDA device; raises with the reason otherwise).
    sample_shape, dtype, reduction: as in `rollout()`.
    reuse_buffers: keep one set of static buffers per key and return views of it (overwritten by the
        next call with that key). Default: True with cuda_graph (a graph writes into the memory it
        captured), False in eager mode (each call's Rollout owns its tensors).
    warmup: eager runs on a side stream before a capture (lazy initialisation of cuBLAS/cuDNN and
        the allocator must not happen inside the capture); the generator state is restored after
        them, so the first replay uses the noise the caller's generator state implies.

    Attributes: captures (how many graphs were captured so far), keys (the live plan keys).
    """

    def __init__(self, policy, sampler: Sampler, *, sample_shape: Sequence[int], dtype: torch.dtype = torch.float32,
                 reduction: str = "mean", cuda_graph: bool = False, warmup: int = 2,
                 reuse_buffers: bool | None = None) -> None:
        if reduction not in _REDUCTIONS:
            raise ValueError(f"RolloutRunner: 'reduction' must be one of {_REDUCTIONS}, got {reduction!r}")
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"RolloutRunner: 'cuda_graph' must be a bool, got {cuda_graph!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"RolloutRunner: 'warmup' must be an int >= 1, got {warmup!r}")
        self.policy, self.sampler = policy, sampler
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.dtype, self.reduction, self.cuda_graph, self.warmup = dtype, reduction, cuda_graph, warmup
        if reuse_buffers is None:
            reuse_buffers = cuda_graph
        if cuda_graph and not reuse_buffers:
            raise ValueError("RolloutRunner: cuda_graph=True replays into its captured buffers; reuse_buffers must be True")
        self.reuse_buffers = bool(reuse_buffers)
        self.captures = 0
        self._entries: dict[tuple, _Entry] = {}
        if cuda_graph:
            device = self._policy_device()
            if device is not None:
                self.check_device(device)

    def _policy_device(self):
        p = next(iter(self.policy.parameters()), None) if hasattr(self.policy, "parameters") else None
        return None if p is None else p.device

    @staticmethod
    def check_device(device) -> None:
        """Raises RuntimeError with the reason when a graphed rollout cannot run on `device`."""
        reason = graph_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"rollout.cuda_graph = true cannot be honoured: {reason}")

    @property
    def keys(self) -> list[tuple]:
        return list(self._entries)

    def clear(self) -> None:
        """Drops every plan (static buffers and graphs)."""
        self._entries.clear()

    # ---- the plan ---------------------------------------------------------------------------
    def key(self, cond: Tensor, generator: torch.Generator | None, shard: tuple[int, int] | None = None,
            window: tuple[int, int] | None = None) -> tuple:
        """What a captured graph depends on besides the weights' storage: batch, K, dtype, shape,
        reduction, attention backend, device, the policy's train/eval flags and the CUDA autocast
        state (both change which kernels a forward launches; a graph replays what it captured), in
        graph mode the generator it reads, the shard, and the SDE window (which steps are SDE steps
        drawing noise and which ODE steps: a different captured chain per window)."""
        gen = id(generator) if self.cuda_graph else None
        modes = tuple(m.training for m in self.policy.modules()) if hasattr(self.policy, "modules") else ()
        return (cond.shape[0], self.sampler.num_steps, self.dtype, self.sample_shape, self.reduction,
                current_attention_backend(), str(cond.device), gen, modes, _autocast_dtype()) + (
                    (tuple(shard),) if shard is not None else ()) + (
                    (("sde_window", *window),) if window is not None else ())

    def _weight_ptrs(self) -> tuple:
        """Where (and as what) every parameter and buffer lives. An FSDP2 parameter is a DTensor,
        whose own data_ptr() is 0: its local shard's storage is what the captured all-gather reads."""
        if not hasattr(self.policy, "parameters"):
            return ()
        tensors = list(self.policy.parameters()) + list(self.policy.buffers())
        out = []
        for t in tensors:
            local = getattr(t, "_local_tensor", None)
            t = local if isinstance(local, Tensor) else t
            out.append((t.data_ptr(), t.dtype, tuple(t.shape)))
        return tuple(out)

    def _entry(self, cond: Tensor, generator, shard=None, window=None) -> _Entry:
        key = self.key(cond, generator, shard, window)
        entry = self._entries.get(key)
        if entry is None:
            buffers = RolloutBuffers.allocate(cond.shape[0], self.sampler.num_steps, self.sample_shape, self.dtype,
                                              cond.device, multistep=self.sampler.multistep)
            entry = _Entry(cond=torch.empty_like(cond), buffers=buffers)
            self._entries[key] = entry
        return entry

    # ---- running ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, cond: Tensor, *, generator: torch.Generator | None,
                 shard: tuple[int, int] | None = None, window: tuple[int, int] | None = None) -> Rollout:
        """shard = (first, total): cond holds rows first:first+B of a batch split across processes
        (see `run_chain`). window = (first, size): an SDE window (ODE steps outside it; see
        `rollout()`); in graph mode each window is its own key (its own graph and buffers)."""
        check_cond(cond, "RolloutRunner")
        if window is not None:
            window = self.sampler.check_window(window)
        self.sampler.to(cond.device)
        if self.cuda_graph:
            self.check_device(cond.device)
            if not isinstance(generator, torch.Generator) or generator.device.type != "cuda":
                raise RuntimeError("rollout.cuda_graph = true cannot be honoured: the graphed rollout needs an "
                                   f"explicit CUDA torch.Generator (registered with the graph), got {generator!r}")
        if not self.reuse_buffers:  # eager, the caller owns the result
            buffers = RolloutBuffers.allocate(cond.shape[0], self.sampler.num_steps, self.sample_shape, self.dtype,
                                              cond.device, multistep=self.sampler.multistep)
            cond = cond.clone()
            with phase("rollout"):
                run_chain(self.policy, self.sampler, cond, buffers, generator=generator, reduction=self.reduction,
                          shard=shard, window=window)
            return as_rollout(buffers, self.sampler, cond, self.reduction, window)
        entry = self._entry(cond, generator, shard, window)
        # Graph mode: warm-up, capture and replay on cond's device whatever the current device is
        # (the generator's graph-side seed/offset tensors are made on the current device).
        on_device = torch.cuda.device(cond.device) if self.cuda_graph else contextlib.nullcontext()
        with phase("rollout"), on_device:
            entry.cond.copy_(cond)
            if not self.cuda_graph:
                run_chain(self.policy, self.sampler, entry.cond, entry.buffers, generator=generator,
                          reduction=self.reduction, shard=shard, window=window)
            else:
                if entry.graph is None or not self._graph_is_current(entry):
                    self._capture(entry, generator, shard, window)
                with phase("rollout/replay"):
                    entry.graph.replay()
        return as_rollout(entry.buffers, self.sampler, entry.cond, self.reduction, window)

    def _graph_is_current(self, entry: _Entry) -> bool:
        return entry.tables is self.sampler._tables and entry.weight_ptrs == self._weight_ptrs()

    def _capture(self, entry: _Entry, generator: torch.Generator, shard=None, window=None) -> None:
        entry.graph = None
        device = entry.cond.device
        state = generator.get_state()
        amp = _autocast_dtype()

        def run():
            # Under an enclosing CUDA autocast, its weight cache would hand the capture the low-precision
            # weight copies the warm-up made (outside the graph, freed when that autocast exits, never
            # refreshed by optimiser steps): cast inside the graph instead, on every replay.
            amp_ctx = (contextlib.nullcontext() if amp is None
                       else torch.autocast("cuda", dtype=amp, cache_enabled=False))
            with amp_ctx:
                run_chain(self.policy, self.sampler, entry.cond, entry.buffers, generator=generator,
                          reduction=self.reduction, shard=shard, window=window)

        with phase("rollout/capture"):
            graph = None
            caller_stream = torch.cuda.current_stream(device)
            try:
                # Warm-up and capture on the same side stream: lazily created per-stream state (e.g.
                # cuBLAS workspaces) then exists before the capture starts.
                side = torch.cuda.Stream(device=device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(self.warmup):
                        run()
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                graph.register_generator_state(generator)
                with torch.cuda.graph(graph, stream=side):
                    run()
            except Exception as e:  # the cause is chained; no eager fallback
                # torch.cuda.graph.__exit__ skips restoring the caller's stream when capture_end raises.
                torch.cuda.set_stream(caller_stream)
                if graph is not None:
                    # The caching allocator may keep this graph's pool filter (which points at the
                    # graph) after a capture_end that raised: never free the object it points to.
                    _FAILED_CAPTURES.append(graph)
                    graph = None
                _reset_generators_after_failed_capture(generator, device)
                raise RuntimeError(
                    "rollout.cuda_graph = true cannot be honoured: capturing the rollout into a CUDA graph failed "
                    f"({type(e).__name__}: {e}). Typical causes: a host sync in the policy (.item(), .cpu(), "
                    "data-dependent shapes), a CPU tensor created inside forward, or an op that is not capturable. "
                    "Fix the policy or set rollout.cuda_graph = false") from e
            finally:
                generator.set_state(state)
        entry.graph = graph
        entry.tables = self.sampler._tables
        entry.weight_ptrs = self._weight_ptrs()
        entry.generator = generator  # keeps id(generator) in the key unique while the entry lives
        self.captures += 1


def _autocast_dtype() -> torch.dtype | None:
    """The dtype of an enclosing CUDA autocast region, or None outside one."""
    if not torch.is_autocast_enabled("cuda"):
        return None
    return torch.get_autocast_dtype("cuda")


def _reset_generators_after_failed_capture(generator: torch.Generator, device) -> None:
    """Best effort, after a capture that raised. torch releases that keep the graph RNG state per
    generator (not per capture) put every generator of a capture (the explicit one and the device's
    default one) into capture mode at capture_begin and take them out only when capture_end succeeds;
    after a failed capture each later eager draw from them raises ("Offset increment outside graph
    capture encountered unexpectedly"). One successful capture with the same generators resets that;
    on releases with per-capture RNG state it is a harmless no-op."""
    try:
        with torch.cuda.device(device):
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(generator)
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(device=device)):
                torch.zeros(1, device=device)
            del graph
    except Exception:  # the original capture error is what the caller reports
        pass
