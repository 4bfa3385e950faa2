"""A safety net for kernels that have never run where the user runs them.

- First contact: the first time any engine op runs on a CUDA device, every op is run once there on
  small inputs and compared with its CPU twin (the same math, tested against float64) within the
  tolerances the tests use; a mismatch raises `OpSelfTestError` naming the op, the device and the
  error, then and on every later call (never a silent wrong result). Skipped (and retried on the next
  eager call) while a CUDA graph is being captured or torch.compile traces, since neither may copy to
  the host.
- A way out: `DDRL_ENGINE_OPS=reference` (read at import; `set_ops_path` in code) makes every op run
  as plain PyTorch (`ops.reference`'s fp32 eager forms, sdpa for fp8 attention), so a user hit by a
  kernel bug keeps training; `ops_path()` says which path runs and the trainer logs `ops_reference`.
- On demand: `python -m ddrl_engine.info --selftest` runs the same checks on every visible device.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

ENV = "DDRL_ENGINE_OPS"
PATHS = ("fused", "reference")


class OpSelfTestError(RuntimeError):
    """An engine op disagrees with its CPU twin on a device (see the module docstring)."""


def _path_from_env() -> str:
    value = os.environ.get(ENV, "fused").strip().lower() or "fused"
    if value not in PATHS:
        raise ValueError(f"environment variable {ENV}={os.environ.get(ENV)!r}: must be one of {PATHS}")
    return value


_PATH = _path_from_env()


def ops_path() -> str:
    """"fused" (the extension's kernels) or "reference" (plain PyTorch)."""
    return _PATH


def set_ops_path(path: str) -> None:
    """Selects the ops' path for this process (what DDRL_ENGINE_OPS sets at import)."""
    global _PATH
    if path not in PATHS:
        raise ValueError(f"set_ops_path: path must be one of {PATHS}, got {path!r}")
    _PATH = path


def use_reference() -> bool:
    return _PATH == "reference"


@dataclass(frozen=True)
class CheckResult:
    """One op's comparison on one device: ok, the largest error over its outputs, and what was compared."""

    op: str
    device: str
    ok: bool
    max_abs_err: float
    detail: str


_CHECKED: dict[str, list[CheckResult]] = {}  # device -> results (the first-contact checks ran)
_RUNNING: set[str] = set()


def _inputs(shape, dtype, gen):
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(3)]


def _compare(op: str, device: str, pairs, atol: float, rtol: float) -> CheckResult:
    worst, bad = 0.0, []
    for label, got, want in pairs:
        got, want = got.detach().double().cpu(), want.detach().double().cpu()
        if got.shape != want.shape:
            bad.append(f"{label}: shape {list(got.shape)} vs {list(want.shape)} on CPU")
            continue
        err = (got - want).abs()
        finite = torch.isfinite(got) == torch.isfinite(want)
        over = err > atol + rtol * want.abs()
        worst = max(worst, float(err[torch.isfinite(err)].max()) if err.numel() and torch.isfinite(err).any() else 0.0)
        if not finite.all() or over.any():
            bad.append(f"{label}: max |error| {float(err.nan_to_num(math.inf).max()):.3g} "
                       f"(tolerance {atol:g} + {rtol:g} |cpu|), {int((over | ~finite).sum())} of {err.numel()} values off")
    return CheckResult(op, device, not bad, worst, "; ".join(bad) or f"{len(pairs)} output(s) within tolerance")


def _row_op_checks(device: torch.device) -> list[CheckResult]:
    from ddrl_engine.ops.diffusion_loss import diffusion_loss
    from ddrl_engine.ops.step_logprob import step_logprob

    results = []
    gen = torch.Generator().manual_seed(20261201)
    for dtype, (atol, rtol) in ((torch.float32, (1e-5, 2e-5)), (torch.bfloat16, (1e-2, 1.6e-2))):
        for shape in ((3, 7), (5, 8193)):
            a, b, c = _inputs(shape, dtype, gen)
            coef = torch.rand(shape[0], generator=gen) + 0.5
            outs = []  # [on the device, on the CPU]
            for dev in (device, torch.device("cpu")):
                p = a.to(dev).requires_grad_()
                loss = diffusion_loss(p, b.to(dev), c.to(dev), noise_coef=coef.to(dev), data_coef=-coef.to(dev),
                                      reduction="none")
                loss.sum().backward()
                x = a.to(dev).requires_grad_()
                lp = step_logprob(c.to(dev), x, b.to(dev), x_coef=coef.to(dev), out_coef=0.3, std=coef.to(dev) * 0.1)
                lp.sum().backward()
                outs.append((loss, p.grad, lp, x.grad))
            g, w = outs
            tag = f"{str(dtype).removeprefix('torch.')} {list(shape)}"
            results.append(_compare("diffusion_loss", str(device), [(f"loss {tag}", g[0], w[0]),
                                                                    (f"grad {tag}", g[1], w[1])], atol, rtol))
            results.append(_compare("step_logprob", str(device), [(f"log-prob {tag}", g[2], w[2]),
                                                                  (f"grad {tag}", g[3], w[3])], atol, rtol))
    return results


def _fp8_checks(device: torch.device) -> list[CheckResult]:
    from ddrl_engine.ops.fp8_attention import fp8_attention, fp8_cuda_status

    usable, why = fp8_cuda_status() if device.type == "cuda" else (True, "")
    if not usable:
        return [CheckResult("fp8_attention", str(device), True, 0.0, f"not checked: {why}")]
    gen = torch.Generator().manual_seed(7)
    out = []
    for d, sq, sk in ((64, 129, 129), (128, 1, 1025)):
        q, k, v = (torch.randn(1, 2, s, d, generator=gen).bfloat16() for s in (sq, sk, sk))
        got = fp8_attention(q.to(device), k.to(device), v.to(device))
        want = fp8_attention(q, k, v)
        # Same quantised inputs; the tensor cores sum in another order: the tests' 2e-3 relative L2.
        rel = float((got.double().cpu() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
        out.append(CheckResult("fp8_attention", str(device), rel < 2e-3, rel,
                               f"relative L2 {rel:.3g} vs the CPU emulation (D={d}, Sq={sq}, Sk={sk}; tolerance 2e-3)"))
    return out


def check_device(device) -> list[CheckResult]:
    """Runs every op on `device` and on the CPU and compares them (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _row_op_checks(device) + _fp8_checks(device)


def _failure_message(results: list[CheckResult]) -> str:
    bad = [r for r in results if not r.ok]
    lines = [f"  {r.op} on {r.device}: {r.detail}" for r in bad]
    return ("ddrl-engine's fused ops disagree with their CPU twins on this device (first-contact check):\n"
            + "\n".join(lines) + f"\nSet {ENV}=reference to train on the plain PyTorch path meanwhile, and "
            "please report this with `python -m ddrl_engine.info --selftest`.")


def ensure_checked(device: torch.device) -> None:
    """The first-contact check of `device` (a no-op on the CPU and after the first call per device)."""
    if device.type != "cuda":
        return
    key = str(device if device.index is not None else torch.device("cuda", torch.cuda.current_device()))
    results = _CHECKED.get(key)
    if results is None:
        if key in _RUNNING or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
            return  # the check's own op calls, or a context that cannot copy to the host: next eager call
        _RUNNING.add(key)
        try:
            with torch.inference_mode(False), torch.enable_grad():  # the checks take gradients
                results = check_device(torch.device(key))
        finally:
            _RUNNING.discard(key)
        _CHECKED[key] = results
    if not all(r.ok for r in results):
        raise OpSelfTestError(_failure_message(results))


def selftest_report() -> tuple[bool, str]:
    """(all ok, a table) for every CUDA device here; the CPU twin is the reference, so on a machine
    without CUDA there is nothing to compare and it says so."""
    if not torch.cuda.is_available():
        return True, "selftest: no CUDA device visible; the CPU ops are the reference (tested against float64)"
    lines, ok = [f"{'op':16s} {'device':8s} {'ok':4s} {'max err':>9s}  detail"], True
    for i in range(torch.cuda.device_count()):
        for r in check_device(torch.device("cuda", i)):
            ok &= r.ok
            lines.append(f"{r.op:16s} {r.device:8s} {'yes' if r.ok else 'NO':4s} {r.max_abs_err:9.2e}  {r.detail}")
    return ok, "\n".join(lines)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The reference path of fp8 attention: exact attention (sdpa) in q's dtype."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
