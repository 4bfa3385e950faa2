"""Python-side argument handling shared by the row ops: coefficients, grad flags, reductions."""
from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

Coef = Union[float, int, Tensor]
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(op: str, name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: '{name}' must be float32, bfloat16 or float16, got {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"{op}: '{name}' must have at least 1 dimension (rows first), got a 0-d tensor")
    return t


def row_coef(op: str, name: str, value: Coef, rows: int, device: torch.device, *, positive: bool = False) -> Tensor:
    """A per-row coefficient as the float32 [rows] tensor the kernels take.

    A Python number becomes a filled tensor (a fill kernel on the device: no host sync, so this is
    safe inside a captured CUDA graph); a 0-dim tensor is broadcast (a stride-0 view); any other
    tensor must be 1-D with one value per row.
    """
    if isinstance(value, bool):
        raise TypeError(f"{op}: '{name}' must be a float or a 1-D float tensor, got bool")
    if isinstance(value, (float, int)):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{op}: '{name}' must be finite, got {value}")
        if positive and value <= 0:
            raise ValueError(f"{op}: '{name}' must be > 0, got {value}")
        return torch.full((rows,), value, dtype=torch.float32, device=device)
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: '{name}' must be a float or a 1-D float tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{op}: '{name}' must be a floating tensor, got {value.dtype}")
    if value.dim() == 0:  # one value for every row (e.g. one sampler level for the batch)
        value = value.expand(rows)
    if value.dim() != 1 or value.shape[0] != rows:
        raise ValueError(f"{op}: '{name}' must have shape [{rows}] (one value per row), got {list(value.shape)}")
    if value.device != device:
        raise ValueError(f"{op}: '{name}' is on {value.device} but the inputs are on {device}")
    # Coefficients are constants of the op: gradients never flow into them.
    return value.detach().to(torch.float32)


def check_same_rows(op: str, named: dict[str, Tensor]) -> None:
    items = list(named.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.shape != first.shape:
            raise ValueError(f"{op}: '{name}' has shape {list(t.shape)} but '{first_name}' has shape {list(first.shape)}; they must match")
        if t.device != first.device:
            raise ValueError(f"{op}: '{name}' is on {t.device} but '{first_name}' is on {first.device}; all tensors must share a device")


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def common_dtype(*tensors) -> torch.dtype:
    dtype = None
    for t in tensors:
        if t is not None:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype
