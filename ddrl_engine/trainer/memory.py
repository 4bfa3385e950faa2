"""Per-GPU memory of a DDRL training step: an ESTIMATE from a formula, not a measurement.

Notation: P parameters (all trained: the Trainer's AdamW covers policy.parameters()), W world size,
S = the largest rank's FSDP2 shard of P (per parameter ceil(rows / W) rows of dim 0; P / W when only
the count is known; P without FSDP), Pb parameters of the largest block (one FSDP2 unit), Pr
parameters outside the blocks (the root unit), L blocks, h hidden size, f FFN width, N tokens per
sample, K sampler steps, b_r rollout rows and b_d data rows per rank, b = max(b_r, b_d) (the trainer
runs one backward per trained step for the data loss and another for the policy loss, so one batch's
activations are alive at a time; ddrl_engine/trainer/loop.py `_update`), each side first bounded by
optim.micro_batch, the rollout side doubled under classifier-free guidance (rollout.guidance_scale not
1 or 0: the policy loss runs the guided forward, both branches of each row in one batch; the data loss
stays unguided), c compute bytes (2 under FSDP2 on CUDA, whose MixedPrecisionPolicy
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

MMDiT models (SD3 / SD3.5, FLUX.1) run their T text tokens through every block beside the N image
tokens, so their blocks' term is per block kind k: (beta_img,k N + beta_txt,k T) h, FFN (4 h) included,
and a_out = beta_out h per image token; with activation checkpointing each block keeps its input,
c h (N + T), and one block is rebuilt at a time. The betas (BLOCK_FACTORS, OUT_FACTORS) were counted
the same way on tiny diffusers models at hidden 64 and 128 (they agree to 1%): bf16 / fp32
    SD3 JointTransformerBlock (qk rms_norm)         58 / 100 per image and per text token
    + SD3.5 dual attention (dual_attention_layers)  86 / 140 per image token (text as above)
    FLUX double-stream block                        56 / 96
    FLUX single-stream block                        50 / 84 per image token, 52 / 88 per text token
    output layers                                   SD3 6 / 12, FLUX 8 / 14

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

Context parallelism (distributed.context_parallel = n_cp; the engine's scheme, docs/distributed.md): the
blocks run on N / n_cp tokens per sample, so the activations term becomes
    b (activation_bytes(N / n_cp) + c N v)   the blocks on this rank's tokens, plus the gathered output
while the rollout states and data latents stay whole samples on every rank (4 (b_r (K + 1) + b_d) N v:
small next to the activations, 256 bytes a token for Wan's v = 64 against ~0.2 MB a token of block
activations for Wan2.1-14B in bf16). The weights are sharded by FSDP2 over all W ranks, cp ranks included.
b_r, b_d are rows per data rank (the global batch over W / n_cp). The communication the cp group adds,
bytes SENT per GPU (`cp_communication`): per block and per row of a forward, four all-to-alls (q, k, v
and the attention output) of (N / n_cp) h c bytes each, of which a share (n_cp - 1) / n_cp leaves the GPU,
plus the output all-gather ((n_cp - 1) / n_cp of N v c); a backward sends the same again (a third time
when activation checkpointing recomputes the forward). With ring attention (cp_attention = "ring") each
block's K and V of (N / n_cp) h c bytes each travel n_cp - 1 hops instead (n_cp / 2 times Ulysses' volume,
but neighbour-to-neighbour and overlapped with the blocks' attention), and a backward adds n_cp hops of
their fp32 gradients (2 n_cp (N / n_cp) h 4 bytes a block).

The policy's dtype (`dtype`, the [model] dtype of a pipeline run; the built-in DiT is fp32): a pipeline
run loads the transformer in that dtype, p = 2 bytes a value in bf16 / fp16 (4 in fp32). Whatever was
trained is fp32 whatever the dtype (master weights: AdamW steps on bf16 weights round most updates away at
the usual learning rates): a full fine-tune's figures are the fp32 ones (p = 4; c = 2 under FSDP2 on CUDA,
4 otherwise), and a LoRA run keeps a frozen base of p bytes a value with fp32 adapters. The table above is
p = 4. (diffusers keeps a few Wan modules,
the timestep embedder, modulation tables and norms, in fp32 when it loads in bf16: ~29M parameters a 14B
expert, left out.)

LoRA (`lora_rank` R > 0, the default lora_targets to_q, to_k, to_v, to_out.0): enable_lora freezes the
base and makes the adapters fp32 (peft's autocast_adapter_dtype), so with P_L = R x 2 h x (adapted
Linears, every one h -> h: `throughput.LORA_ADAPTERS` per block kind)
    frozen base    p S                        FSDP2 shards it like any parameter (no gradient, no state)
    LoRA weights   4 S_L, gradients 4 S_L (+ 4 P_L under DDP), AdamW states 8 S_L   S_L = P_L / W
    reference, EMA 4 S_L each                  copies of the adapters, the base shared with the policy
                   (FSDP2: p S + 4 S_L each, every model sharded on its own)
    fsdp in flight c (2 (Pb + Pb_L) + Pr) + (c + 4) Pb_L   gradients for the block's adapters only
    activations    as above with LORA_ACTIVATION_FACTORS (Wan) / LORA_BLOCK_FACTORS, LORA_OUT_FACTORS
                   (MMDiT), plus a R per token and adapter of the block (each adapter saves x A^T)
The adapters compute in a = c bytes under FSDP2 (its MixedPrecisionPolicy casts them); under DDP or one
process in fp32 (a = 4) over a base computing in c = p, where peft casts each adapter's input to fp32 and
autograd keeps those copies: the factors are per (c, a). With the base frozen, autograd keeps far less
than a full fine-tune: a frozen Linear computes no weight gradient, so the inputs that only such a
gradient needs (the FFN's, the projections') are not saved (Wan in bf16: 40 h + 2 f per token and block
against 68 h + 4 f). The factors were counted like the others (`saved_tensor_bytes`, tiny diffusers
models with adapters), (c, a) = (2, 2) / (2, 4) / (4, 4):
    Wan block (alpha_h, alpha_f, alpha_out)        (40, 2, 2) / (61, 2, 2) / (56, 4, 4)
    SD3 block per image / text token               36 / 34, 49 / 33, 56 / 52
    SD3.5 dual block                               58 / 34, 85 / 33, 85 / 52
    FLUX double block                              30 / 28, 45 / 29, 52 / 48
    FLUX single block                              28 / 30, 38 / 40, 48 / 52
    output layers                                  SD3 0, FLUX 4 (all three)

Two experts (Wan2.2 A14B, `ModelShape.experts` = 2; ddrl_engine.models.diffusers.WanExpertsPolicy): both
transformers are held, sharded and trained (weights, gradients, AdamW states, adapters of both: P, the
blocks and the root count both), while each row runs one expert, so the activations are one expert's
num_blocks / experts blocks. FSDP2 gathers one block at a time, of whichever expert runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ddrl_engine.attention.context_parallel import CP_ATTENTION
from ddrl_engine.trainer.throughput import (DEFAULT_MFU, LORA_ADAPTERS, MatmulShape, StepPlan, matmul_shape, step_flops,
                                           step_seconds)

MASTER_BYTES = 4  # fp32 weights, gradients, optimizer states
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # [model] dtype -> bytes of the policy's parameters
ACTIVATION_FACTORS = {2: (68, 4, 12), 4: (84, 8, 16)}  # compute bytes -> (alpha_h, alpha_f, alpha_out)
# The same with a frozen base (LoRA), by (base compute bytes c, adapter compute bytes a)
LORA_ACTIVATION_FACTORS = {(2, 2): (40, 2, 2), (2, 4): (61, 2, 2), (4, 4): (56, 4, 4)}
# MMDiT blocks (module docstring): kind -> compute bytes -> (beta per image token, beta per text token), x hidden
BLOCK_FACTORS = {"sd3": {2: (58, 58), 4: (100, 100)}, "sd3_dual": {2: (86, 58), 4: (140, 100)},
                 "flux_double": {2: (56, 56), 4: (96, 96)}, "flux_single": {2: (50, 52), 4: (84, 88)}}
OUT_FACTORS = {"sd3": {2: 6, 4: 12}, "flux": {2: 8, 4: 14}}  # family -> compute bytes -> beta_out, x hidden
LORA_BLOCK_FACTORS = {"sd3": {(2, 2): (36, 34), (2, 4): (49, 33), (4, 4): (56, 52)},
                      "sd3_dual": {(2, 2): (58, 34), (2, 4): (85, 33), (4, 4): (85, 52)},
                      "flux_double": {(2, 2): (30, 28), (2, 4): (45, 29), (4, 4): (52, 48)},
                      "flux_single": {(2, 2): (28, 30), (2, 4): (38, 40), (4, 4): (48, 52)}}
LORA_OUT_FACTORS = {"sd3": {(2, 2): 0, (2, 4): 0, (4, 4): 0}, "flux": {(2, 2): 4, (2, 4): 4, (4, 4): 4}}
FAMILIES = ("wan", "sd3", "flux")
PARALLEL = ("fsdp", "ddp", "none")
GIB = 1024**3
# Device memory as nvidia-smi reports it (MiB): what the totals are compared with (the CUDA context and
# the allocator's reserve come out of it too: leave headroom).
GPUS = {"H100 80GB": 81_559 * 2**20, "H200 141GB": 143_771 * 2**20}


def _positive(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"memory estimate: '{name}' must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of a transformer.

    params: all parameters. block_params: parameters of the largest block. num_blocks: blocks.
    hidden, ffn_dim: token width and FFN width. latent_per_token: latent values per token (channels
    x patch volume: 16 x 1 x 2 x 2 = 64 for Wan2.1, SD3 and FLUX). text_tokens, text_dim: the shape of
    one prompt embedding (Wan2.1: 512 umT5 tokens x 4096; SD3: 77 CLIP + 256 T5 tokens; FLUX: 512 T5
    tokens); for SD3 / FLUX the text tokens also run through every block. param_rows: (rows of dim 0,
    numel) per parameter, for exact FSDP2 shard sizes; empty when only counts are known.
    family: "wan" (activation factors of ACTIVATION_FACTORS), "sd3" or "flux" (MMDiT: BLOCK_FACTORS).
    block_kinds: MMDiT only: (kind in BLOCK_FACTORS, count) in block order, counts adding up to num_blocks.
    blocks_total: parameters of all blocks together (0: num_blocks x block_params, blocks of one size).
    experts: transformers held (2: two-expert Wan2.2); params and the blocks count all of them, a row runs one.
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
    family: str = "wan"
    block_kinds: tuple[tuple[str, int], ...] = ()
    blocks_total: int = 0
    heads: int = 0  # attention heads (0: unknown); context parallelism needs them divisible by n_cp
    experts: int = 1

    def __post_init__(self) -> None:
        for name in ("params", "block_params", "num_blocks", "hidden", "ffn_dim", "latent_per_token",
                     "text_tokens", "text_dim", "experts"):
            _positive(f"ModelShape.{name}", getattr(self, name))
        if self.num_blocks % self.experts or (self.experts > 1 and self.family != "wan"):
            raise ValueError(f"memory estimate: 'ModelShape.experts' = {self.experts} must divide num_blocks "
                             f"({self.num_blocks}), and only Wan models have several")
        _positive("ModelShape.blocks_total", self.blocks_total, 0)
        if self.family not in FAMILIES:
            raise ValueError(f"memory estimate: 'ModelShape.family' must be one of {FAMILIES}, got {self.family!r}")
        if self.family == "wan" and self.block_kinds:
            raise ValueError("memory estimate: 'ModelShape.block_kinds' is for the MMDiT families ('sd3', 'flux')")
        if self.family != "wan":
            bad = [k for k, _ in self.block_kinds if k not in BLOCK_FACTORS or not k.startswith(self.family)]
            if not self.block_kinds or bad or sum(n for _, n in self.block_kinds) != self.num_blocks:
                raise ValueError(f"memory estimate: a {self.family!r} ModelShape needs block_kinds, (kind, count) pairs "
                                 f"of its own kinds ({', '.join(k for k in BLOCK_FACTORS if k.startswith(self.family))}) "
                                 f"adding up to num_blocks = {self.num_blocks}, got {self.block_kinds}")
        total = self.blocks_total or self.num_blocks * self.block_params
        if total > self.params or self.block_params > total:
            what = "blocks_total" if self.blocks_total else f"num_blocks x block_params ({self.num_blocks} x {self.block_params})"
            raise ValueError(f"memory estimate: {what} = {total} exceeds params ({self.params}) or is below block_params")

    @property
    def root_params(self) -> int:
        """Parameters outside the blocks (blocks of unequal size without blocks_total make this a lower bound)."""
        return self.params - (self.blocks_total or self.num_blocks * self.block_params)

    def shard(self, world_size: int) -> int:
        """Parameters held by the largest rank when every parameter is split by rows over world_size."""
        if not self.param_rows:
            return math.ceil(self.params / world_size)
        return sum(math.ceil(rows / world_size) * (numel // rows) for rows, numel in self.param_rows)

    def _kinds(self) -> tuple[tuple[str, int], ...]:
        return self.block_kinds or (("wan", self.num_blocks),)

    def lora_params(self, rank: int) -> int:
        """Parameters of rank-`rank` adapters on the default lora_targets (each adapted Linear is h -> h)."""
        return rank * 2 * self.hidden * sum(n * LORA_ADAPTERS[k][0] for k, n in self._kinds())

    def lora_shard(self, rank: int, world_size: int) -> int:
        """Adapter parameters on the largest rank when FSDP2 splits each lora_A [R, h] and lora_B [h, R] by rows."""
        adapters = self.lora_params(rank) // (2 * rank * self.hidden) if rank else 0
        return adapters * (math.ceil(rank / world_size) * self.hidden + math.ceil(self.hidden / world_size) * rank)

    def lora_block_params(self, rank: int) -> int:
        """The largest block's adapter parameters."""
        return rank * 2 * self.hidden * max(LORA_ADAPTERS[k][0] for k, _ in self._kinds())

    def activation_bytes(self, tokens: int, compute_bytes: int, checkpointing: bool, lora_rank: int = 0,
                         adapter_bytes: int | None = None) -> int:
        """Bytes autograd keeps for one sample of `tokens` image tokens (the module docstring's activations);
        lora_rank > 0: a frozen base with adapters of that rank computing in `adapter_bytes` (default
        compute_bytes). A row runs one expert's blocks."""
        h, c, r = self.hidden, compute_bytes, lora_rank
        a = adapter_bytes or c
        key = (c, a) if r else c
        if self.family == "wan":
            alpha_h, alpha_f, alpha_out = (LORA_ACTIVATION_FACTORS if r else ACTIVATION_FACTORS)[key]
            # bytes per token and block; each adapter on the image tokens also saves x A^T (r values)
            block_act = alpha_h * h + alpha_f * self.ffn_dim + a * r * LORA_ADAPTERS["wan"][1]
            blocks = self.num_blocks // self.experts
            if checkpointing:
                return tokens * (blocks * c * h + block_act + alpha_out * h)
            return tokens * (blocks * block_act + alpha_out * h)
        text = self.text_tokens
        factors, out_factors = (LORA_BLOCK_FACTORS, LORA_OUT_FACTORS) if r else (BLOCK_FACTORS, OUT_FACTORS)
        per_block = {k: (factors[k][key][0] * h + a * r * LORA_ADAPTERS[k][1]) * tokens
                     + (factors[k][key][1] * h + a * r * LORA_ADAPTERS[k][2]) * text for k, _ in self.block_kinds}
        out = out_factors[self.family][key] * h * tokens
        if checkpointing:
            return self.num_blocks * c * h * (tokens + text) + max(per_block.values()) + out
        return sum(n * per_block[k] for k, n in self.block_kinds) + out

    @classmethod
    def from_module(cls, module: nn.Module, *, hidden: int | None = None, ffn_dim: int | None = None,
                    latent_per_token: int | None = None, text_tokens: int | None = None) -> "ModelShape":
        """The shape of a model with a `blocks` list (our DiT, the diffusers policies) or a diffusers SD3 / FLUX /
        Wan transformer. hidden / ffn_dim / latent_per_token (and the family and block kinds) are read from a
        diffusers config when not given (policy.model.config); text_tokens: the prompt tokens (default 512)."""
        model = getattr(module, "model", module)
        config = getattr(model, "config", None)
        get = (lambda k, d=None: config.get(k, d)) if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
        family, kinds, groups = "wan", (), None
        if config is not None and get("num_single_layers") is not None:  # FluxTransformer2DModel
            family = "flux"
            groups = [list(model.transformer_blocks), list(model.single_transformer_blocks)]
            kinds = tuple((k, len(g)) for k, g in zip(("flux_double", "flux_single"), groups) if g)
            latent_per_token = latent_per_token or get("in_channels")  # packed 2x2: 4 x 16 channels
        elif config is not None and get("caption_projection_dim") is not None:  # SD3Transformer2DModel
            family = "sd3"
            groups = [list(model.transformer_blocks)]
            dual = set(get("dual_attention_layers") or ())
            n = len(groups[0])
            kinds = tuple((k, c) for k, c in (("sd3_dual", len(dual & set(range(n)))), ("sd3", n - len(dual & set(range(n)))))
                          if c)
            latent_per_token = latent_per_token or get("in_channels") * get("patch_size") ** 2
        if family != "wan":
            hidden = hidden or get("num_attention_heads") * get("attention_head_dim")
            ffn_dim = ffn_dim or 4 * hidden  # the blocks' FeedForward / MLP ratio 4
            blocks = [b for g in groups for b in g]
        else:
            blocks = getattr(module, "blocks", None)
            if not blocks:
                raise ValueError(f"memory estimate: {type(module).__name__} has no `blocks` list of transformer blocks")
            if config is not None and hasattr(config, "ffn_dim"):  # WanTransformer3DModel
                hidden = hidden or config.num_attention_heads * config.attention_head_dim
                ffn_dim = ffn_dim or config.ffn_dim
                latent_per_token = latent_per_token or config.in_channels * math.prod(config.patch_size)
        if hidden is None or ffn_dim is None:
            raise ValueError(f"memory estimate: pass hidden= and ffn_dim= for {type(module).__name__} "
                             "(they are read from the config of diffusers SD3, FLUX and Wan models only)")
        params = list(module.parameters())
        rows = tuple((p.shape[0] if p.dim() else 1, p.numel()) for p in params)
        sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
        return cls(params=sum(p.numel() for p in params), block_params=max(sizes), num_blocks=len(blocks), hidden=hidden,
                   ffn_dim=ffn_dim, latent_per_token=latent_per_token or 64, text_tokens=text_tokens or 512,
                   param_rows=rows, family=family, block_kinds=kinds,
                   blocks_total=sum(sizes) if family != "wan" else 0,
                   experts=len(getattr(module, "experts", ())) or 1)


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

    def fits(self) -> str:
        """One line per GPU of GPUS: whether the estimated total fits its memory, and the margin."""
        lines = []
        for gpu, capacity in GPUS.items():
            margin = (capacity - self.total) / GIB
            verdict = (f"fits, {margin:.1f} GiB left" if margin >= 0 else f"does NOT fit, {-margin:.1f} GiB over")
            lines.append(f"  {gpu} ({capacity / GIB:.1f} GiB): {verdict}")
        return "\n".join(lines)


def guided_rows(guidance_scale: float) -> int:
    """Rows of the policy's training forward per rollout sample under rollout.guidance_scale: 2 with
    classifier-free guidance (both branches in one batch), 1 for scale 1 (no guidance) or 0 (unconditional)."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(
            guidance_scale) or guidance_scale < 0:
        raise ValueError(f"memory estimate: 'guidance_scale' must be a finite number >= 0, got {guidance_scale!r}")
    return 1 if guidance_scale in (0.0, 1.0) else 2


def estimate_memory(model: ModelShape | nn.Module, *, tokens: int, world_size: int, rollout_per_rank: int = 1,
                    data_per_rank: int = 1, parallel: str = "fsdp", activation_checkpointing: bool = False,
                    kl_reference: bool = False, ema: bool = False, sampler_steps: int = 10,
                    prompts: int = 0, micro_batch: int = 0, guidance_scale: float = 1.0,
                    context_parallel: int = 1, lora_rank: int = 0, dtype: str = "fp32",
                    cp_attention: str = "ulysses") -> MemoryEstimate:
    """Per-GPU bytes of one training step (see the module docstring for every term). `model` is a
    ModelShape or a module with `blocks` (see ModelShape.from_module). micro_batch: the trainer's
    optim.micro_batch (rows per forward/backward; 0 = all of the rank's rows), which bounds b.
    guidance_scale: rollout.guidance_scale (not 1 or 0: the policy loss's forward has two rows per sample).
    context_parallel: distributed.context_parallel (n_cp ranks split each sample's tokens; must divide
    world_size, tokens and, when known, the heads); rollout_per_rank / data_per_rank are then rows per
    data rank (per cp group); cp_attention: distributed.context_parallel_attention ("ring" needs no
    head divisibility; its activations are counted as Ulysses': it saves the same q, k, v, output and
    log-sum-exp per attention). lora_rank: model.lora_rank (0: full fine-tuning). dtype: the policy's
    parameter dtype (a pipeline run's model.dtype; "fp32" for the built-in DiT); a full fine-tune's
    trained weights are fp32 whatever it is (master weights)."""
    shape = model if isinstance(model, ModelShape) else ModelShape.from_module(model)
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"memory estimate: 'dtype' must be one of {tuple(DTYPE_BYTES)}, got {dtype!r}")
    _positive("lora_rank", lora_rank, 0)
    if parallel not in PARALLEL:
        raise ValueError(f"memory estimate: 'parallel' must be one of {PARALLEL}, got {parallel!r}")
    _positive("tokens", tokens)
    _positive("world_size", world_size)
    _positive("rollout_per_rank", rollout_per_rank, 0)
    _positive("data_per_rank", data_per_rank, 0)
    _positive("sampler_steps", sampler_steps)
    _positive("prompts", prompts, 0)
    _positive("micro_batch", micro_batch, 0)
    rows_per_sample = guided_rows(guidance_scale)
    if rollout_per_rank + data_per_rank == 0:
        raise ValueError("memory estimate: 'rollout_per_rank' + 'data_per_rank' must be >= 1 (nothing is trained)")
    if parallel == "none" and world_size != 1:
        raise ValueError(f"memory estimate: parallel = 'none' runs one process; 'world_size' must be 1, got {world_size}")
    cp = _check_cp(shape, tokens, world_size, context_parallel, cp_attention)
    fsdp = parallel == "fsdp"
    held = shape.shard(world_size) if fsdp else shape.params
    p, r = DTYPE_BYTES[dtype], lora_rank
    # Whatever is trained is fp32 whatever the dtype (master weights: load_policy's upcast_trained for a full
    # fine-tune, enable_lora's fp32 adapters): p then only sizes a LoRA run's frozen base.
    if not r:
        p, dtype = MASTER_BYTES, "fp32"
    c = 2 if fsdp else p  # FSDP2 computes in bf16 on CUDA; DDP and one process in the weights' dtype
    a = c if fsdp else MASTER_BYTES  # the adapters' compute bytes: FSDP2 casts them, else peft runs them in fp32
    t = MASTER_BYTES  # bytes of a trained value
    bound = (lambda rows: min(rows, micro_batch)) if micro_batch else (lambda rows: rows)
    b = max(rows_per_sample * bound(rollout_per_rank), bound(data_per_rank))
    n = tokens

    # the trained parameters (all, or the adapters over a frozen base) and what this rank holds of them
    trained = shape.lora_params(r) if r else shape.params
    trained_held = (shape.lora_shard(r, world_size) if fsdp else trained) if r else held
    pre = "LoRA " if r else ""
    parts = {f"frozen base ({dtype})": p * held} if r else {}
    parts |= {f"{pre}weights (fp32)": t * trained_held,
              f"{pre}gradients (fp32)": t * trained_held + (t * trained if parallel == "ddp" else 0),
              f"{pre}AdamW states (fp32)": 2 * t * trained_held}
    # a frozen copy of the policy: a LoRA run's base is shared with it, except under FSDP2 (models.trainable.frozen_copy)
    if r:
        copy, what = (p * held + t * trained_held, f"{dtype} base + fp32 adapters") if fsdp else (t * trained, "fp32 adapters")
    else:
        copy, what = t * held, "fp32"
    if kl_reference:
        parts[f"KL reference ({what})"] = copy
    if ema:
        parts[f"EMA weights ({what})"] = copy
    if prompts:
        parts["prompt bank (fp32)"] = 4 * (prompts + 1) * shape.text_tokens * shape.text_dim
    parts["rollout states + data latents"] = 4 * (rollout_per_rank * (sampler_steps + 1) + data_per_rank) * n * shape.latent_per_token
    if fsdp:
        block = shape.block_params + shape.lora_block_params(r)
        block_trained = shape.lora_block_params(r) if r else shape.block_params
        parts["FSDP2 unsharded in flight"] = c * (2 * block + shape.root_params) + (c + MASTER_BYTES) * block_trained
    name = "activations" + (" (checkpointed)" if activation_checkpointing else "")
    if cp == 1:
        parts[name] = b * shape.activation_bytes(n, c, activation_checkpointing, r, a)
    else:  # the blocks on this rank's tokens; the gathered output is whole
        parts[name] = b * (shape.activation_bytes(n // cp, c, activation_checkpointing, r, a) + c * n * shape.latent_per_token)
    inputs = dict(tokens=tokens, world_size=world_size, rollout_per_rank=rollout_per_rank, data_per_rank=data_per_rank,
                  context_parallel=cp,
                  parallel=parallel, activation_checkpointing=activation_checkpointing, kl_reference=kl_reference,
                  ema=ema, sampler_steps=sampler_steps, prompts=prompts, micro_batch=micro_batch,
                  guidance_scale=guidance_scale, activation_rows=b, compute_bytes=c, adapter_bytes=a if r else 0,
                  lora_rank=r, dtype=dtype,
                  trained_params=trained)
    return MemoryEstimate(parts, inputs)


def _check_cp_attention(cp_attention: str) -> None:
    if cp_attention not in CP_ATTENTION:
        raise ValueError(f"memory estimate: 'cp_attention' must be one of {CP_ATTENTION}, got {cp_attention!r}")


def _check_cp(shape: ModelShape, tokens: int, world_size: int, cp, cp_attention: str = "ulysses") -> int:
    _positive("context_parallel", cp)
    _check_cp_attention(cp_attention)
    if world_size % cp:
        raise ValueError(f"memory estimate: 'context_parallel' = {cp} must divide 'world_size' ({world_size})")
    if tokens % cp:
        raise ValueError(f"memory estimate: 'context_parallel' = {cp} must divide the tokens per sample ({tokens:,})")
    if cp_attention == "ulysses" and shape.heads and shape.heads % cp:
        raise ValueError(f"memory estimate: 'context_parallel' = {cp} must divide the model's attention heads "
                         f"({shape.heads}; Ulysses all-to-all; cp_attention = 'ring' has no such condition)")
    return cp


def cp_communication(model: ModelShape, *, tokens: int, context_parallel: int, rollout_rows: int = 1,
                     data_rows: int = 1, sampler_steps: int = 10, trained_steps: int = 5,
                     compute_bytes: int = 2, activation_checkpointing: bool = False,
                     cp_attention: str = "ulysses") -> dict[str, int]:
    """Bytes one GPU SENDS per training step for context parallelism (the module docstring's count):
    the rollout (sampler_steps forwards of rollout_rows, no grad) and the update (per trained step a
    forward and backward of the data rows and of the rollout rows). Rows per data rank. Returns
    {"per forward row": ..., "per backward row": ..., "rollout": ..., "update": ..., "step": ...}; all 0
    at context_parallel = 1. cp_attention "ring": per block the K and V blocks travel n_cp - 1 hops
    forward, and again in backward with n_cp hops of their fp32 gradients (torch's ring), instead of
    Ulysses' four all-to-alls. FSDP2's parameter all-gathers and gradient reduce-scatters are not
    counted here."""
    cp = _positive("context_parallel", context_parallel)
    if tokens % cp:
        raise ValueError(f"memory estimate: 'context_parallel' = {cp} must divide the tokens per sample ({tokens:,})")
    _check_cp_attention(cp_attention)
    leave = (cp - 1) / cp
    c, n = compute_bytes, tokens
    block = (n // cp) * model.hidden  # one rank's k (or v, q, out) of one block and row, in values
    gather = leave * n * model.latent_per_token * c  # the output all-gather (backward: its reduce-scatter)
    if cp_attention == "ulysses":
        forward = backward = round(leave * 4 * model.num_blocks * block * c + gather)
    else:
        kv_hops = 2 * (cp - 1) * block * c
        forward = round(model.num_blocks * kv_hops + gather)
        backward = round(model.num_blocks * (kv_hops + 2 * cp * block * 4) + gather)
    rollout = sampler_steps * rollout_rows * forward
    forwards = 2 if activation_checkpointing else 1  # (+ the recomputed forward)
    update = trained_steps * (rollout_rows + data_rows) * (forwards * forward + backward)
    return {"per forward row": forward, "per backward row": backward, "rollout": rollout, "update": update,
            "step": rollout + update}


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




# ---- presets: published transformers' dimensions -----------------------------------------------------

@dataclass(frozen=True)
class Preset:
    """A published model's dimensions. `config` is the diffusers `model_class` config of the public
    checkpoint (`source`: its repository's transformer/config.json); the counts in `shape` were taken
    from that model built on the meta device (tests/test_memory.py rebuilds it and compares).
    `video`: tokens from [frames, H, W] (video_tokens), else from [H, W] (image_tokens). With
    `shape.experts` = 2 the pipeline has two transformers of this config (transformer, transformer_2)."""

    config: dict
    shape: ModelShape
    model_class: str = "WanTransformer3DModel"
    source: str = ""
    video: bool = True

    @property
    def family(self) -> str:
        return {"WanTransformer3DModel": "wan", "SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}[self.model_class]

    def matmuls(self) -> MatmulShape:
        """The matmul weights of one forward (one expert): the throughput estimate's shape."""
        return matmul_shape(self.family, self.config)


def _wan(heads: int, ffn: int, layers: int, params: int, block_params: int, source: str, experts: int = 1) -> Preset:
    config = dict(num_attention_heads=heads, attention_head_dim=128, ffn_dim=ffn, num_layers=layers, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, patch_size=(1, 2, 2))
    return Preset(config, ModelShape(params=experts * params, block_params=block_params, num_blocks=experts * layers,
                                     hidden=heads * 128, ffn_dim=ffn, latent_per_token=64, heads=heads, experts=experts),
                  source=source)


def _sd3(layers: int, heads: int, caption: int, pos_max: int, dual: int, params: int, block_params: int,
         blocks_total: int, source: str) -> Preset:
    config = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64,
                  num_attention_heads=heads, joint_attention_dim=4096, caption_projection_dim=caption,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=pos_max,
                  dual_attention_layers=tuple(range(dual)), qk_norm="rms_norm")
    kinds = tuple((k, n) for k, n in (("sd3_dual", dual), ("sd3", layers - dual)) if n)
    # text tokens through every block: 77 CLIP + 256 T5 (the pipeline's max_sequence_length default)
    shape = ModelShape(params=params, block_params=block_params, num_blocks=layers, hidden=heads * 64, ffn_dim=4 * heads * 64,
                       latent_per_token=64, text_tokens=77 + 256, text_dim=4096, family="sd3", block_kinds=kinds,
                       blocks_total=blocks_total)
    return Preset(config, shape, "SD3Transformer2DModel", source, video=False)


def _flux(guidance_embeds: bool, params: int, source: str) -> Preset:
    config = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                  guidance_embeds=guidance_embeds, axes_dims_rope=(16, 56, 56))
    double, single = 339_831_296, 141_591_808  # one FluxTransformerBlock, one FluxSingleTransformerBlock
    shape = ModelShape(params=params, block_params=double, num_blocks=19 + 38, hidden=3072, ffn_dim=4 * 3072,
                       latent_per_token=64, text_tokens=512, text_dim=4096, family="flux",
                       block_kinds=(("flux_double", 19), ("flux_single", 38)), blocks_total=19 * double + 38 * single)
    return Preset(config, shape, "FluxTransformer2DModel", source, video=False)


PRESETS = {
    # stabilityai/stable-diffusion-3.5-medium, transformer/config.json (MMDiT-X: dual attention in blocks 0-12)
    "sd3.5-medium": _sd3(layers=24, heads=24, caption=1536, pos_max=384, dual=13, params=2_243_171_520,
                         block_params=101_506_944, blocks_total=2_223_694_976,
                         source="stabilityai/stable-diffusion-3.5-medium"),
    # stabilityai/stable-diffusion-3.5-large, transformer/config.json
    "sd3.5-large": _sd3(layers=38, heads=38, caption=2432, pos_max=192, dual=0, params=8_056_627_520,
                        block_params=212_999_680, blocks_total=8_017_073_408,
                        source="stabilityai/stable-diffusion-3.5-large"),
    # black-forest-labs/FLUX.1-dev, transformer/config.json (19 double- and 38 single-stream blocks)
    "flux.1-dev": _flux(guidance_embeds=True, params=11_901_408_320, source="black-forest-labs/FLUX.1-dev"),
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json
    "wan2.1-1.3b": _wan(heads=12, ffn=8960, layers=30, params=1_418_996_800, block_params=46_440_704,
                        source="Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
    # Wan-AI/Wan2.1-T2V-14B-Diffusers, transformer/config.json
    "wan2.1-14b": _wan(heads=40, ffn=13824, layers=40, params=14_288_491_584, block_params=351_394_304,
                       source="Wan-AI/Wan2.1-T2V-14B-Diffusers"),
    # Wan-AI/Wan2.2-T2V-A14B-Diffusers: transformer/ and transformer_2/ (high / low noise), each Wan2.1-14B's
    # config; both are held and trained (WanExpertsPolicy), a row runs one
    "wan2.2-a14b": _wan(heads=40, ffn=13824, layers=40, params=14_288_491_584, block_params=351_394_304,
                        source="Wan-AI/Wan2.2-T2V-A14B-Diffusers", experts=2),
}


def image_tokens(height: int, width: int, *, vae_scale: int = 8, patch: int = 2) -> int:
    """Transformer tokens of one SD3 / FLUX image: the VAE divides H and W by 8, the transformer cuts (SD3) or
    packs (FLUX) 2 x 2 latent patches: (H / 16) (W / 16)."""
    for name, v in (("height", height), ("width", width)):
        _positive(name, v)
    step = vae_scale * patch
    bad = [f"{name} {v}" for name, v in (("height", height), ("width", width)) if v % step]
    if bad:
        raise ValueError(f"memory estimate: image {' and '.join(bad)} must be a multiple of {step} (VAE {vae_scale}x, "
                         f"{patch}x{patch} patches)")
    return (height // step) * (width // step)


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



RESOLUTIONS = {"480p": (81, 480, 832), "720p": (81, 720, 1280)}  # video: frames, height, width
IMAGE_RESOLUTIONS = {"512px": (512, 512), "1024px": (1024, 1024)}  # image: height, width


def preset_tokens(preset: Preset, resolution: str) -> tuple[int, str]:
    """(tokens, a description) of `preset` at a named resolution (RESOLUTIONS for video presets,
    IMAGE_RESOLUTIONS for image ones)."""
    table = RESOLUTIONS if preset.video else IMAGE_RESOLUTIONS
    if resolution not in table:
        what = "video" if preset.video else "image"
        raise ValueError(f"memory estimate: resolution {resolution!r} is not a {what} size; choose one of {sorted(table)}")
    if preset.video:
        frames, height, width = table[resolution]
        return video_tokens(frames, height, width), f"{resolution} {frames}f {width}x{height}"
    height, width = table[resolution]
    return image_tokens(height, width), f"{resolution} {width}x{height}"


def summary_table(world_sizes=(8, 32, 256), **options) -> str:
    """Markdown table of the estimated total per GPU (GiB) for every preset and resolution, without and
    with activation checkpointing; `options` go to estimate_memory (rollout_per_rank, kl_reference, ...)."""
    head = ["model", "size", "tokens", "act. ckpt"] + [f"W={w}" for w in world_sizes]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, preset in PRESETS.items():
        for res in (RESOLUTIONS if preset.video else IMAGE_RESOLUTIONS):
            n, what = preset_tokens(preset, res)
            for ckpt in (False, True):
                totals = [estimate_memory(preset.shape, tokens=n, world_size=w, activation_checkpointing=ckpt,
                                          **options).total / GIB for w in world_sizes]
                cells = [name, what, f"{n:,}", "yes" if ckpt else "no"]
                rows.append("| " + " | ".join(cells + [f"{t:,.1f}" for t in totals]) + " |")
    return "\n".join(rows)


# ---- throughput and the per-model note ----------------------------------------------------------------

def step_plan(*, rollout_per_rank: int = 1, data_per_rank: int = 1, sampler_steps: int = 10, guidance_scale: float = 1.0,
              kl_reference: bool = False, activation_checkpointing: bool = False, trained_steps: int = 5,
              data_loss_steps: str = "all", ppo_epochs: int = 1, recompute_old_logprobs: bool = False,
              **memory_only) -> StepPlan:
    """The StepPlan of the step estimate_memory's options describe (the options only memory uses, such as
    parallel or ema, are ignored here); trained_steps .. recompute_old_logprobs: the throughput's own."""
    return StepPlan(rollout_rows=rollout_per_rank, data_rows=data_per_rank, sampler_nfe=sampler_steps,
                    trained_steps=trained_steps, data_loss_steps=data_loss_steps, guided=guided_rows(guidance_scale) == 2,
                    kl_reference=kl_reference, recompute_old_logprobs=recompute_old_logprobs, ppo_epochs=ppo_epochs,
                    activation_checkpointing=activation_checkpointing)


def throughput_estimate(model: Preset | ModelShape, *, tokens: int, plan: StepPlan, lora_rank: int = 0,
                        mfu: float = DEFAULT_MFU, context_parallel: int = 1) -> dict:
    """FLOPs and time of one step per GPU (ddrl_engine.trainer.throughput): a Preset's exact matmul shape, or
    for a bare ModelShape every block weight on every token plus self-attention (no text tokens).
    Context parallelism splits a data rank's work over its n_cp GPUs (the replicated text side is ignored).
    Returns the phases' FLOPs (per GPU), "forward" (one row), "attention" (its attention part),
    "seconds" at `mfu` of the bf16 peak (H100 and H200 alike) and "samples_per_s" (rollout samples per GPU)."""
    _positive("context_parallel", context_parallel)
    if isinstance(model, Preset):
        mm, text = model.matmuls(), model.shape.text_tokens
    else:
        blocks = model.blocks_total or model.num_blocks * model.block_params
        mm, text = MatmulShape.generic(block_params=blocks // model.experts, hidden=model.hidden,
                                       num_blocks=model.num_blocks // model.experts), 0
    phases = {k: v // context_parallel for k, v in step_flops(mm, tokens=tokens, text_tokens=text, plan=plan,
                                                            lora_rank=lora_rank).items()}
    seconds = step_seconds(phases["step"], mfu=mfu)
    return {"phases": phases, "forward": mm.forward(tokens, text, lora_rank), "attention": mm.attention(tokens, text),
            "seconds": seconds, "samples_per_s": plan.rollout_rows / context_parallel / seconds, "mfu": mfu}


def notes_table(*, world_size: int = 8, lora_rank: int = 32, dtype: str = "bf16", mfu: float = DEFAULT_MFU,
                trained_steps: int = 5, data_loss_steps: str = "all", ppo_epochs: int = 1,
                recompute_old_logprobs: bool = False, **options) -> str:
    """Markdown table, per preset and resolution, of LoRA (rank `lora_rank`) and full fine-tuning at `dtype`:
    memory per GPU (estimate_memory with `options`), whether it fits each of GPUS, TFLOP per step per GPU
    and the step time and rollout samples/s per GPU at the ASSUMED `mfu` (throughput_estimate)."""
    plan = step_plan(trained_steps=trained_steps, data_loss_steps=data_loss_steps, ppo_epochs=ppo_epochs,
                     recompute_old_logprobs=recompute_old_logprobs, **options)
    head = ["model", "size", "tokens", "GPUs", "tuning", "GiB/GPU", *GPUS, "TFLOP/step/GPU", f"s/step @ MFU {mfu:g}",
            "samples/s/GPU"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, preset in PRESETS.items():
        for res in (RESOLUTIONS if preset.video else IMAGE_RESOLUTIONS):
            n, what = preset_tokens(preset, res)
            for rank in (lora_rank, 0):
                total = estimate_memory(preset.shape, tokens=n, world_size=world_size, lora_rank=rank, dtype=dtype,
                                        **options).total
                tp = throughput_estimate(preset, tokens=n, plan=plan, lora_rank=rank, mfu=mfu,
                                         context_parallel=options.get("context_parallel", 1))
                fits = ["yes" if total <= cap else "no" for cap in GPUS.values()]
                cells = [name, what, f"{n:,}", str(world_size), f"LoRA r={rank}" if rank else "full", f"{total / GIB:,.1f}",
                         *fits, f"{tp['phases']['step'] / 1e12:,.0f}", f"{tp['seconds']:,.1f}", f"{tp['samples_per_s']:.2g}"]
                rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
