"""Attention backends: one function per backend, all with the same signature.

Every backend takes q, k, v of shape [B, H, S, D] (k and v may have another sequence length than q)
and an optional softmax scale, and returns [B, H, S_q, D]. The entry point in `__init__.py` checks the
arguments once, so backends can assume valid input.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor

from ddrl_engine.ops.fp8_attention import fp8_attention as _fp8_attention_op

AttentionFn = Callable[[Tensor, Tensor, Tensor, Optional[float]], Tensor]


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> Tensor:
    """PyTorch's fused scaled-dot-product attention; differentiable, any device and dtype."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def fp8_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> Tensor:
    """INT8 QK^T / FP8 PV attention for rollouts (ddrl_engine.ops.fp8_attention): forward only,
    D in {64, 128}. On CPU an exact emulation of the GPU scheme; on CUDA it needs sm_90 and the
    kernel built with CUTLASS, and says so otherwise (never a silent fall back to sdpa)."""
    return _fp8_attention_op(q, k, v, scale=scale)


BACKENDS: dict[str, AttentionFn] = {
    "sdpa": sdpa_attention,
    "fp8": fp8_attention,
}
