"""Tolerances in one place, by dtype of the stored values being compared.

Values the kernels reduce in fp32 are compared tightly whatever the input dtype (the inputs are the
same rounded numbers on both sides); gradients stored in a low-precision dtype carry its rounding.
"""
import torch

_STORED = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    # Gradients are rounded twice (the stored residual, then the scaled result): 2 ulp.
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}
_FP32_REDUCTION = dict(atol=1e-5, rtol=2e-5)


def tol(dtype: torch.dtype) -> dict:
    """Tolerance for a tensor stored in `dtype` (e.g. a gradient) vs a float64 reference."""
    return _STORED[dtype]


def reduction_tol() -> dict:
    """Tolerance for an fp32-accumulated reduction vs float64 over the same inputs."""
    return _FP32_REDUCTION
