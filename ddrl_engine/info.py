"""`python -m ddrl_engine.info [--selftest]`: what the extension was built with and what can run here;
--selftest also checks every op on each CUDA device against its CPU twin (ops.selftest)."""
from __future__ import annotations

import torch

from ddrl_engine._loader import build_info, cuda_ops_available

OPS = ("diffusion_loss_rows", "step_logprob_rows", "scale_rows", "fp8_attention_quantize", "fp8_attention_quantized")


def op_backends(name: str) -> list[str]:
    return [key for key in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(f"ddrl::{name}", key)]


def report() -> str:
    import ddrl_engine  # noqa: F401  (loads the extension)

    info = build_info()
    lines = ["ddrl-engine build:"]
    for key in ("torch_version", "torch_cuda_version", "with_cuda", "no_cuda_reason", "cuda_arch_list", "nvcc",
                "fp8_attention_kernel", "fp8_attention_kernel_reason"):
        if info.get(key) not in ("", None) or key == "with_cuda":
            lines.append(f"  {key:20s} {info.get(key)}")
    lines.append("runtime:")
    lines.append(f"  torch                {torch.__version__}")
    ok, why = cuda_ops_available()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    lines.append(f"  cuda device          {gpu}")
    lines.append(f"  cuda ops usable      {ok}{'' if ok else f' ({why})'}")
    from ddrl_engine.ops.selftest import ENV, ops_path

    lines.append(f"  ops path             {ops_path()} ({ENV}; 'reference' = plain PyTorch)")
    lines.append("ops (torch.ops.ddrl.*):")
    for name in OPS:
        lines.append(f"  {name:24s} {', '.join(op_backends(name)) or 'no kernels'}")
    from ddrl_engine.attention import available_backends

    # Per device the rollout could run on; on a machine without a GPU, fp8's CUDA line says why not.
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    lines.append("attention backends:")
    for dev in devices:
        for name, (usable, reason) in available_backends(dev).items():
            note = f" ({reason})" if reason else ""
            lines.append(f"  {name + ' on ' + dev:24s} {'yes' if usable else 'no'}{note}")
    if "cuda" not in devices:
        usable, reason = available_backends("cuda")["fp8"]
        lines.append(f"  {'fp8 on cuda':24s} {'yes' if usable else 'no'} ({reason})")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ddrl_engine.info", description=__doc__)
    ap.add_argument("--selftest", action="store_true",
                    help="run every op on each CUDA device against its CPU twin (exit 1 on a mismatch)")
    args = ap.parse_args(argv)
    print(report())
    if args.selftest:
        from ddrl_engine.ops.selftest import selftest_report

        ok, table = selftest_report()
        print(table)
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
