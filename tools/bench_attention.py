#!/usr/bin/env python3
"""Non-causal attention forward: the engine's fp8 attention against torch SDPA bf16 (flash and
cuDNN backends), in one run.

TFLOP/s = 4 * B * H * S^2 * D / time. The fp8 rows time the quantisation pre-pass and the attention
separately and report the total (pre-pass included) as the figure to compare. --json writes the rows.
Each row also shows its share of a ceiling (--bf16-peak, --fp8-peak): the H200 ceilings the project
works to, ~790 TFLOP/s bf16 (a practical matmul ceiling; the spec sheet's dense bf16 is ~989) and ~1979
fp8 dense (spec); quoted, not measured by this project.

  python tools/bench_attention.py --seqs 4096,16384 --dims 128
  python tools/bench_attention.py --seqs 4096,16384,32768,75600 --dims 128,64 --json out.json
"""
from __future__ import annotations

import argparse
import json
import time
import statistics

import torch
import torch.nn.functional as F

import ddrl_engine  # noqa: F401
from ddrl_engine.ops.fp8_attention import fp8_attention_quantize, fp8_attention_quantized, fp8_cuda_status


def timer(fn, warmup: int, iters: int, budget_ms: float) -> float:
    """Median milliseconds of fn() (CUDA events); fewer iterations when a call is slow."""
    for _ in range(warmup):
        fn()
    times = []
    torch.cuda.synchronize()
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if sum(times) > budget_ms:
            break
    return statistics.median(times)


def host_us(fn, calls: int = 50) -> float:
    """Host microseconds per call of fn(): the CPU time until the call returns, the GPU work only
    enqueued (a few small shapes' worth, so the launch queue never fills and blocks the host)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) * 1e6 / calls
    torch.cuda.synchronize()
    return host


def sdpa_with(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def bench_shape(B, H, S, D, args) -> list[dict]:
    from torch.nn.attention import SDPBackend

    flops = 4 * B * H * S * S * D
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    rows = []

    def add(name, ms, **extra):
        row = dict(impl=name, B=B, H=H, S=S, D=D, ms=ms, tflops=None if ms is None else flops / ms / 1e9, **extra)
        rows.append(row)
        return row

    for name, backend in (("sdpa_flash_bf16", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn_bf16", SDPBackend.CUDNN_ATTENTION)):
        fn = sdpa_with(backend)
        try:
            add(name, timer(lambda: fn(q, k, v), args.warmup, args.iters, args.budget_ms))
        except RuntimeError as e:
            add(name, None, error=str(e).splitlines()[0][:200])
    ok, why = fp8_cuda_status()
    if not ok:
        add("ddrl_fp8", None, error=why)
        return rows
    try:  # a failure here is a row, not the end of the run (the other shapes still get measured)
        qkv = fp8_attention_quantize(q, k, v)
        t_quant = timer(lambda: fp8_attention_quantize(q, k, v), args.warmup, args.iters, args.budget_ms)
        t_attn = timer(lambda: fp8_attention_quantized(qkv, S, S, q.dtype), args.warmup, args.iters, args.budget_ms)
        out = fp8_attention_quantized(qkv, S, S, q.dtype)
        with torch.no_grad():  # accuracy vs fp32 SDPA on the first head (cheap, same inputs)
            ref = F.scaled_dot_product_attention(q[:1, :1].float(), k[:1, :1].float(), v[:1, :1].float())
            err = ((out[:1, :1].float() - ref).norm() / ref.norm()).item()
    except RuntimeError as e:
        add("ddrl_fp8", None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return rows
    # Host cost of one whole call at a small shape (same B*H, S = 256): what a call costs the CPU
    # when the GPU work is short (issue 16 item 2: one launch pair, no per-call lookups).
    qs, ks, vs = (x[:, :, :256].contiguous() for x in (q, k, v))
    t_host = host_us(lambda: fp8_attention_quantized(fp8_attention_quantize(qs, ks, vs), 256, 256, q.dtype))
    add("ddrl_fp8 (quant+attn)", t_quant + t_attn, quant_ms=t_quant, attn_ms=t_attn, host_us_per_call=t_host,
        attn_only_tflops=flops / t_attn / 1e9, rel_l2_vs_fp32_head0=err)
    del qkv, out
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="4096,16384,32768,75600", help="comma-separated sequence lengths S")
    p.add_argument("--dims", default="128,64", help="comma-separated head dims D")
    p.add_argument("--tokens-per-batch", type=int, default=32768 * 24,
                   help="B*H*S is kept near this (B=1, H = max(1, this // S)) so each shape is a similar amount of work per token")
    p.add_argument("--heads", type=int, default=None, help="fixed H (overrides --tokens-per-batch)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--budget-ms", type=float, default=3000.0, help="stop timing a shape after this much")
    p.add_argument("--bf16-peak", type=float, default=790.0, help="TFLOP/s the bf16 rows are compared to")
    p.add_argument("--fp8-peak", type=float, default=1979.0, help="TFLOP/s the fp8 rows are compared to")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention: needs a CUDA GPU (the CPU emulation is a correctness tool, not a benchmark)")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}; % of peak: bf16 rows vs "
          f"{args.bf16_peak:.0f} TFLOP/s, fp8 rows vs {args.fp8_peak:.0f}")
    rows = []
    for D in (int(d) for d in args.dims.split(",")):
        for S in (int(s) for s in args.seqs.split(",")):
            H = args.heads or max(1, args.tokens_per_batch // S)
            shape_rows = bench_shape(1, H, S, D, args)
            best_bf16 = max((r["tflops"] or 0) for r in shape_rows if "bf16" in r["impl"])
            for r in shape_rows:
                if r["tflops"] is None:
                    print(f"D={D:4d} S={S:6d} H={H:3d} {r['impl']:24s} n/a ({r.get('error')})")
                    continue
                extra = ""
                r["pct_peak"] = 100 * r["tflops"] / (args.bf16_peak if "bf16" in r["impl"] else args.fp8_peak)
                if "quant_ms" in r:
                    r["speedup_vs_best_bf16"] = r["tflops"] / best_bf16 if best_bf16 else None
                    extra = (f"  [quant {r['quant_ms']:.2f} ms + attn {r['attn_ms']:.2f} ms = {r['attn_only_tflops']:.0f} TFLOP/s attn only;"
                             f" x{r['speedup_vs_best_bf16'] or 0:.2f} vs best bf16; rel L2 {r['rel_l2_vs_fp32_head0']:.4f};"
                             f" host {r['host_us_per_call']:.0f} us/call]")
                print(f"D={D:4d} S={S:6d} H={H:3d} {r['impl']:24s} {r['ms']:9.2f} ms {r['tflops']:7.1f} TFLOP/s "
                      f"({r['pct_peak']:4.1f}% of peak){extra}")
            rows += shape_rows
            torch.cuda.empty_cache()
            if args.json:  # after every shape: a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                   bf16_peak=args.bf16_peak, fp8_peak=args.fp8_peak, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
