"""Per-GPU memory of a DDRL training step: an ESTIMATE from a formula, not a measurement.

Notation: P parameters (all trained: the Trainer's AdamW covers policy.parameters()), W world size,
S = the largest rank's FSDP2 shard of P (per parameter ceil(rows / W) rows of dim 0; P / W when only
the count is known; P without FSDP), Pb parameters of the largest block (one FSDP2 unit), Pr
parameters outside the blocks (the root unit), L blocks, h hidden size, f FFN width, N tokens per
sample, K sampler steps, b_r rollout rows and b_d data rows per rank, b = max(b_r, b_d) (the trainer
runs one backward per trained step for the data loss and another for the policy loss, so one batch's
activations are alive at a time; ddrl_engine/trainer/loop.py `_update`), or min(b, optim.micro_batch), c compute bytes (2 under FSDP2 on CUDA, whose MixedPrecisionPolicy
computes in bf16; under DDP or one process the trainer computes in the weights' dtype, fp32: 4).

    weights        4 S                      fp32 master weights
    gradients      4 S   (+ 4 P under DDP)  FSDP2 reduce-scatters into fp32 shards; DDP also keeps its buckets
    AdamW          8 S                      exp_avg + exp_avg_sq in fp32 (per-tensor step counters ignored)
    reference      4 S   if the KL reference is on (beta_kl > 0): a frozen copy, sharded like the policy
    EMA            4 S   if EMA is on (ema_decay > 0)
    prompt bank    4 (n + 1) T_text D_text  the policy's prompt bank (n prompts + the empty one) on the device
    latents        4 (b_r (K + 1) + b_d) N v  rollout states and the data batch in fp32 (v latent values per token)
    fsdp in flight c (2 Pb + Pr) + (c + 4) Pb   FSDP2 only: the current and prefetched block and the root
                                            unsharded in compute dtype, and one block's gradient in compute dtype
                                            plus its fp32 copy for the reduce-scatter
    activations    b N (L a + a_out)        a = alpha_h h + alpha_f f per token and block;
                   with activation checkpointing: b N (L c h + alpha_h h + alpha_f f + a_out): each block
                   keeps only its input, and one block's activations are rebuilt at a time in backward

The activation factors are the bytes autograd saves per token for one diffusers WanTransformerBlock
(self-attention through SDPA's flash kernel, which stores no attention matrix; cross-attention; FFN;
the block's fp32 norms and modulation), counted with `saved_tensor_bytes` on CPU (torch 2.14,
diffusers 0.42.1) at two FFN widths: bf16 compute (alpha_h, alpha_f, alpha_out) = (68, 4, 12),
fp32 (84, 8, 16). tests/test_memory.py re-measures them. CUDA kernels may save different tensors
(fused norms, another attention kernel), and the text tokens of cross-attention (a per-sample term)
are left out. Not included at all: the CUDA context, NCCL buffers, allocator fragmentation and
transient kernel workspaces, and the unsharded gradients FSDP2 accumulates when
distributed.grad_sync = "update" defers the reduce-scatter; leave headroom. Nothing here was measured
on a GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

MASTER_BYTES = 4  # fp32 weights, gradients, optimizer states
ACTIVATION_FACTORS = {2: (68, 4, 12), 4: (84, 8, 16)}  # compute bytes -> (alpha_h, alpha_f, alpha_out)
PARALLEL = ("fsdp", "ddp", "none")
GIB = 1024**3


def _positive(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"memory estimate: '{name}' must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of a transformer.

    params: all parameters. block_params: parameters of the largest block. num_blocks: blocks.
    hidden, ffn_dim: token width and FFN width. latent_per_token: latent values per token (channels
    x patch volume: 16 x 1 x 2 x 2 = 64 for Wan2.1). text_tokens, text_dim: the shape of one prompt
    embedding (Wan2.1: 512 umT5 tokens x 4096). param_rows: (rows of dim 0, numel) per parameter, for
    exact FSDP2 shard sizes; empty when only counts are known.
    """

    params: int
    block_params: int
    num_blocks: int
    hidden: int
    ffn_dim: int
    latent_per_token: int = 64
    text_tokens: int = 512
    text_dim: int = 4096
    param_rows: tuple[tuple[int, int], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        for name in ("params", "block_params", "num_blocks", "hidden", "ffn_dim", "latent_per_token",
                     "text_tokens", "text_dim"):
            _positive(f"ModelShape.{name}", getattr(self, name))
        if self.block_params * self.num_blocks > self.params:
            raise ValueError(f"memory estimate: num_blocks x block_params ({self.num_blocks} x {self.block_params}) "
                             f"exceeds params ({self.params})")

    @property
    def root_params(self) -> int:
        """Parameters outside the blocks (at least; blocks of unequal size make this a lower bound)."""
        return self.params - self.num_blocks * self.block_params

    def shard(self, world_size: int) -> int:
        """Parameters held by the largest rank when every parameter is split by rows over world_size."""
        if not self.param_rows:
            return math.ceil(self.params / world_size)
        return sum(math.ceil(rows / world_size) * (numel // rows) for rows, numel in self.param_rows)

    @classmethod
    def from_module(cls, module: nn.Module, *, hidden: int | None = None, ffn_dim: int | None = None,
                    latent_per_token: int | None = None) -> "ModelShape":
        """The shape of a model with a `blocks` list (our DiT, the diffusers policies). hidden / ffn_dim /
        latent_per_token are read from a diffusers Wan config when not given (policy.model.config)."""
        blocks = getattr(module, "blocks", None)
        if not blocks:
            raise ValueError(f"memory estimate: {type(module).__name__} has no `blocks` list of transformer blocks")
        config = getattr(getattr(module, "model", module), "config", None)
        if config is not None and hasattr(config, "ffn_dim"):  # WanTransformer3DModel
            hidden = hidden or config.num_attention_heads * config.attention_head_dim
            ffn_dim = ffn_dim or config.ffn_dim
            latent_per_token = latent_per_token or config.in_channels * math.prod(config.patch_size)
        if hidden is None or ffn_dim is None:
            raise ValueError(f"memory estimate: pass hidden= and ffn_dim= for {type(module).__name__} "
                             "(they are read from the config of Wan models only)")
        params = list(module.parameters())
        rows = tuple((p.shape[0] if p.dim() else 1, p.numel()) for p in params)
        return cls(params=sum(p.numel() for p in params),
                   block_params=max(sum(p.numel() for p in b.parameters()) for b in blocks),
                   num_blocks=len(blocks), hidden=hidden, ffn_dim=ffn_dim,
                   latent_per_token=latent_per_token or 64, param_rows=rows)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU by part (`parts`, in print order) and their sum (`total`)."""

    parts: dict[str, int]
    inputs: dict

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def table(self) -> str:
        width = max(len(k) for k in self.parts) + 2
        lines = [f"{k:<{width}}{v / GIB:9.2f} GiB" for k, v in self.parts.items()]
        return "\n".join(lines + ["-" * (width + 13), f"{'total (estimate)':<{width}}{self.total / GIB:9.2f} GiB"])


def estimate_memory(model: ModelShape | nn.Module, *, tokens: int, world_size: int, rollout_per_rank: int = 1,
                    data_per_rank: int = 1, parallel: str = "fsdp", activation_checkpointing: bool = False,
                    kl_reference: bool = False, ema: bool = False, sampler_steps: int = 10,
                    prompts: int = 0, micro_batch: int = 0) -> MemoryEstimate:
    """Per-GPU bytes of one training step (see the module docstring for every term). `model` is a
    ModelShape or a module with `blocks` (see ModelShape.from_module). micro_batch: the trainer's
    optim.micro_batch (rows per forward/backward; 0 = all of the rank's rows), which bounds b."""
    shape = model if isinstance(model, ModelShape) else ModelShape.from_module(model)
    if parallel not in PARALLEL:
        raise ValueError(f"memory estimate: 'parallel' must be one of {PARALLEL}, got {parallel!r}")
    _positive("tokens", tokens)
    _positive("world_size", world_size)
    _positive("rollout_per_rank", rollout_per_rank, 0)
    _positive("data_per_rank", data_per_rank, 0)
    _positive("sampler_steps", sampler_steps)
    _positive("prompts", prompts, 0)
    _positive("micro_batch", micro_batch, 0)
    if rollout_per_rank + data_per_rank == 0:
        raise ValueError("memory estimate: 'rollout_per_rank' + 'data_per_rank' must be >= 1 (nothing is trained)")
    if parallel == "none" and world_size != 1:
        raise ValueError(f"memory estimate: parallel = 'none' runs one process; 'world_size' must be 1, got {world_size}")
    fsdp = parallel == "fsdp"
    held = shape.shard(world_size) if fsdp else shape.params
    c = 2 if fsdp else MASTER_BYTES
    alpha_h, alpha_f, alpha_out = ACTIVATION_FACTORS[c]
    block_act = alpha_h * shape.hidden + alpha_f * shape.ffn_dim  # bytes per token and block
    b, n = max(rollout_per_rank, data_per_rank), tokens
    if micro_batch:
        b = min(b, micro_batch)
    if activation_checkpointing:
        per_token = shape.num_blocks * c * shape.hidden + block_act + alpha_out * shape.hidden
    else:
        per_token = shape.num_blocks * block_act + alpha_out * shape.hidden

    parts = {"weights (fp32)": MASTER_BYTES * held,
             "gradients (fp32)": MASTER_BYTES * held + (MASTER_BYTES * shape.params if parallel == "ddp" else 0),
             "AdamW states (fp32)": 2 * MASTER_BYTES * held}
    if kl_reference:
        parts["KL reference (fp32)"] = MASTER_BYTES * held
    if ema:
        parts["EMA weights (fp32)"] = MASTER_BYTES * held
    if prompts:
        parts["prompt bank (fp32)"] = 4 * (prompts + 1) * shape.text_tokens * shape.text_dim
    parts["rollout states + data latents"] = 4 * (rollout_per_rank * (sampler_steps + 1) + data_per_rank) * n * shape.latent_per_token
    if fsdp:
        parts["FSDP2 unsharded in flight"] = c * (2 * shape.block_params + shape.root_params) + (c + MASTER_BYTES) * shape.block_params
    parts["activations" + (" (checkpointed)" if activation_checkpointing else "")] = b * n * per_token
    inputs = dict(tokens=tokens, world_size=world_size, rollout_per_rank=rollout_per_rank, data_per_rank=data_per_rank,
                  parallel=parallel, activation_checkpointing=activation_checkpointing, kl_reference=kl_reference,
                  ema=ema, sampler_steps=sampler_steps, prompts=prompts, micro_batch=micro_batch, compute_bytes=c)
    return MemoryEstimate(parts, inputs)


def saved_tensor_bytes(fn: Callable[[], object], exclude: list[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn()` runs, leaving out the
    storages of `exclude` (parameters, inputs): the activation memory of a forward pass. Runs `fn`."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


# ---- presets: Wan2.1 text-to-video transformers (diffusers WanTransformer3DModel) ----------------

@dataclass(frozen=True)
class Preset:
    """A published model's dimensions. `config` is the WanTransformer3DModel config; the counts were
    taken from that model built on the meta device (tests/test_memory.py rebuilds it and compares)."""

    config: dict
    shape: ModelShape


def _wan(heads: int, ffn: int, layers: int, params: int, block_params: int) -> Preset:
    config = dict(num_attention_heads=heads, attention_head_dim=128, ffn_dim=ffn, num_layers=layers, in_channels=16,
                  out_channels=16, text_dim=4096, patch_size=(1, 2, 2))
    return Preset(config, ModelShape(params=params, block_params=block_params, num_blocks=layers, hidden=heads * 128,
                                     ffn_dim=ffn, latent_per_token=64))


PRESETS = {
    "wan2.1-1.3b": _wan(heads=12, ffn=8960, layers=30, params=1_418_996_800, block_params=46_440_704),
    "wan2.1-14b": _wan(heads=40, ffn=13824, layers=40, params=14_288_491_584, block_params=351_394_304),
}


def video_tokens(frames: int, height: int, width: int, *, vae_stride=(4, 8, 8), patch=(1, 2, 2)) -> int:
    """Transformer tokens of one video: the Wan VAE keeps (frames - 1) / 4 + 1 latent frames and divides
    height and width by 8; the transformer cuts 1 x 2 x 2 patches."""
    for name, v in (("frames", frames), ("height", height), ("width", width)):
        _positive(name, v)
    st, sh, sw = vae_stride
    if (frames - 1) % st:
        raise ValueError(f"memory estimate: 'frames' - 1 must be divisible by {st} (e.g. 81), got {frames}")
    latent = ((frames - 1) // st + 1, height // sh, width // sw)
    for name, size, p in zip(("frames", "height", "width"), latent, patch):
        if size % p or size == 0:
            raise ValueError(f"memory estimate: the latent {name} ({size}) must be a positive multiple of the patch ({p})")
    return math.prod(s // p for s, p in zip(latent, patch))


RESOLUTIONS = {"480p": (81, 480, 832), "720p": (81, 720, 1280)}  # frames, height, width


def summary_table(world_sizes=(8, 32, 256), **options) -> str:
    """Markdown table of the estimated total per GPU (GiB) for every preset and resolution, without and
    with activation checkpointing; `options` go to estimate_memory (rollout_per_rank, kl_reference, ...)."""
    head = ["model", "video", "tokens", "act. ckpt"] + [f"W={w}" for w in world_sizes]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, preset in PRESETS.items():
        for res, (frames, height, width) in RESOLUTIONS.items():
            n = video_tokens(frames, height, width)
            for ckpt in (False, True):
                totals = [estimate_memory(preset.shape, tokens=n, world_size=w, activation_checkpointing=ckpt,
                                          **options).total / GIB for w in world_sizes]
                cells = [name, f"{res} {frames}f {width}x{height}", f"{n:,}", "yes" if ckpt else "no"]
                rows.append("| " + " | ".join(cells + [f"{t:,.1f}" for t in totals]) + " |")
    return "\n".join(rows)
