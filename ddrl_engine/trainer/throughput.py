"""FLOPs and time of one DDRL training step per GPU: an ESTIMATE (a FLOP count from the model's shape,
divided by an ASSUMED model FLOP utilisation times the GPU's peak), not a measurement. No GPU has run
these models here.

One forward of one row (a sample at one noise level; a guided sample is two rows) with N image tokens
and T text tokens. FLOPs are those of the matmuls, 2 per multiply-add (what torch.utils.flop_counter
counts; norms, softmax, rope and elementwise ops are left out):

    F = 2 (W_img N + W_txt T + W_once) + A + F_lora
    A = 4 h (J (N + T)^2 + S N^2 + C N T)        attention: Q K^T and P V over h = heads x head_dim
    F_lora = 2 R (D_img N + D_txt T)              the adapters' two matmuls (x A^T, then B)

W_img = W_img,blocks + W_in + W_out: weights applied to every image token in the blocks, in the patch
embedding and in the output projection; W_txt = W_txt,blocks + W_txt,in per text token (MMDiT text
streams, Wan's cross-attention keys and values; the text embedder); W_once per sample (timestep, pooled
and guidance embedders, the blocks' adaLN modulation). J blocks attend over image and text tokens
together (SD3, FLUX), S attentions cover the image tokens alone (Wan's self-attention, SD3.5's second
attention, our DiT), C are image-to-text cross-attentions (Wan). D_img, D_txt: the sum of (in + out)
of the Linears that the default lora_targets (to_q, to_k, to_v, to_out.0) adapt, applied per image /
text token (`LORA_ADAPTERS`); R the LoRA rank. `matmul_shape` derives every W from a diffusers config.

Backward of the same row (autograd computes only the gradients something trainable needs):

    full fine-tuning  B = 2 F - 2 (W_in N + W_first,txt T + W_first,once)
        every matmul's input and weight gradient, dQ dK dV of attention, except the input gradients of
        the first layers (patch embedding, first Linear of each embedder), whose inputs are data
    LoRA              B = 2 ((W_img,blocks - W_0,img + W_out) N + (W_txt,blocks - W_0,txt) T) + 2 A
                          + 2 F_lora - 2 R (E_img N + E_txt T)
        input gradients only through the frozen weights that have an adapter upstream (none for the
        embedders and the per-sample modulation; W_0: block weights that read the inputs before any
        adapter, block 0's q, k, v projections, and all of Wan's cross-attention k, v, whose input is
        the text); the adapters' input and weight gradients, less the input gradients of the adapters
        that read such inputs (E: their in-features)

Attention's backward is counted as 2 A (model FLOPs; FlashAttention also recomputes Q K^T).
`tests/test_throughput.py` checks F and B against FlopCounterMode on tiny diffusers models and our DiT.

A DDRL step per rank, counted from ddrl_engine/trainer/loop.py (`_collect`, `_UpdatePlan.make`,
`_data_pass`, `_policy_pass`): b_r rollout samples and b_d data samples per rank, g = 2 rows per rollout
sample under classifier-free guidance (both branches in one forward) else 1, K network evaluations of
the sampler chain (sampler.nfe: its steps, one more when the chain does not end at zero noise),
S_t trained steps (algorithm.train_steps: "every_other" = ceil(K / 2); a sampler.sde_window's size),
n_d data steps (S_t with algorithm.data_loss_steps = "all", 1 with "one"; 0 without data loss),
E = algorithm.ppo_epochs:

    rollout          K g b_r F                                    no grad
    old log-probs    S_t g b_r F                                  with rollout.recompute_old_logprobs
    per epoch (x E): data loss      n_d b_d (F + B + F_ckpt)      unguided
                     policy loss    S_t g b_r (F + B + F_ckpt)    guided, as the rollout
                     KL reference   S_t g b_r F                   no grad, when beta_kl > 0

F_ckpt: with activation checkpointing each block's forward runs again in backward, 2 (W_img,blocks N +
W_txt,blocks T + W_once,blocks) + A + F_lora (`MatmulShape.blocks_forward`). Two-expert Wan2.2 runs one
expert per row: F is one expert's. Not counted: rewards (VAE decode, reward models), evaluation,
optimizer and EMA updates, FSDP2 / context-parallel communication and CPU overheads.

Time: seconds per step = step FLOPs per GPU / (MFU x peak); samples/s per GPU = b_r / that. The MFU is
an ASSUMPTION (`DEFAULT_MFU`), not a measured figure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Mapping

# bf16 dense tensor-core peaks in TFLOP/s: NVIDIA's H100 SXM and H200 SXM datasheets list 1,979 TFLOP/s
# bf16 "with sparsity", i.e. 989 dense; the H200 has the H100's compute (more and faster memory).
PEAK_TFLOPS = {"H100 SXM": 989.0, "H200 SXM": 989.0}
# An assumption: 0.4 x 989 = 396 TFLOP/s, half the ~790 TFLOP/s practical bf16 matmul ceiling the project
# works to (tools/bench_attention.py; quoted, not measured here).
DEFAULT_MFU = 0.4

# Linears the default lora_targets adapt, per block kind: (adapted Linears, of them run on the image tokens,
# run on the text tokens). Every one is hidden -> hidden, so it adds R (h + h) parameters.
LORA_ADAPTERS = {"wan": (8, 6, 2),          # attn1 q, k, v, out, attn2 q, out on image tokens; attn2 k, v on text
                 "sd3": (4, 4, 0),          # attn q, k, v, out (the text stream's add_* projections are not targets)
                 "sd3_dual": (8, 8, 0),     # + attn2 q, k, v, out
                 "flux_double": (4, 4, 0),
                 "flux_single": (3, 3, 3),  # q, k, v over the joint sequence (no to_out: proj_out is the block's)
                 "dit": (0, 0, 0)}          # our DiT has no LoRA
FAMILIES = ("wan", "sd3", "flux", "dit")


@dataclass(frozen=True)
class MatmulShape:
    """The matmul weights of one forward, by what they multiply (module docstring's notation; all in
    multiply-adds per token or per sample). `lora_*` count (in + out) per token of the adapted Linears;
    `frozen_*` are W_0, `lora_frozen_*` E; `first_*` the embedders' first layers."""

    hidden: int
    image_blocks: int
    image_in: int = 0
    image_out: int = 0
    text_blocks: int = 0
    text_in: int = 0
    text_first: int = 0
    once_blocks: int = 0
    once_in: int = 0
    once_first: int = 0
    joint: int = 0
    self_attn: int = 0
    cross: int = 0
    lora_image: int = 0
    lora_text: int = 0
    frozen_image: int = 0
    frozen_text: int = 0
    lora_frozen_image: int = 0
    lora_frozen_text: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if f.name == "hidden" else 0):
                raise ValueError(f"throughput estimate: 'MatmulShape.{f.name}' must be an integer >= "
                                 f"{1 if f.name == 'hidden' else 0}, got {v!r}")

    def attention(self, tokens: int, text_tokens: int) -> int:
        n, t = tokens, text_tokens
        return 4 * self.hidden * (self.joint * (n + t) ** 2 + self.self_attn * n * n + self.cross * n * t)

    def lora(self, tokens: int, text_tokens: int, rank: int) -> int:
        return 2 * rank * (self.lora_image * tokens + self.lora_text * text_tokens)

    def forward(self, tokens: int, text_tokens: int, rank: int = 0) -> int:
        """F: FLOPs of one forward of one row."""
        n, t = tokens, text_tokens
        mm = ((self.image_blocks + self.image_in + self.image_out) * n + (self.text_blocks + self.text_in) * t
              + self.once_blocks + self.once_in)
        return 2 * mm + self.attention(n, t) + self.lora(n, t, rank)

    def blocks_forward(self, tokens: int, text_tokens: int, rank: int = 0) -> int:
        """F_ckpt: the blocks' part of F (what activation checkpointing recomputes)."""
        n, t = tokens, text_tokens
        return (2 * (self.image_blocks * n + self.text_blocks * t + self.once_blocks) + self.attention(n, t)
                + self.lora(n, t, rank))

    def backward(self, tokens: int, text_tokens: int, rank: int = 0) -> int:
        """B: FLOPs of the backward of one row (full fine-tuning at rank 0, else LoRA)."""
        n, t = tokens, text_tokens
        if rank == 0:
            return 2 * self.forward(n, t) - 2 * (self.image_in * n + self.text_first * t + self.once_first)
        base = (self.image_blocks - self.frozen_image + self.image_out) * n + (self.text_blocks - self.frozen_text) * t
        skipped = 2 * rank * (self.lora_frozen_image * n + self.lora_frozen_text * t)
        return 2 * base + 2 * self.attention(n, t) + 2 * self.lora(n, t, rank) - skipped

    @classmethod
    def generic(cls, *, block_params: int, hidden: int, num_blocks: int) -> "MatmulShape":
        """A model known only by its counts: every block weight applied to every token, self-attention per block."""
        return cls(hidden=hidden, image_blocks=block_params, self_attn=num_blocks)


def _get(config: Mapping, key: str, family: str):
    value = config.get(key) if hasattr(config, "get") else getattr(config, key, None)
    if value is None:
        raise ValueError(f"throughput estimate: the {family} config lacks '{key}'")
    return value


def _lora_dims(h: int, blocks: dict[str, int], which: int) -> int:
    """Sum of (in + out) = 2 h per adapter, over `blocks` (kind -> count); which: 1 image tokens, 2 text tokens."""
    return 2 * h * sum(n * LORA_ADAPTERS[kind][which] for kind, n in blocks.items())


def matmul_shape(family: str, config: Mapping) -> MatmulShape:
    """The MatmulShape of one transformer (one expert) from its diffusers config (a dict or model.config:
    Wan, SD3, FLUX) or, for family "dit", a DiTConfig as a dict. Text-to-video / text-to-image variants only."""
    if family not in FAMILIES:
        raise ValueError(f"throughput estimate: 'family' must be one of {FAMILIES}, got {family!r}")
    g = lambda key: _get(config, key, family)  # noqa: E731
    def opt(key, default=None):
        return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)

    if family == "dit":
        h, layers, patch = g("hidden"), g("depth"), g("in_channels") * math.prod(g("patch_size"))
        m, freq = int(h * g("mlp_ratio")), g("timestep_freq_dim")
        return MatmulShape(hidden=h, image_blocks=layers * (4 * h * h + 2 * h * m), image_in=patch * h,
                           image_out=h * patch, once_blocks=layers * 6 * h * h, once_in=freq * h + h * h + 2 * h * h,
                           once_first=freq * h, self_attn=layers)
    h = g("num_attention_heads") * g("attention_head_dim")
    if family == "wan":
        if opt("image_dim") is not None or opt("added_kv_proj_dim") is not None:
            raise ValueError("throughput estimate: Wan image-to-video models (image_dim / added_kv_proj_dim) are not "
                             "modelled")
        layers, f, p = g("num_layers"), g("ffn_dim"), math.prod(g("patch_size"))
        # per block: self-attention q, k, v, out and cross-attention q, out (6 h^2) and the FFN on image tokens,
        # cross-attention k, v on the text tokens; per sample the timestep MLP and its 6h projection
        return MatmulShape(hidden=h, image_blocks=layers * (6 * h * h + 2 * h * f), image_in=g("in_channels") * p * h,
                           image_out=h * g("out_channels") * p, text_blocks=layers * 2 * h * h,
                           text_in=g("text_dim") * h + h * h, text_first=g("text_dim") * h,
                           once_in=g("freq_dim") * h + h * h + h * 6 * h, once_first=g("freq_dim") * h,
                           self_attn=layers, cross=layers, lora_image=_lora_dims(h, {"wan": layers}, 1),
                           lora_text=_lora_dims(h, {"wan": layers}, 2), frozen_image=3 * h * h,
                           frozen_text=layers * 2 * h * h, lora_frozen_image=3 * h, lora_frozen_text=layers * 2 * h)
    if family == "sd3":
        layers, p = g("num_layers"), g("patch_size") ** 2
        if g("caption_projection_dim") != h:
            raise ValueError(f"throughput estimate: SD3 caption_projection_dim ({g('caption_projection_dim')}) must equal "
                             f"heads x head_dim ({h})")
        dual = sorted(set(opt("dual_attention_layers") or ()) & set(range(layers)))
        out = opt("out_channels") or g("in_channels")
        # per block: image q, k, v, out + FFN 4h (12 h^2); text the same except the last block (q, k, v only);
        # modulation: AdaLayerNormZero 6h (SD3.5's dual: 9h) + the text's 6h (the last block's continuous 2h)
        once_blocks = sum(9 if i in dual else 6 for i in range(layers)) * h * h + ((layers - 1) * 6 + 2) * h * h
        block0 = 6 if 0 in dual else 3  # block 0's q, k, v (and attn2's) read the patch embedding
        pooled = g("pooled_projection_dim")
        return MatmulShape(hidden=h, image_blocks=(12 * layers + 4 * len(dual)) * h * h,
                           image_in=g("in_channels") * p * h, image_out=h * p * out,
                           text_blocks=(12 * (layers - 1) + 3) * h * h, text_in=g("joint_attention_dim") * h,
                           text_first=g("joint_attention_dim") * h, once_blocks=once_blocks,
                           # timestep MLP 256 -> h -> h, pooled MLP -> h -> h, the output norm's 2h
                           once_in=256 * h + h * h + pooled * h + h * h + 2 * h * h, once_first=256 * h + pooled * h,
                           joint=layers, self_attn=len(dual),
                           lora_image=_lora_dims(h, {"sd3_dual": len(dual), "sd3": layers - len(dual)}, 1),
                           frozen_image=block0 * h * h, frozen_text=3 * h * h, lora_frozen_image=block0 * h)
    # flux: double-stream blocks (image and text streams, 12 h^2 each) then single-stream blocks (q, k, v, the
    # 4h MLP and the joint output projection: 12 h^2 per token of the joint sequence)
    double, single = g("num_layers"), g("num_single_layers")
    guidance = bool(opt("guidance_embeds", False))
    out = opt("out_channels") or g("in_channels")
    p = g("patch_size") ** 2
    embedders = (1 + guidance) * (256 * h + h * h) + g("pooled_projection_dim") * h + h * h  # timestep, guidance, pooled
    first = (1 + guidance) * 256 * h + g("pooled_projection_dim") * h
    first_block = 3 if double else 7  # q, k, v (a single-stream block also its MLP) read the embeddings
    blocks = {"flux_double": double, "flux_single": single}
    return MatmulShape(hidden=h, image_blocks=12 * (double + single) * h * h, image_in=g("in_channels") * h,
                       image_out=h * p * out, text_blocks=12 * (double + single) * h * h,
                       text_in=g("joint_attention_dim") * h, text_first=g("joint_attention_dim") * h,
                       once_blocks=(12 * double + 3 * single) * h * h, once_in=embedders + 2 * h * h, once_first=first,
                       joint=double + single, lora_image=_lora_dims(h, blocks, 1), lora_text=_lora_dims(h, blocks, 2),
                       frozen_image=first_block * h * h, frozen_text=first_block * h * h,
                       lora_frozen_image=3 * h, lora_frozen_text=0 if double else 3 * h)


# ---- one DDRL step -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepPlan:
    """What one DDRL step runs per rank (module docstring): rows per rank, the chain, the update's shape."""

    rollout_rows: int = 1            # b_r: rollout samples per rank
    data_rows: int = 1               # b_d: data samples per rank (0: no data loss)
    sampler_nfe: int = 10            # K: network evaluations of one chain (sampler.nfe)
    trained_steps: int = 5           # S_t
    data_loss_steps: str = "all"     # algorithm.data_loss_steps
    guided: bool = False             # rollout.guidance_scale not 0 or 1
    kl_reference: bool = False       # algorithm.beta_kl > 0
    recompute_old_logprobs: bool = False
    ppo_epochs: int = 1
    activation_checkpointing: bool = False
    policy_loss: bool = True         # algorithm.use_reward (False: sft, data loss only)

    def __post_init__(self) -> None:
        for name, minimum in (("rollout_rows", 0), ("data_rows", 0), ("sampler_nfe", 1), ("trained_steps", 1),
                              ("ppo_epochs", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"throughput estimate: '{name}' must be an integer >= {minimum}, got {v!r}")
        if self.data_loss_steps not in ("all", "one"):
            raise ValueError(f"throughput estimate: 'data_loss_steps' must be 'all' or 'one', got {self.data_loss_steps!r}")
        if self.trained_steps > self.sampler_nfe:
            raise ValueError(f"throughput estimate: 'trained_steps' ({self.trained_steps}) exceeds the sampler's "
                             f"network evaluations ({self.sampler_nfe})")
        if self.rollout_rows + self.data_rows == 0:
            raise ValueError("throughput estimate: 'rollout_rows' + 'data_rows' must be >= 1")


def step_flops(shape: MatmulShape, *, tokens: int, text_tokens: int, plan: StepPlan, lora_rank: int = 0) -> dict[str, int]:
    """FLOPs per rank of one DDRL step by phase (module docstring): rollout, old log-probs, data loss,
    policy loss, KL reference, and their sum "step" (the per-epoch phases already times ppo_epochs)."""
    for name, value, minimum in (("tokens", tokens, 1), ("text_tokens", text_tokens, 0), ("lora_rank", lora_rank, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"throughput estimate: '{name}' must be an integer >= {minimum}, got {value!r}")
    fwd = shape.forward(tokens, text_tokens, lora_rank)
    train = fwd + shape.backward(tokens, text_tokens, lora_rank)
    if plan.activation_checkpointing:
        train += shape.blocks_forward(tokens, text_tokens, lora_rank)
    g = 2 if plan.guided else 1
    policy_rows = plan.trained_steps * g * plan.rollout_rows if plan.policy_loss or plan.kl_reference else 0
    n_data = (plan.trained_steps if plan.data_loss_steps == "all" else 1) if plan.data_rows else 0
    e = plan.ppo_epochs
    out = {"rollout": plan.sampler_nfe * g * plan.rollout_rows * fwd,
           "old log-probs": plan.trained_steps * g * plan.rollout_rows * fwd if plan.recompute_old_logprobs else 0,
           "data loss": e * n_data * plan.data_rows * train,
           "policy loss": e * policy_rows * train,
           "KL reference": e * policy_rows * fwd if plan.kl_reference else 0}
    out["step"] = sum(out.values())
    return out


def step_seconds(flops: int, *, mfu: float = DEFAULT_MFU, peak_tflops: float = PEAK_TFLOPS["H100 SXM"]) -> float:
    """Seconds for `flops` at an assumed model FLOP utilisation `mfu` of a peak of `peak_tflops`."""
    if isinstance(mfu, bool) or not isinstance(mfu, (int, float)) or not 0 < mfu <= 1:
        raise ValueError(f"throughput estimate: 'mfu' must be a number in (0, 1], got {mfu!r}")
    if not peak_tflops > 0:
        raise ValueError(f"throughput estimate: 'peak_tflops' must be > 0, got {peak_tflops!r}")
    return flops / (mfu * peak_tflops * 1e12)
