"""ddrl::scale_rows: out[i] = src[i] * scale[i] in fp32, stored in a chosen dtype.

It is the whole backward pass of the fused ops: their forward already wrote the per-element
gradient, so backward reads it once and writes each input's gradient once.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ddrl_engine import _loader

_loader.load_extension()


@torch.library.register_fake("ddrl::scale_rows")
def _(src: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    torch._check(scale.dim() == 1 and scale.shape[0] == src.shape[0], lambda: "ddrl.scale_rows: 'scale' must have one value per row")
    return torch.empty(src.shape, dtype=dtype, device=src.device)


def scale_rows(src: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.ops.ddrl.scale_rows.default(src, scale, dtype)
