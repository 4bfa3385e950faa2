"""Profile N DDRL training steps of a config under torch.profiler (CPU or CUDA).

    python profiling/harness.py                          # the default (tiny digits) config on CPU
    python profiling/harness.py --config run.toml --device cuda --steps 5 --out profiling/out/gpu
    python profiling/harness.py --device cuda --cuda-graph --no-torch-profiler --nvtx-capture  # under nsys

Writes OUT/trace.json (open in chrome://tracing or https://ui.perfetto.dev), OUT/phases.md and
OUT/phases.json (per-phase host and device time per step, from the `ddrl/<phase>` ranges; names in
profiling/README.md). The model is freshly initialised (profiling needs no pretrained base).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ddrl_engine.trainer.config import TrainConfig, load_config
from ddrl_engine.trainer.profiling import build_trainer, profile_run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a TOML run config (default: the built-in defaults)")
    ap.add_argument("--device", help="override run.device (cpu, cuda, cuda:N)")
    ap.add_argument("--steps", type=int, default=5, help="profiled training steps")
    ap.add_argument("--warmup", type=int, default=2, help="unprofiled steps first")
    ap.add_argument("--cuda-graph", action="store_true", help="set rollout.cuda_graph = true")
    ap.add_argument("--no-checkpoint", action="store_true", help="do not profile one checkpoint write")
    ap.add_argument("--no-torch-profiler", action="store_true",
                    help="only NVTX ranges (run under Nsight); no trace.json/phases.md")
    ap.add_argument("--nvtx-capture", action="store_true",
                    help="bracket the profiled steps with cudaProfilerStart/Stop (nsys --capture-range=cudaProfilerApi)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default="profiling/out/harness", help="output folder")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config) if args.config else TrainConfig()
    run = replace(cfg.run, progress=False, out_dir=str(Path(args.out) / "run"),
                  **({"device": args.device} if args.device else {}))
    cfg = replace(cfg, run=run, rollout=replace(cfg.rollout, cuda_graph=args.cuda_graph or cfg.rollout.cuda_graph))
    trainer = build_trainer(cfg)
    s = profile_run(trainer, steps=args.steps, warmup=args.warmup, out_dir=args.out,
                    checkpoint=not args.no_checkpoint, torch_profiler=not args.no_torch_profiler,
                    nvtx_capture=args.nvtx_capture)
    print(f"{s['machine']}: {s['step_ms']:.1f} ms/step, {s['samples_per_s']:.1f} samples/s ({args.out})")
    if s["profiled"]:
        print((Path(args.out) / "phases.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
