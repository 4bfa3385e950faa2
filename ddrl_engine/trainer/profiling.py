"""Profiling a run: N training steps under torch.profiler, a Chrome trace and a per-phase time table.

The phases are the `ddrl_engine.profiling.phase` ranges the trainer and the rollout open (names in
`ddrl_engine.profiling.PHASES`, documented in profiling/README.md). The same ranges are NVTX ranges
for Nsight (tools/nsys_profile.sh, tools/ncu_kernels.sh); `cuda_profiler_range` brackets the
measured steps with cudaProfilerStart/Stop so Nsight's `--capture-range=cudaProfilerApi` records
exactly them. Used by profiling/harness.py and tools/bench_step.py.
"""
from __future__ import annotations

import contextlib
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ddrl_engine.profiling import PHASES, TORCH_PREFIX
from ddrl_engine.trainer.config import TrainConfig


def build_trainer(cfg: TrainConfig, *, dataset=None, sync_timing: bool = False, log=lambda *a: None):
    """A Trainer on a freshly initialised model (no pretraining, no evaluator): what profiling needs.
    dataset: a trainer.builders.Dataset, or None for the configured one."""
    from ddrl_engine.trainer.builders import build_dataset, build_model, build_rewards, build_sampler
    from ddrl_engine.trainer.loop import Trainer

    dataset = build_dataset(cfg) if dataset is None else dataset
    torch.manual_seed(cfg.run.seed)
    return Trainer(cfg, build_model(cfg), build_sampler(cfg), build_rewards(cfg), dataset, None, log=log,
                   sync_timing=sync_timing)


@dataclass
class PhaseRow:
    name: str
    count: int
    cpu_ms: float       # total host time inside the range (includes waiting on the device where it syncs)
    device_ms: float    # total device time attributed to the range (0 on CPU-only runs)

    def per_step(self, steps: int) -> tuple[float, float]:
        return self.cpu_ms / steps, self.device_ms / steps


def phase_rows(prof) -> list[PhaseRow]:
    """One row per phase range recorded by `prof` (a finished torch.profiler.profile), in PHASES order."""
    rows = {}
    for ev in prof.key_averages():
        if not ev.key.startswith(TORCH_PREFIX):
            continue
        name = ev.key[len(TORCH_PREFIX):]
        device_us = getattr(ev, "device_time_total", None)
        if device_us is None:
            device_us = getattr(ev, "cuda_time_total", 0.0)
        rows[name] = PhaseRow(name, ev.count, ev.cpu_time_total / 1e3, device_us / 1e3)
    return [rows[n] for n in PHASES if n in rows]


def machine() -> str:
    """The machine in words (for recorded results)."""
    import os

    dev = f"{torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} cores, {dev}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def phase_table_markdown(rows: list[PhaseRow], steps: int, step_ms: float) -> str:
    lines = ["| phase | calls/step | host ms/step | device ms/step | % of step (host) |", "|---|---|---|---|---|"]
    for r in rows:
        cpu, dev = r.per_step(steps)
        share = 100 * cpu / step_ms if step_ms > 0 else float("nan")
        lines.append(f"| `{r.name}` | {r.count / steps:g} | {cpu:.2f} | {dev:.2f} | {share:.1f} |")
    return "\n".join(lines)


@contextlib.contextmanager
def cuda_profiler_range(enabled: bool):
    """cudaProfilerStart/Stop around the block (Nsight's cudaProfilerApi capture range)."""
    if not enabled:
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    try:
        yield
    finally:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


def profile_run(trainer, *, steps: int, warmup: int, out_dir: str | Path, checkpoint: bool = True,
                evaluate: bool = False, torch_profiler: bool = True, nvtx_capture: bool = False) -> dict:
    """warmup unprofiled steps, then `steps` steps (plus one checkpoint / evaluation when asked) under
    torch.profiler. Writes out_dir/trace.json, phases.json and phases.md; returns the summary dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer.out = out / "run"
    trainer.out.mkdir(parents=True, exist_ok=True)
    for _ in range(warmup):
        trainer.train_step()
    cuda = trainer.device.startswith("cuda")
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    prof_ctx = torch.profiler.profile(activities=activities) if torch_profiler else contextlib.nullcontext()
    with cuda_profiler_range(nvtx_capture and cuda), prof_ctx as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        if checkpoint:
            trainer.save()
        if evaluate:
            trainer.evaluate()
    summary = {"machine": machine(), "device": trainer.device, "steps": steps, "warmup": warmup,
               "samples_per_step": trainer.rollout_batch, "wall_s": wall,
               "step_ms": 1e3 * wall / steps, "samples_per_s": trainer.rollout_batch * steps / wall,
               "cuda_graph": trainer.cfg.rollout.cuda_graph, "profiled": torch_profiler}
    if torch_profiler:
        prof.export_chrome_trace(str(out / "trace.json"))
        rows = phase_rows(prof)
        summary["phases"] = [r.__dict__ for r in rows]
        md = phase_table_markdown(rows, steps, summary["step_ms"])
        head = (f"Machine: {summary['machine']}. Device {trainer.device}, {steps} steps after {warmup} warm-up, "
                f"{trainer.rollout_batch} samples/step, {summary['step_ms']:.1f} ms/step under the profiler "
                f"({summary['samples_per_s']:.1f} samples/s).")
        (out / "phases.md").write_text(head + "\n\n" + md + "\n")
    (out / "phases.json").write_text(json.dumps(summary, indent=2))
    return summary
