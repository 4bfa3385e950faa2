"""Context parallelism (Ulysses): one sample's token sequence split across the N ranks of a cp group.

Each rank of a cp group holds a contiguous slice of every sample's tokens ([B, S/N, D]); attention
needs whole sequences, so `ulysses_attention` exchanges sequence for heads with one all-to-all per
q, k, v ([B, H, S/N, Dh] -> [B, H/N, S, Dh]), runs the chosen backend (sdpa, fp8: any of them, since
each sees whole sequences for H/N heads) and exchanges back with one more all-to-all. Requires H and
S divisible by N (checked, with errors naming them).

`split_sequence` / `gather_sequence` cut a rank's slice out of a replicated token tensor and put the
slices back together. Both are autograd-correct for a loss that every rank of the group computes
identically from the gathered output (the scheme the trainer uses): the gather's backward sums the
group's (equal) output gradients and keeps this rank's slice, so each rank's parameter gradients are N
times the part its tokens contribute, and averaging them over all ranks (DDP / FSDP2) gives the
one-process gradient exactly when N is a power of two.

Communication is torch.distributed's own (`torch.distributed.nn.functional`: all_to_all_single and
all_gather with autograd; NCCL on CUDA, gloo on CPU). Every exchange runs inside an NVTX range of its
own ("cp/all_to_all", "cp/all_gather"; `ddrl_engine.profiling.phase`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.nn import functional as dist_fn

from ddrl_engine.profiling import phase

__all__ = ["check_context_parallel", "gather_sequence", "split_sequence", "ulysses_attention"]


def _size_rank(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def check_context_parallel(heads: int, tokens: int, size: int, where: str = "model") -> None:
    """Raises a ValueError naming the cause unless `heads` and `tokens` can be split over `size` ranks."""
    if size < 1:
        raise ValueError(f"distributed.context_parallel must be >= 1, got {size}")
    if heads % size:
        raise ValueError(f"distributed.context_parallel = {size}: the {where}'s attention heads ({heads}) must be "
                         f"divisible by it (Ulysses all-to-all gives each rank heads / {size} whole-sequence heads)")
    if tokens < size:
        raise ValueError(f"distributed.context_parallel = {size}: the {where}'s sequence ({tokens} tokens) is shorter "
                         f"than the cp group ({size} ranks); lower context_parallel or use a larger sample")
    if tokens % size:
        raise ValueError(f"distributed.context_parallel = {size}: the {where}'s sequence ({tokens} tokens) must be "
                         f"divisible by it (each rank holds tokens / {size} of every sample)")


def split_sequence(x: Tensor, group, dim: int = 1) -> Tensor:
    """This rank's contiguous slice of `x` (replicated over `group`) along `dim`. Its backward is the
    plain slice's (the gradient of the other slices is zero on this rank)."""
    size, rank = _size_rank(group)
    if x.shape[dim] % size:
        raise ValueError(f"split_sequence: dim {dim} of {tuple(x.shape)} is not divisible by the cp group size {size}")
    n = x.shape[dim] // size
    return x.narrow(dim, rank * n, n)


def gather_sequence(x: Tensor, group, dim: int = 1) -> Tensor:
    """The group's slices of `x` concatenated along `dim` in rank order (the whole sequence on every
    rank). Backward: the sum of the group's output gradients, this rank's slice (a reduce-scatter)."""
    with phase("cp/all_gather"):
        parts = dist_fn.all_gather(x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _all_to_all(x: Tensor, group) -> Tensor:
    """all_to_all_single along dim 0 (chunk i goes to rank i, chunk i of the output came from rank i)."""
    x = x.contiguous()
    out = torch.empty_like(x)  # contiguous, as x now is (empty_like keeps a view's strides)
    return dist_fn.all_to_all_single(out, x, group=group)


def seq_to_heads(x: Tensor, group) -> Tensor:
    """[B, H, S/N, D] (this rank's tokens, all heads) -> [B, H/N, S, D] (all tokens, this rank's heads)."""
    n, _ = _size_rank(group)
    b, h, s, d = x.shape
    chunks = x.reshape(b, n, h // n, s, d).transpose(0, 1)  # [N(dest rank: head chunk), B, H/N, S/N, D]
    got = _all_to_all(chunks, group)  # [N(source rank: token chunk), B, H/N, S/N, D]
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * s, d)


def heads_to_seq(x: Tensor, group) -> Tensor:
    """Inverse of `seq_to_heads`: [B, H/N, S, D] -> [B, H, S/N, D]."""
    n, _ = _size_rank(group)
    b, hn, s, d = x.shape
    chunks = x.reshape(b, hn, n, s // n, d).permute(2, 0, 1, 3, 4)  # [N(dest rank: token chunk), B, H/N, S/N, D]
    got = _all_to_all(chunks, group)  # [N(source rank: head chunk), B, H/N, S/N, D]
    return got.transpose(0, 1).reshape(b, hn * n, s // n, d)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, group, attend) -> Tensor:
    """Attention over the whole sequence of q, k, v [B, H, S/N, D] sharded by token over `group`:
    `attend(q, k, v)` (a backend) runs on [B, H/N, S, D]; returns this rank's tokens [B, H, S/N, D]."""
    n, _ = _size_rank(group)
    if q.shape[1] % n:
        raise ValueError(f"distributed.context_parallel = {n}: the attention heads ({q.shape[1]}) must be divisible "
                         "by it (Ulysses all-to-all)")
    with phase("cp/all_to_all"):
        q, k, v = (seq_to_heads(t, group) for t in (q, k, v))
    out = attend(q, k, v)
    with phase("cp/all_to_all"):
        return heads_to_seq(out, group)
