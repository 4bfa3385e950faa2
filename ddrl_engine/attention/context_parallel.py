"""Context parallelism (Ulysses): one sample's token sequence split across the N ranks of a cp group.

Each rank of a cp group holds a contiguous slice of every sample's tokens ([B, S/N, D]); attention
needs whole sequences, so `ulysses_attention` exchanges sequence for heads with one all-to-all per
q, k, v ([B, H, S/N, Dh] -> [B, H/N, S, Dh]), runs the chosen backend (sdpa, fp8: any of them, since
each sees whole sequences for H/N heads) and exchanges back with one more all-to-all. Requires H and
S divisible by N (checked, with errors naming them). The alternative that needs no head condition,
torch's ring (keys and values travel round the group), is `attention.ring`
(`distributed.context_parallel_attention = "ring"`).

Joint attention (SD3, FLUX: text tokens attended together with the image tokens): only the image
tokens are sharded; the text tokens are replicated on every rank. `ulysses_attention(...,
text_tokens=L)` exchanges the image part as above and joins it with this rank's H/N heads of the
text (no communication), so each rank attends over text + whole image for its heads; the image output
goes back by all-to-all and the text output's heads are all-gathered (the text is whole on every rank
again, as the next block needs it).

`split_sequence` / `gather_sequence` cut a rank's slice out of a replicated token tensor and put the
slices back together. Both are autograd-correct for a loss that every rank of the group computes
identically from the gathered output (the scheme the trainer uses): the gather's backward sums the
group's (equal) output gradients and keeps this rank's slice, so each rank's parameter gradients are N
times the part its tokens contribute, and averaging them over all ranks (DDP / FSDP2) gives the
one-process gradient exactly when N is a power of two.

Communication is torch.distributed's own, with autograd: the functional collectives `all_to_all_single`
(backward: the reverse all-to-all) and `all_gather_single` (backward: a reduce-scatter); NCCL on CUDA,
gloo on CPU. (`torch.distributed.nn.functional.all_to_all_single` is deprecated in torch 2.14.) (`torch.distributed.nn.functional.all_gather` is not used: on gloo its backward addresses the
group's ranks as global ranks, which fails in every cp group but the first, e.g. ranks 2-3 of 2 x 2.)
Every exchange runs inside an NVTX range of its own ("cp/all_to_all", "cp/all_gather";
`ddrl_engine.profiling.phase`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import _functional_collectives as funcol

from ddrl_engine.profiling import phase

__all__ = ["CP_ATTENTION", "check_context_parallel", "check_cp_attention", "gather_sequence", "split_sequence",
           "ulysses_attention"]

CP_ATTENTION = ("ulysses", "ring")  # distributed.context_parallel_attention: how a sharded sequence is attended


def _size_rank(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def check_cp_attention(method: str) -> str:
    """`method` if it is a context-parallel attention method (CP_ATTENTION), else a ValueError naming the field."""
    if method not in CP_ATTENTION:
        raise ValueError(f"distributed.context_parallel_attention must be one of {', '.join(map(repr, CP_ATTENTION))}, "
                         f"got {method!r}")
    return method


def check_context_parallel(heads: int, tokens: int, size: int, where: str = "model", method: str = "ulysses") -> None:
    """Raises a ValueError naming the cause unless `heads` and `tokens` can be split over `size` ranks
    (the heads only matter to Ulysses: the ring keeps every head on every rank)."""
    if size < 1:
        raise ValueError(f"distributed.context_parallel must be >= 1, got {size}")
    if check_cp_attention(method) == "ulysses" and heads % size:
        raise ValueError(f"distributed.context_parallel = {size}: the {where}'s attention heads ({heads}) must be "
                         f"divisible by it (Ulysses all-to-all gives each rank heads / {size} whole-sequence heads; "
                         "distributed.context_parallel_attention = 'ring' has no such condition)")
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
        return funcol.all_gather_single(x.contiguous(), dim, group)


def _all_to_all(x: Tensor, group) -> Tensor:
    """all_to_all_single along dim 0 (chunk i goes to rank i, chunk i of the output came from rank i);
    its backward is the reverse all-to-all."""
    return funcol.all_to_all_single(x.contiguous(), None, None, group)


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


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, group, attend, *, text_tokens: int = 0,
                      text_first: bool = True) -> Tensor:
    """Attention over the whole sequence of q, k, v [B, H, S/N, D] sharded by token over `group`:
    `attend(q, k, v)` (a backend) runs on [B, H/N, S, D]; returns this rank's tokens [B, H, S/N, D].

    text_tokens = L > 0 (joint attention): q, k, v are [B, H, L + S/N, D], the first (text_first) or last
    L tokens replicated text, the rest this rank's image tokens; `attend` runs on [B, H/N, L + S, D]
    (the same order), and the result is [B, H, L + S/N, D]: the whole text, this rank's image tokens."""
    n, rank = _size_rank(group)
    if q.shape[1] % n:
        raise ValueError(f"distributed.context_parallel = {n}: the attention heads ({q.shape[1]}) must be divisible "
                         "by it (Ulysses all-to-all)")
    if not text_tokens:
        with phase("cp/all_to_all"):
            q, k, v = (seq_to_heads(t, group) for t in (q, k, v))
        out = attend(q, k, v)
        with phase("cp/all_to_all"):
            return heads_to_seq(out, group)
    if not 0 < text_tokens < q.shape[2] or k.shape[2] != q.shape[2]:
        raise ValueError(f"ulysses_attention: text_tokens = {text_tokens} must leave image tokens in q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)} (self-attention over text + image)")
    heads = q.shape[1] // n

    def parts(t: Tensor) -> tuple[Tensor, Tensor]:  # (text, image) along the sequence
        image = t.shape[2] - text_tokens
        if text_first:
            return t.narrow(2, 0, text_tokens), t.narrow(2, text_tokens, image)
        return t.narrow(2, image, text_tokens), t.narrow(2, 0, image)

    def join(text: Tensor, image: Tensor) -> Tensor:
        return torch.cat([text, image] if text_first else [image, text], dim=2)

    with phase("cp/all_to_all"):
        q, k, v = (join(txt.narrow(1, rank * heads, heads), seq_to_heads(img, group)) for txt, img in map(parts, (q, k, v)))
    text, image = parts(attend(q, k, v))
    with phase("cp/all_to_all"):
        image = heads_to_seq(image, group)
    with phase("cp/all_gather"):  # heads in rank order: the whole text output on every rank
        text = funcol.all_gather_single(text.contiguous(), 1, group)
    return join(text, image)
