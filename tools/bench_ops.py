#!/usr/bin/env python3
"""Forward+backward benchmark of the fused ops against PyTorch eager and torch.compile, in one run.

For each op and implementation it prints milliseconds, achieved GB/s counting the minimum bytes
(each input read once, the one input gradient written once) and that as a percent of the machine's
copy bandwidth, measured in the same run (a device-to-device clone of the same total size), plus
the speedups of the engine over eager and compiled. --json writes the same rows machine-readably.

  python tools/bench_ops.py --device cpu --dtype fp32 --elems 8M
  python tools/bench_ops.py --device cuda --dtype bf16 --elems 64M
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import ddrl_engine  # noqa: F401
from ddrl_engine import ops
from ddrl_engine.ops.reference import diffusion_loss_eager, step_logprob_eager

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_count(s: str) -> int:
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(s[:-1]) * mult[s[-1].upper()]) if s[-1].upper() in mult else int(s)


def cpu_name() -> str:
    """The CPU model, the threads torch uses and ATen's CPU capability (what the CPU kernels run)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"


def _time_once(device: str, fn) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def timer(device: str, fns: dict, warmup: int, iters: int, spread: dict | None = None) -> dict:
    """Median milliseconds of each fn, run round-robin so machine noise hits every one alike; when
    given, `spread` receives each fn's (25th, 75th) percentile."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            times[name].append(_time_once(device, fn))
    if spread is not None:
        for name, t in times.items():
            q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
            spread[name] = (q[0], q[2])
    return {name: statistics.median(t) for name, t in times.items()}


def copy_bandwidth(device: str, nbytes: int, warmup: int, iters: int) -> float:
    """GB/s of a device copy into a preallocated buffer (read + write, nbytes moved in total): the
    practical ceiling. (Ops allocate their outputs; on CPU fresh allocations also cost page faults.)"""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = timer(device, {"copy": lambda: dst.copy_(src)}, warmup, iters)["copy"]
    return nbytes / ms / 1e6


def cases(rows: int, cols: int, dtype, device: str):
    """(name, engine fn, eager fn) taking no arguments, each running forward + backward."""
    shape = (rows, cols)
    mk = lambda: torch.randn(shape, dtype=dtype, device=device)  # noqa: E731
    pred, x0, noise = mk().requires_grad_(), mk(), mk()
    x_next, x, out = mk(), mk(), mk().requires_grad_()
    std = torch.rand(rows, device=device) + 0.5

    def run(fn, leaf, *args, **kw):
        def go():
            leaf.grad = None
            fn(*args, **kw).mean().backward()
        return go

    dl_kw = dict(noise_coef=1.0, data_coef=-1.0)
    lp_kw = dict(x_coef=0.98, out_coef=-0.05, std=std)
    return [
        ("diffusion_loss", pred, (pred, x0, noise), dl_kw, ops.diffusion_loss, diffusion_loss_eager, run),
        ("step_logprob", out, (x_next, x, out), lp_kw, ops.step_logprob, step_logprob_eager, run),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--elems", default="8M", help="elements per tensor, e.g. 8M, 64M")
    ap.add_argument("--rows", type=int, default=8, help="rows (samples x steps) the elements are split into")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--json", help="write the result rows to this file")
    args = ap.parse_args()

    dtype, device = DTYPES[args.dtype], args.device
    cols = parse_count(args.elems) // args.rows
    elems = cols * args.rows
    min_bytes = 4 * elems * dtype.itemsize  # 3 inputs read + 1 gradient written
    ceiling = copy_bandwidth(device, min_bytes, args.warmup, args.iters)
    machine = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    print(f"# bench_ops: {device} ({machine}), {args.dtype}, {args.rows} x {cols} = {elems / 2**20:.1f}M elements, "
          f"forward+backward, torch {torch.__version__}")
    print(f"# copy ceiling measured here: {ceiling:.1f} GB/s (copy_ of {min_bytes / 2**20:.0f} MiB in total)"
          + ("; a lent H200's device copy was seen at ~4300 GB/s" if device == "cuda" else ""))
    print(f"{'op':16s} {'impl':10s} {'ms':>9s} {'p25-p75 ms':>17s} {'GB/s':>9s} {'%copy':>7s} {'engine x':>9s}")
    rows = []
    for name, leaf, inputs, kw, engine, eager, run in cases(args.rows, cols, dtype, device):
        impls = {"engine": engine, "eager": eager}
        if not args.no_compile:
            impls["compile"] = torch.compile(eager)
        spread = {}
        times = timer(device, {impl: run(fn, leaf, *inputs, **kw) for impl, fn in impls.items()}, args.warmup, args.iters,
                      spread)
        for impl, ms in times.items():
            gbs = min_bytes / ms / 1e6
            speed = times[impl] / times["engine"]
            row = dict(op=name, impl=impl, ms=ms, ms_p25=spread[impl][0], ms_p75=spread[impl][1], gbs=gbs, pct_copy=100 * gbs / ceiling, engine_speedup=speed,
                       device=device, machine=machine, dtype=args.dtype, elems=elems, rows=args.rows)
            rows.append(row)
            lo, hi = spread[impl]
            print(f"{name:16s} {impl:10s} {ms:9.3f} {lo:8.2f}-{hi:<8.2f} {gbs:9.1f} {row['pct_copy']:6.1f}% {speed:8.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(ceiling_gbs=ceiling, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
