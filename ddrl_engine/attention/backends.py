"""Attention backends: one function per backend, all with the same signature.

Every backend takes q, k, v of shape [B, H, S, D] (k and v may have another sequence length than q)
and an optional softmax scale, and returns [B, H, S_q, D]. The entry point in `__init__.py` checks the
arguments once, so backends can assume valid input.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor

AttentionFn = Callable[[Tensor, Tensor, Tensor, Optional[float]], Tensor]


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> Tensor:
    """PyTorch's fused scaled-dot-product attention; differentiable, any device and dtype."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def fp8_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> Tensor:
    # A known name, so configs can already say backend="fp8"; it fails loudly rather than quietly
    # running sdpa, which would make benchmarks and numerics lie about what ran.
    raise NotImplementedError("fp8 attention backend is not built yet (issue 4); use backend='sdpa'")


BACKENDS: dict[str, AttentionFn] = {
    "sdpa": sdpa_attention,
    "fp8": fp8_attention,
}
