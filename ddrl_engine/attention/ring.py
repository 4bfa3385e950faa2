"""Ring attention over a token-sharded sequence, through PyTorch's own context-parallel ring.

The alternative to Ulysses (`context_parallel.ulysses_attention`) for `[distributed]
context_parallel_attention = "ring"`: each rank keeps its queries [B, H, S/N, D] and the key / value
blocks travel round the cp group (N - 1 rotations, each overlapping one block of attention), the
partial outputs merged by their log-sum-exp. No head exchange, so the heads need not be divisible by
N, and no rank ever holds more than two K/V blocks; the price is N small attentions instead of one
large one per rank, and the rotations' volume (below). Only softmax attention without a mask.

The ring itself (the schedule, the rotation by `permute_tensor`, the merge and the backward ring of
K/V gradients) is torch's `_templated_ring_attention` / `_templated_ring_attention_backward`
(torch.distributed.tensor.experimental._context_parallel), the functions behind
`torch.distributed.tensor.experimental.context_parallel`. That public API cannot serve here: it
replaces F.scaled_dot_product_attention with a DTensor handler for the CUDA SDPA kernels only (on CPU
it falls through and returns wrong values; docs/distributed.md), whereas this module calls the ring
with the per-block op of the device: on CPU aten's flash attention for CPU, on CUDA the kernels
torch's handler uses (flash for bf16 / fp16, memory-efficient for fp32; never run here: no GPU). torch's options are set
for the call only: no load balancing (it needs causal masks), the K/V rotation by all-to-all (the ring;
torch's default all-gathers them, N times the memory) and fp32 merging (float64 inputs accumulate in
float64).

Communication per attention and rank, a = S/N x heads x head_dim elements (one block of k or v):
forward (N - 1) x 2a (K and V); backward (N - 1) x 2a again plus N x 2a of fp32 K/V gradients.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ddrl_engine.profiling import phase

__all__ = ["RING_ATTENTION_ERROR", "ring_attention"]

RING_ATTENTION_ERROR = ("distributed.context_parallel_attention = 'ring' serves only self-attention without text "
                        "tokens and the 'sdpa' backend")

_SEQ_DIM = 2  # q, k, v are [B, H, S, D]


def _ring():
    from torch.distributed.tensor.experimental._context_parallel import _attention

    return _attention


@contextlib.contextmanager
def _ring_options(dtype: torch.dtype):
    """torch's global ring options for the duration of one call (restored after)."""
    ring = _ring()
    o = ring._cp_options
    saved = (o.enable_load_balance, o.rotate_method, o.convert_to_f32)
    o.enable_load_balance, o.rotate_method = False, ring._RotateMethod.ALL_TO_ALL
    o.convert_to_f32 = dtype != torch.float64
    try:
        yield ring
    finally:
        o.enable_load_balance, o.rotate_method, o.convert_to_f32 = saved


@dataclass(frozen=True)
class _BlockOps:
    """One block's attention op on a device, as torch's ring calls it: the forward (returns out, lse,
    *rest), its keyword arguments, the backward, its name for the output gradient, its keyword
    arguments, and `extras(rest)`: the forward's extra outputs the backward takes."""

    forward: object
    forward_kw: dict
    backward: object
    grad_name: str
    backward_kw: dict
    extras: Callable[[tuple], dict]


def _block_ops(q: Tensor) -> _BlockOps:
    """The per-block op for q's device and dtype: on CUDA the ones torch's own ring handler uses (flash
    for half types; memory-efficient for float32, whose log-sum-exp is padded to 32 rows, so the rows
    per rank must be a multiple of 32), on CPU aten's flash attention for CPU."""
    aten = torch.ops.aten
    if q.device.type == "cpu":
        return _BlockOps(aten._scaled_dot_product_flash_attention_for_cpu, {"dropout_p": 0.0},
                         aten._scaled_dot_product_flash_attention_for_cpu_backward.default, "grad_out",
                         {"dropout_p": 0.0}, lambda rest: {})
    if q.device.type != "cuda":
        raise ValueError(f"ring attention: no block attention op for device type {q.device.type!r} (cpu and cuda only)")
    if q.dtype in (torch.float16, torch.bfloat16):
        names = ("cum_seq_q", "cum_seq_k", "max_q", "max_k", "philox_seed", "philox_offset")
        return _BlockOps(aten._scaled_dot_product_flash_attention, {"dropout_p": 0.0, "return_debug_mask": False},
                         aten._scaled_dot_product_flash_attention_backward.default, "grad_out", {"dropout_p": 0.0},
                         lambda rest: dict(zip(names, rest)))
    if q.shape[_SEQ_DIM] % 32:
        raise ValueError(f"ring attention in {q.dtype} on CUDA runs the memory-efficient kernel, which needs the tokens "
                         f"per rank ({q.shape[_SEQ_DIM]}) to be a multiple of 32; train in bf16 or use "
                         "distributed.context_parallel_attention = 'ulysses'")
    return _BlockOps(aten._scaled_dot_product_efficient_attention,
                     {"attn_bias": None, "compute_log_sumexp": True, "dropout_p": 0.0},
                     aten._scaled_dot_product_efficient_attention_backward.default, "grad_out_",
                     {"attn_bias": None, "dropout_p": 0.0, "grad_input_mask": (True, True, True, False)},
                     lambda rest: {"philox_seed": rest[0], "philox_offset": rest[1]})


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, group, scale):
        ops = _block_ops(q)
        with _ring_options(q.dtype) as ring, phase("cp/ring"):
            out, lse, *rest = ring._templated_ring_attention(group, _SEQ_DIM, ops.forward, q, k, v, is_causal=False,
                                                             scale=scale, **ops.forward_kw)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale, ctx.ops, ctx.extras = group, scale, ops, ops.extras(tuple(rest))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        ops = ctx.ops
        with _ring_options(q.dtype) as ring, phase("cp/ring"):
            dq, dk, dv, *_ = ring._templated_ring_attention_backward(
                ctx.group, _SEQ_DIM, ops.backward, grad_out=grad.contiguous(), grad_out_name=ops.grad_name, query=q,
                key=k, value=v, out=out, logsumexp=lse, is_causal=False, scale=ctx.scale, **ops.backward_kw,
                **ctx.extras)
        return dq, dk, dv, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group, scale: float | None = None) -> Tensor:
    """Softmax attention of this rank's queries q [B, H, S/N, D] over the whole sequence, whose keys
    and values k, v [B, H, S/N, D] are sharded by token over the N ranks of `group` in rank order;
    returns this rank's output [B, H, S/N, D]. scale: None means 1/sqrt(D). Differentiable (the
    backward is the ring of K/V gradients)."""
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"ring attention needs q, k, v of one shape [B, H, S/N, D] (self-attention over equally "
                         f"sharded tokens), got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"ring attention needs q, k, v of one dtype and device, got q {q.dtype} on {q.device}, "
                         f"k {k.dtype} on {k.device}, v {v.dtype} on {v.device}")
    return _RingAttention.apply(q, k, v, group, scale)
