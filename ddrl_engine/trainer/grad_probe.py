"""A diagnostic Trainer that measures, per trained step, the gradient each term adds: the policy term
(clipped policy loss, plus the KL when on) and the data term (beta_data times the diffusion loss).

The Trainer runs one backward per trained step for each term (`Trainer._data_pass`,
`Trainer._policy_pass`); the probe keeps a copy of the accumulated gradients before each backward and
takes the norm of what that backward added, so the figures are the gradients of the very losses the
trainer optimises, with its weights (1 / |trained steps|, beta_data, loss_scale) applied. It costs one
copy of the gradients per backward: for small models and short diagnostic runs, one process only.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch

from ddrl_engine.trainer.loop import Trainer


class GradProbeTrainer(Trainer):
    """`Trainer` that records `records`: per update {"steps": trained steps, "policy": [norm per step],
    "data": [norm per step]} (norms of each backward's gradient increment, before clipping)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.dist is not None:
            raise ValueError("GradProbeTrainer runs in one process (the increments are of local gradients)")
        self.records: list[dict] = []
        self._norms: list[float] | None = None

    def _probe(self, kind: str, run, plan) -> None:
        if len(plan.roll_parts) != 1 or len(plan.data_parts) > 1:
            raise ValueError("GradProbeTrainer needs optim.micro_batch = 0 (one backward per trained step and term)")
        self._norms = []
        run()
        if not self.records or self.records[-1]["update"] != self.step:
            self.records.append({"update": self.step, "steps": list(plan.steps)})
        self.records[-1][kind] = self._norms
        self._norms = None

    def _data_pass(self, data, ro, plan, synced, acc) -> None:
        self._probe("data", lambda: super(GradProbeTrainer, self)._data_pass(data, ro, plan, synced, acc), plan)

    def _policy_pass(self, batch, adv, plan, synced, acc, *, first_epoch: bool) -> None:
        self._probe("policy", lambda: super(GradProbeTrainer, self)._policy_pass(
            batch, adv, plan, synced, acc, first_epoch=first_epoch), plan)

    def _backward(self, loss: torch.Tensor) -> None:
        if self._norms is None:
            return super()._backward(loss)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        before = [None if p.grad is None else p.grad.detach().clone() for p in params]
        super()._backward(loss)
        sq = 0.0
        for p, b in zip(params, before):
            if p.grad is not None:
                d = p.grad.detach() if b is None else p.grad.detach() - b
                sq += float(d.double().pow(2).sum())
        self._norms.append(math.sqrt(sq))


def step_profile(records: list[dict]) -> dict:
    """Per trained step k: the mean over updates of each term's gradient-increment norm."""
    steps = records[0]["steps"]
    out = {"steps": steps}
    for kind in ("policy", "data"):
        rows = [r[kind] for r in records if len(r.get(kind, ())) == len(steps)]
        out[kind] = [sum(col) / len(col) for col in zip(*rows)] if rows else None
    return out


def run_probes(out: Path, cfg, base, sampler, rewards, dataset, variants, *, steps: int, seed: int = 0,
               log=print) -> dict:
    """For every DDRL variant (a data term and a reward) whose data loss runs at each trained step's level
    and noise (data_noise = "rollout", data_loss_steps = "all"): `steps` updates at its middle strength from the
    base; writes and returns probe.json {variant: {"strength", "std" (s_k per trained step), "steps",
    "policy", "data"}}. Variants already in probe.json with the same steps are kept."""
    from ddrl_engine.trainer.study import RunSpec

    path = out / "probe.json"
    probes = json.loads(path.read_text()) if path.exists() else {}
    for v in variants:
        if v.strength != "beta_data" or not v.strengths:
            continue
        strength = sorted(v.strengths)[len(v.strengths) // 2]
        if probes.get(v.name, {}).get("updates") == steps and probes[v.name].get("strength") == strength:
            continue
        spec = RunSpec(v, strength, seed)
        rcfg = spec.config(cfg, out / "probe", steps, steps)
        if rcfg.algorithm.data_noise != "rollout" or rcfg.algorithm.data_loss_steps != "all":
            # the data term's backwards are then not at the trained steps' levels: no per-step pairing
            log(f"probe {v.name}: skipped (data_noise = {rcfg.algorithm.data_noise!r}, data_loss_steps = "
                f"{rcfg.algorithm.data_loss_steps!r}: the data loss is not at each trained step's level)")
            continue
        trainer = GradProbeTrainer(rcfg, copy.deepcopy(base), sampler, rewards, dataset, None, log=lambda *a: None)
        while trainer.step < steps:
            trainer.train_step()
        prof = step_profile(trainer.records)
        prof["std"] = [float(sampler.coefs(k).std) for k in prof["steps"]]
        probes[v.name] = {"strength": strength, "updates": steps, **prof}
        log(f"probe {v.name} (beta_data={strength:g}, {steps} updates): policy/data gradient ratio per step " +
            ", ".join(f"k{k}: {p / d:.3g}" for k, p, d in zip(prof["steps"], prof["policy"], prof["data"]) if d))
    path.write_text(json.dumps(probes, indent=2) + "\n")
    return probes
