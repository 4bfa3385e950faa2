"""Named ranges around every phase of a DDRL step, for Nsight (NVTX) and torch.profiler.

`phase(name)` opens one range under two tools at once:
- an NVTX push/pop range in the domain "ddrl" (the `nvtx` package). Outside Nsight the package hands
  out a dummy domain whose push/pop do nothing (about 0.1 us per range measured on a 2-core x86_64 VM),
  so the ranges stay on in production;
- a `torch.profiler.record_function` range named "ddrl/<name>", only while a torch profiler is
  recording (one C-level check otherwise), which is what the profiling harness aggregates.

Names are fixed strings from PHASES (documented in profiling/README.md); the sampling-step and
trained-step indices travel as the NVTX payload and are not part of the name, so tables aggregate
them. Ranges are host-side markers: inside a captured CUDA graph they run once, at capture time
(under "rollout/capture"); a replay is one "rollout/replay" range (Nsight's
`--cuda-graph-trace=node` still shows every kernel of the replayed graph).

This module is a leaf (imports torch and nvtx only), so every layer may use it.
"""
from __future__ import annotations

import nvtx
import torch

DOMAIN = "ddrl"
TORCH_PREFIX = "ddrl/"

# name -> what it covers. Nesting (in a training step): step > collect > rollout > rollout/step ...
PHASES: dict[str, str] = {
    "step": "one whole training step (collect + update)",
    "collect": "rollout, reward submission (and old log-prob recomputation), no grad",
    "rollout": "the K-step sampling chain of one rollout batch (eager, or capture + replay)",
    "rollout/step": "one sampling step: policy forward, SDE step, step_logprob (payload: k); eager or at capture",
    "rollout/finish": "the final deterministic denoise (one forward, or a copy)",
    "rollout/capture": "capturing the chain into a CUDA graph (once per shape key)",
    "rollout/replay": "one replay of the captured chain",
    "reward": "reward models on the decoded samples (in-process), or handing them to the reward workers",
    "reward/wait": "blocking on the rewards when the update first needs the advantages (after the data-loss pass)",
    "advantage": "group-normalised advantages (in the update, once the rewards are in)",
    "old_logprob": "recomputing the old log-probs with the training forward (rollout.recompute_old_logprobs)",
    "update": "all optimiser steps on one rollout batch",
    "train/step": "one trained sampling step of the data-loss pass or of the policy pass (payload: k)",
    "train/forward": "the policy's transition forward with grad (new log-prob)",
    "train/reference": "the reference model's forward (KL baselines)",
    "train/data_loss": "the data (diffusion) loss forward on the off-policy batch",
    "train/backward": "one backward: of a trained step's data loss, or of its policy loss + KL",
    "optimizer": "gradient clipping, AdamW step and EMA update",
    "checkpoint": "writing a checkpoint",
    "eval": "the held-out evaluation",
    "cp/all_to_all": "context parallelism: one Ulysses all-to-all (q, k, v to whole sequences, or the output back)",
    "cp/all_gather": "context parallelism: gathering a cp group's token slices into whole sequences",
    "cp/ring": "context parallelism: one ring attention (K/V rotations round the cp group and the blocks' attention)",
}

_COLORS = {"step": "white", "collect": "blue", "rollout": "green", "reward": "orange", "advantage": "yellow",
           "old_logprob": "cyan", "update": "red", "train": "purple", "optimizer": "rapids",
           "checkpoint": "grey", "eval": "darkgreen", "cp": "magenta"}

_domain = None
_attributes: dict[tuple[str, int | None], object] = {}


def _nvtx_attributes(name: str, payload: int | None):
    global _domain
    key = (name, payload)
    attrs = _attributes.get(key)
    if attrs is None and key not in _attributes:
        if _domain is None:
            _domain = nvtx.get_domain(DOMAIN)
        color = _COLORS.get(name.split("/", 1)[0], "blue")
        attrs = _domain.get_event_attributes(message=name, color=color, payload=payload)
        _attributes[key] = attrs
    return attrs


class phase:
    """`with phase("rollout"): ...` (or `phase("rollout/step", k)`): one named range, see the module doc.

    name must be one of PHASES (checked, so the documented table stays complete); payload is an
    optional int shown by Nsight (the step index).
    """

    __slots__ = ("name", "payload", "_record")

    def __init__(self, name: str, payload: int | None = None) -> None:
        if name not in PHASES:
            raise ValueError(f"phase: unknown range name {name!r}; add it to ddrl_engine.profiling.PHASES "
                             "and profiling/README.md")
        self.name, self.payload, self._record = name, payload, None

    def __enter__(self) -> "phase":
        attrs = _nvtx_attributes(self.name, self.payload)
        _domain.push_range(attrs)
        if torch._C._autograd._profiler_enabled():
            self._record = torch.profiler.record_function(TORCH_PREFIX + self.name)
            self._record.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._record is not None:
            self._record.__exit__(*exc)
            self._record = None
        _domain.pop_range()
