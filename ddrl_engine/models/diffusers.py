"""diffusers transformers as flow-matching policies: SD3 / SD3.5, FLUX.1 and Wan2.1/2.2.

Each adapter wraps one diffusers model (`SD3Transformer2DModel`, `FluxTransformer2DModel`,
`WanTransformer3DModel`) behind our `Policy` interface, `policy(x, t, cond) -> velocity`:

    x: [B, C, H, W] (SD3, FLUX: latents before FLUX's 2x2 packing) or [B, C, T, H, W] (Wan).
    t: [B] (or 0-dim) rectified-flow level in [0, 1], 1 = pure noise; mapped to each model's own
       timestep convention (SD3 and Wan: t * 1000; FLUX: t, the model scales by 1000 itself).
    returns: the velocity eps - x0 (the convention of these models and of `RectifiedFlowSDE`), with
       the shape and dtype of x (the model may run in another dtype, e.g. bf16).

Conditions. Text encoders are not run here: conditions are precomputed text embeddings, in a
`TextCondition` (embeds [B, L, D], pooled [B, P] for SD3/FLUX, guidance [B] for guidance-distilled
FLUX). `cond` may be
  - a `TextCondition` (or, for Wan, a bare [B, L, D] embedding tensor), used as is; or
  - a long tensor [B] of prompt ids into the adapter's prompt bank (`prompts=` at construction or
    `set_prompts`): a `TextCondition` of N + 1 rows whose last row is the empty prompt, so
    `num_classes = N` and `null_class` is the unconditional prompt, exactly as for our DiT. This is
    the form the rollout and training code use (they need `cond` to be a 1-D tensor they can index,
    repeat and copy into CUDA-graph buffers).
Both are indexable along batch dim 0 (`TextCondition.__getitem__`).

Attention. `use_ddrl_attention()` (on by default) installs `DDRLAttnProcessor` around each
attention module's own processor: the processor's softmax attention is routed to
`ddrl_engine.attention.attention`, so `with attention_backend("fp8"): policy(x, t, cond)` runs the
rollout's attention in fp8. Only the diffusers "native" attention backend (which calls
`F.scaled_dot_product_attention`) can be routed; a processor that computes attention another way
raises instead of silently bypassing our backends.

Distribution. `policy.blocks` lists the transformer blocks (SD3: transformer_blocks; FLUX: the
double- then single-stream blocks; Wan: blocks), the units FSDP2 shards one by one and activation
checkpointing recomputes (ddrl_engine.trainer.distributed). Context parallelism ([distributed]
context_parallel = N): `policy.set_context_parallel(group)` shards each sample's image / video tokens
over a cp group (forward hooks split them after the patch embedding and gather them before
unpatchify; the self-attentions run through the Ulysses all-to-all; SD3's and FLUX's joint text + image
attentions keep the text replicated and give each rank its heads of it).

Two-expert Wan2.2 (A14B). `WanExpertsPolicy` holds `transformer` (high noise) and `transformer_2` (low
noise) and routes each row by its level as WanPipeline does (boundary_ratio * num_train_timesteps).

LoRA. `enable_lora(rank=..., alpha=..., target_modules=..., seed=...)` adds peft LoRA adapters and
freezes every other parameter (with a seed, the adapter does not depend on the global RNG); the
adapters of a bf16 / fp16 base are fp32, as peft's get_peft_model makes them (autocast_adapter_dtype).
`trainable_state_dict()` / `load_trainable_state_dict(sd)` are the adapter tensors alone (the whole
state dict without LoRA); `ddrl_engine.models.lora_export` writes them for `pipe.load_lora_weights`.

Loading. `SD3Policy.from_pretrained(path, ...)` (and the others) read a local directory only
(`local_files_only=True`, never the hub); a missing path or a missing diffusers package raise with
the cause and the fix. diffusers and peft are optional: `pip install ddrl-engine[diffusers]`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..attention import attention
from ..attention.context_parallel import check_context_parallel, gather_sequence, split_sequence, ulysses_attention
from .policy import Policy
from .trainable import upcast_trained

__all__ = [
    "DDRLAttnProcessor",
    "check_ring_applies",
    "DiffusersPolicy",
    "FluxPolicy",
    "JointText",
    "SD3Policy",
    "TextCondition",
    "WanExpertsPolicy",
    "WanPolicy",
    "require_diffusers",
]

_INSTALL_HINT = "install the optional dependencies with `pip install ddrl-engine[diffusers]` (diffusers, peft)"


def require_diffusers():
    """The diffusers module, or an ImportError saying how to install it."""
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - exercised only without diffusers
        raise ImportError(f"ddrl_engine.models.diffusers needs the `diffusers` package: {_INSTALL_HINT}") from e
    return diffusers


# ----------------------------------------------------------------------------------------------- conditions


@dataclass
class TextCondition:
    """Precomputed text conditioning of a batch (all tensors share batch dim 0).

    embeds: [B, L, D] token embeddings (SD3: joint CLIP+T5, D = joint_attention_dim; FLUX: T5;
        Wan: umT5, D = text_dim).
    pooled: [B, P] pooled embedding (SD3, FLUX: pooled_projection_dim); None for Wan.
    guidance: [B] guidance scale for guidance-distilled FLUX (guidance_embeds=True); else None.
    """

    embeds: Tensor
    pooled: Optional[Tensor] = None
    guidance: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if not isinstance(self.embeds, Tensor) or self.embeds.dim() != 3:
            raise ValueError(f"TextCondition.embeds must be a [B, L, D] tensor, got {getattr(self.embeds, 'shape', type(self.embeds))}")
        b = self.embeds.shape[0]
        if self.pooled is not None and (not isinstance(self.pooled, Tensor) or self.pooled.dim() != 2 or self.pooled.shape[0] != b):
            raise ValueError(f"TextCondition.pooled must be a [B={b}, P] tensor, got {getattr(self.pooled, 'shape', type(self.pooled))}")
        if self.guidance is not None and (not isinstance(self.guidance, Tensor) or self.guidance.shape != (b,)):
            raise ValueError(f"TextCondition.guidance must be a [B={b}] tensor, got {getattr(self.guidance, 'shape', type(self.guidance))}")

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn) -> "TextCondition":
        return TextCondition(fn(self.embeds), None if self.pooled is None else fn(self.pooled),
                             None if self.guidance is None else fn(self.guidance))

    def __getitem__(self, index: Any) -> "TextCondition":
        """Rows `index` (an int keeps the batch dim); index may be a slice, a list or a long/bool tensor."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return self._map(lambda t: t[index.to(t.device) if isinstance(index, Tensor) else index])

    def repeat_interleave(self, repeats: int) -> "TextCondition":
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def to(self, *args, **kwargs) -> "TextCondition":
        """Like Tensor.to, for every tensor (a dtype applies to the floating ones only, i.e. all of them)."""
        return self._map(lambda t: t.to(*args, **kwargs))

    @staticmethod
    def cat(conds: Sequence["TextCondition"]) -> "TextCondition":
        first = conds[0]
        return TextCondition(torch.cat([c.embeds for c in conds]),
                             None if first.pooled is None else torch.cat([c.pooled for c in conds]),
                             None if first.guidance is None else torch.cat([c.guidance for c in conds]))


# ----------------------------------------------------------------------------------------------- attention


@dataclass
class JointText:
    """Where a joint attention's replicated text tokens sit in q, k, v under context parallelism: the
    first (`first`, FLUX) or last (SD3) `length` tokens. One per policy, shared by its processors; the
    policy sets `length` (the condition's token count) at each forward."""

    first: bool
    length: int = 0


class _RouteSDPA(TorchFunctionMode):
    """Inside a processor call: F.scaled_dot_product_attention -> ddrl_engine.attention.attention (with
    `cp_group`: q, k, v hold this rank's tokens, attended through the Ulysses all-to-all or the ring
    (`cp_attention`); with `cp_text` too, the joint text + image form of Ulysses)."""

    def __init__(self, cp_group=None, cp_text: Optional[JointText] = None, cp_attention: str = "ulysses") -> None:
        super().__init__()
        self.calls = 0
        self.cp_group, self.cp_text, self.cp_attention = cp_group, cp_text, cp_attention

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        a = dict(zip(names, args), **kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        unsupported = []
        if a.get("attn_mask") is not None:
            unsupported.append("attn_mask")
        if a.get("dropout_p", 0.0):
            unsupported.append(f"dropout_p={a['dropout_p']}")
        if a.get("is_causal", False):
            unsupported.append("is_causal=True")
        if a.get("enable_gqa", False) and q.shape[1] != k.shape[1]:
            unsupported.append("grouped-query attention")
        if unsupported:
            raise NotImplementedError(
                f"DDRLAttnProcessor: ddrl_engine attention does not support {', '.join(unsupported)}; "
                "call policy.use_ddrl_attention(False) to run this model with diffusers' own attention"
            )
        self.calls += 1
        scale = a.get("scale")
        if self.cp_group is not None and self.cp_text is not None:
            return ulysses_attention(q, k, v, self.cp_group, lambda q_, k_, v_: attention(q_, k_, v_, scale=scale),
                                     text_tokens=self.cp_text.length, text_first=self.cp_text.first)
        return attention(q, k, v, scale=scale, cp_group=self.cp_group, cp_attention=self.cp_attention)


class DDRLAttnProcessor:
    """Wraps a diffusers attention processor so its attention goes through `ddrl_engine.attention`.

    The wrapped processor keeps doing the projections, norms, rotary embeddings and output
    projections; only its `F.scaled_dot_product_attention` call (the diffusers "native" backend) is
    routed, for the duration of the call (a `TorchFunctionMode`; nothing is patched globally). If the
    processor ran without calling it (another diffusers attention backend, a custom kernel), the call
    raises rather than silently bypassing our backend.

    cp_group (context parallelism; set on self-attention only, by `DiffusersPolicy.set_context_parallel`):
    the module's image tokens are sharded over this process group, and the routed call attends over the
    whole sequence through `ulysses_attention` (all-to-all sequence <-> heads around the backend) or
    `ring_attention`;
    cp_text: the replicated text tokens of a joint attention (SD3, FLUX), None when there are none;
    cp_attention: "ulysses" or "ring" (torch's ring; self-attention without text only).
    """

    def __init__(self, inner: Any, cp_group=None, cp_text: Optional[JointText] = None,
                 cp_attention: str = "ulysses") -> None:
        if isinstance(inner, DDRLAttnProcessor):
            inner = inner.inner
        self.inner = inner
        self.cp_group, self.cp_text, self.cp_attention = cp_group, cp_text, cp_attention

    def __call__(self, attn, *args, **kwargs):
        route = _RouteSDPA(self.cp_group, self.cp_text, self.cp_attention)
        with route:
            out = self.inner(attn, *args, **kwargs)
        if route.calls == 0:
            raise RuntimeError(
                f"DDRLAttnProcessor: {type(self.inner).__name__} computed attention without "
                "F.scaled_dot_product_attention (is a non-native diffusers attention backend set?), so "
                "ddrl_engine's attention backend was not used"
            )
        return out

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def for_class(inner_cls: type) -> type:
        """A subclass whose `__call__` advertises `inner_cls.__call__`'s signature: diffusers' attention
        modules inspect the processor's signature to decide which keyword arguments to pass."""

        def __call__(self, attn, *args, **kwargs):
            return DDRLAttnProcessor.__call__(self, attn, *args, **kwargs)

        __call__.__signature__ = inspect.signature(inner_cls.__call__)
        return type(f"DDRL{inner_cls.__name__}", (DDRLAttnProcessor,), {"__call__": __call__})

    @classmethod
    def wrap(cls, inner: Any, cp_group=None, cp_text: Optional[JointText] = None,
             cp_attention: str = "ulysses") -> "DDRLAttnProcessor":
        """`inner` routed through ddrl_engine.attention; an already wrapped processor is kept as it is
        unless a cp_group is given (then its inner processor is rewrapped with that group)."""
        if isinstance(inner, DDRLAttnProcessor):
            if cp_group is None:
                return inner
            inner = inner.inner
        return cls.for_class(type(inner))(inner, cp_group, cp_text, cp_attention)


# ----------------------------------------------------------------------------------------------- policies


def check_ring_applies(policy_class: type, attention: str, size: int) -> None:
    """A ValueError naming the field when `attention` = "ring" is asked of a policy class whose model
    attends jointly over text + image (SD3, FLUX: the ring would count the replicated text N times)."""
    if size > 1 and attention == "ring" and getattr(policy_class, "cp_text_first", None) is not None:
        from ..attention.ring import RING_ATTENTION_ERROR

        raise ValueError(f"{RING_ATTENTION_ERROR}: {policy_class.__name__}'s joint text + image attention needs "
                         "distributed.context_parallel_attention = 'ulysses'")


def _check_dir(path: Union[str, os.PathLike], what: str) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{what}: no model directory at {path!r}. Weights are read from a local directory only (no hub "
            "download at run time); download them beforehand (e.g. `huggingface-cli download <repo> "
            "--include 'transformer/*' --local-dir DIR`) and pass DIR/transformer"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{what}: {path!r} has no config.json; pass the transformer's own folder "
                                "(e.g. <pipeline>/transformer), the one save_pretrained writes")
    return path


class DiffusersPolicy(Policy):
    """Base of the diffusers adapters (see the module docstring for the x / t / cond contract).

    Subclasses set `model_class_name` and implement `_velocity(x, t, cond: TextCondition)` with x in
    the model's dtype and t in [0, 1].
    """

    model_class_name: str = ""
    # Attributes of the diffusers model holding its transformer blocks, in execution order.
    block_attrs: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, sample_shape: Sequence[int], prompts: Optional[TextCondition] = None,
                 *, ddrl_attention: bool = True) -> None:
        num_prompts = 0 if prompts is None else len(prompts) - 1
        if prompts is not None and num_prompts < 0:
            raise ValueError("prompts must hold at least the empty prompt (its last row)")
        super().__init__(sample_shape, num_prompts)
        cls = getattr(require_diffusers(), self.model_class_name)
        if not isinstance(model, cls):
            raise TypeError(f"{type(self).__name__} wraps a diffusers {self.model_class_name}, got {type(model).__name__}")
        self.model = model
        self._prompts: Optional[TextCondition] = None
        if prompts is not None:
            self.set_prompts(prompts)
        self.use_ddrl_attention(ddrl_attention)

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], sample_shape: Sequence[int],
                        prompts: Optional[TextCondition] = None, *, torch_dtype: Optional[torch.dtype] = None,
                        ddrl_attention: bool = True, **kwargs) -> "DiffusersPolicy":
        """Loads the transformer from a local directory (the folder holding its config.json)."""
        model_cls = getattr(require_diffusers(), cls.model_class_name)
        path = _check_dir(path, f"{cls.__name__}.from_pretrained")
        model = model_cls.from_pretrained(path, local_files_only=True, torch_dtype=torch_dtype, **kwargs)
        return cls(model, sample_shape, prompts, ddrl_attention=ddrl_attention)

    def save_pretrained(self, path: Union[str, os.PathLike], **kwargs) -> None:
        """Writes the transformer (config.json + safetensors) so `from_pretrained(path)` reloads it.
        With LoRA enabled use `ddrl_engine.models.lora_export.export_lora` instead (this would write the
        base and the adapters under peft's names, which from_pretrained does not read back as such)."""
        self.model.save_pretrained(os.fspath(path), safe_serialization=True, **kwargs)

    @property
    def blocks(self) -> list[nn.Module]:
        """The model's transformer blocks, in execution order: the units `Distributed.fully_shard` shards
        one by one and `checkpoint_blocks` recomputes (without them the model is sharded as one unit)."""
        return [block for attr in self.block_attrs for block in getattr(self.model, attr)]

    # -- prompts -------------------------------------------------------------------------------------------

    def set_prompts(self, prompts: TextCondition) -> None:
        """The prompt bank that long `cond` ids index: N prompts then the empty prompt (row N)."""
        if not isinstance(prompts, TextCondition):
            raise TypeError(f"prompts must be a TextCondition, got {type(prompts).__name__}")
        if len(prompts) - 1 != self.num_classes:
            raise ValueError(f"prompts must keep {self.num_classes + 1} rows (num_classes + the empty prompt), got {len(prompts)}")
        self._prompts, self._bank = prompts, None

    def set_prompt_bank(self, bank) -> None:
        """Prompt ids resolved from an on-disk bank instead of a bank held on the device: `bank` has
        `gather(ids, device) -> {"embeds": [B, L, D], "pooled"?: [B, P], "guidance"?: [B]}` and
        `len(bank)` = N + 1 rows (N prompts, then the empty prompt), e.g. `ddrl_engine.data.PromptBank`.
        Device memory then follows the batch, not the number of prompts. The rows of the last batch are
        kept, so the K forwards of one rollout read them once (a host read per new batch: not for
        CUDA-graph capture)."""
        if not callable(getattr(bank, "gather", None)):
            raise TypeError(f"set_prompt_bank: the bank must have gather(ids, device), got {type(bank).__name__}")
        self.num_classes = len(bank) - 1
        self._prompts, self._bank, self._bank_last = None, bank, None

    def _from_bank(self, cond: Tensor, device) -> TextCondition:
        key = (tuple(cond.tolist()), str(device))
        if self._bank_last is None or self._bank_last[0] != key:
            rows = self._bank.gather(cond.cpu(), device=device)
            self._bank_last = (key, TextCondition(rows["embeds"], rows.get("pooled"), rows.get("guidance")))
        return self._bank_last[1]

    def resolve_cond(self, cond: Union[Tensor, TextCondition], batch: int, device: torch.device) -> TextCondition:
        """cond as a TextCondition of `batch` rows on `device` (see the module docstring)."""
        if isinstance(cond, Tensor) and cond.dtype == torch.long and getattr(self, "_bank", None) is not None:
            if cond.shape != (batch,):
                raise ValueError(f"cond must have shape [B]=[{batch}], got {tuple(cond.shape)}")
            cond = self._from_bank(cond, device)
        elif isinstance(cond, Tensor) and cond.dtype == torch.long:
            if self._prompts is None:
                raise ValueError(f"{type(self).__name__}: cond holds prompt ids but no prompt bank was set "
                                 "(pass prompts= or call set_prompts, or pass a TextCondition)")
            if cond.shape != (batch,):
                raise ValueError(f"cond must have shape [B]=[{batch}], got {tuple(cond.shape)}")
            if self._prompts.embeds.device != torch.device(device):  # moved once, not per forward
                self._prompts = self._prompts.to(device)
            cond = self._prompts[cond.to(device)]
        elif isinstance(cond, Tensor) and cond.is_floating_point():
            cond = TextCondition(cond)
        if not isinstance(cond, TextCondition):
            raise TypeError(f"cond must be a long tensor of prompt ids, a TextCondition or a [B, L, D] embedding tensor, "
                            f"got {getattr(cond, 'dtype', type(cond))}")
        if len(cond) != batch:
            raise ValueError(f"cond has {len(cond)} rows but x has batch {batch}")
        return cond.to(device)

    # -- attention and LoRA --------------------------------------------------------------------------------

    @property
    def experts(self) -> tuple[nn.Module, ...]:
        """The diffusers models this policy runs: (model,) here; (model, model_2) for two-expert Wan2.2."""
        return (self.model,)

    def use_ddrl_attention(self, enabled: bool = True) -> None:
        """Route every attention module's attention through ddrl_engine.attention (or restore diffusers')."""
        if not enabled and getattr(self, "_cp_group", None) is not None:
            raise ValueError(f"{type(self).__name__}.use_ddrl_attention(False): under context parallelism "
                             "(distributed.context_parallel > 1) the self-attention runs through ddrl_engine's "
                             "Ulysses all-to-all; call set_context_parallel(None) first")
        for model in self.experts:
            procs = model.attn_processors
            if enabled:
                new = {name: DDRLAttnProcessor.wrap(p) for name, p in procs.items()}
            else:
                new = {name: p.inner if isinstance(p, DDRLAttnProcessor) else p for name, p in procs.items()}
            model.set_attn_processor(new)

    @property
    def ddrl_attention(self) -> bool:
        procs = [p for model in self.experts for p in model.attn_processors.values()]
        return bool(procs) and all(isinstance(p, DDRLAttnProcessor) for p in procs)

    @property
    def lora_enabled(self) -> bool:
        return any(bool(getattr(model, "peft_config", None)) for model in self.experts)

    @staticmethod
    def expert_seed(seed: int, index: int) -> int:
        """The LoRA seed of expert `index`: `seed` itself for the first (so a one-transformer policy is
        unchanged), a distinct 63-bit value derived from (seed, index) for the others."""
        if index == 0:
            return seed
        return (seed * 1_000_003 + 7919 * index) % (2 ** 63)

    def enable_lora(self, rank: int = 16, alpha: Optional[float] = None,
                    target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
                    adapter_name: str = "default", seed: Optional[int] = None,
                    autocast_adapter_dtype: bool = True) -> int:
        """Adds peft LoRA adapters (rank, alpha = rank by default) to `target_modules` and freezes all
        other parameters; returns the number of trainable parameters.

        autocast_adapter_dtype (peft's get_peft_model flag of the same name and default): adapters of a
        bf16 / fp16 base are made fp32, so AdamW steps fp32 values (on bf16 adapters most updates round
        away: lora_A's entries are ~1/sqrt(h), whose bf16 resolution exceeds an lr 1e-4 step; measured in
        tests/test_lora.py). peft then runs each adapter in fp32 on an fp32 copy of its input
        (more activation memory, trainer.memory); FSDP2's MixedPrecisionPolicy computes them in bf16 on
        CUDA. False keeps peft's add_adapter behaviour: adapters in the base's dtype.

        seed: None keeps peft's initialisation, which draws lora_A from the global RNG in whatever state
        it is. With a seed, the adapter is a function of (model structure, seed) only:
          - peft's own initialisation runs inside `torch.random.fork_rng`, so the global CPU/CUDA RNG
            state is the same after the call as before (the call consumes none of it), and
          - every lora_A of this adapter is then redrawn, in `named_modules()` order, from a CPU
            `torch.Generator().manual_seed(seed)` with peft's default law (kaiming-uniform with
            a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))), in fp32, then cast to the parameter's
            dtype and device; lora_B stays zero (so the policy is unchanged at initialisation). LoRA on
            embeddings (peft: A = 0, B ~ N(0, 1)) redraws B the same way.
        The result does not depend on the device or on the global RNG state, so every rank of a
        distributed run and every resume builds the same initial adapter (and the same reference).
        A policy with several experts (two-expert Wan2.2) gets the same adapter config on each, expert i
        seeded by `expert_seed(seed, i)`; the count returned is over all of them.
        """
        try:
            from peft import LoraConfig
        except ImportError as e:  # pragma: no cover - exercised only without peft
            raise ImportError(f"enable_lora needs the `peft` package: {_INSTALL_HINT}") from e
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"enable_lora: rank must be an int >= 1, got {rank!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"enable_lora: seed must be an int or None, got {seed!r}")
        if getattr(self, "_cp_group", None) is not None:  # peft would wrap the modules the cp hooks sit on
            raise ValueError("enable_lora: call it before set_context_parallel (distributed.context_parallel > 1)")
        for index, model in enumerate(self.experts):
            config = LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha),
                                target_modules=list(target_modules), init_lora_weights=True)
            model.requires_grad_(False)
            cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
            with contextlib.nullcontext() if seed is None else torch.random.fork_rng(devices=cuda):
                model.add_adapter(config, adapter_name=adapter_name)
            if autocast_adapter_dtype:  # before seeding, which then keeps its fp32 draws exactly
                upcast_trained(model)
            if seed is not None:
                self._seed_lora(adapter_name, self.expert_seed(seed, index), model)
        return sum(p.numel() for model in self.experts for p in model.parameters() if p.requires_grad)

    @torch.no_grad()
    def _seed_lora(self, adapter_name: str, seed: int, model: Optional[nn.Module] = None) -> None:
        gen = torch.Generator().manual_seed(seed)
        drawn = 0
        for _, module in (self.model if model is None else model).named_modules():
            lora_a = getattr(module, "lora_A", None)
            if isinstance(lora_a, nn.ModuleDict) and adapter_name in lora_a:
                w = lora_a[adapter_name].weight
                bound = 1.0 / float(w[0].numel()) ** 0.5
                w.copy_(torch.empty(w.shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen))
                drawn += 1
            emb_b = getattr(module, "lora_embedding_B", None)
            if isinstance(emb_b, nn.ParameterDict) and adapter_name in emb_b:
                b = emb_b[adapter_name]
                b.copy_(torch.empty(b.shape, dtype=torch.float32).normal_(generator=gen))
                drawn += 1
        if drawn == 0:
            raise RuntimeError(f"enable_lora: no LoRA layer of adapter {adapter_name!r} found to initialise")

    def lora_keys(self) -> list[str]:
        """The state-dict keys (of this policy, "model." + the transformer's) of the LoRA adapter tensors,
        every adapter included: the keys with a component starting with "lora_" (peft's own criterion)."""
        return [k for k in self.state_dict() if any(part.startswith("lora_") for part in k.split("."))]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint of this policy must hold: the LoRA adapter tensors only when LoRA is
        enabled (the frozen base is rebuilt from the model folder), else the whole state dict. Keys are
        this policy's state-dict keys; tensors are detached and share storage with the parameters."""
        sd = self.state_dict()
        if not self.lora_enabled:
            return sd
        keys = set(self.lora_keys())
        return {k: v for k, v in sd.items() if k in keys}

    def load_trainable_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Loads a `trainable_state_dict()`: strict on exactly its keys and shapes (a LoRA policy needs its
        adapters enabled first, with the same rank and targets, on the rebuilt base)."""
        want = self.trainable_state_dict()
        missing, unexpected = sorted(set(want) - set(state_dict)), sorted(set(state_dict) - set(want))
        wrong = [f"{k!r} is {list(state_dict[k].shape)} in the state dict but {list(want[k].shape)} in the policy"
                 for k in sorted(set(want) & set(state_dict)) if tuple(state_dict[k].shape) != tuple(want[k].shape)]
        if missing or unexpected or wrong:
            what = "the LoRA adapters" if self.lora_enabled else "the full state dict (no LoRA enabled)"
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:5])}"
                             f"{' ...' if len(unexpected) > 5 else ''}")
            parts += wrong[:5]
            hint = ("" if self.lora_enabled or not any("lora_" in k for k in state_dict) else
                    " (the state holds LoRA adapters: call enable_lora with the run's rank and targets first)")
            raise ValueError(f"load_trainable_state_dict: the state does not fit {what}: {'; '.join(parts)}{hint}")
        result = self.load_state_dict(state_dict, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys

    # -- context parallelism -------------------------------------------------------------------------------

    # Joint attention's text position (SD3: after the image tokens, FLUX: before); None: the sharded
    # self-attention sees image tokens only (Wan).
    cp_text_first: Optional[bool] = None
    _cp_group = None
    _cp_text: Optional[JointText] = None

    def tokens(self, model: Optional[nn.Module] = None) -> int:
        """Image / video tokens per sample of `sample_shape` (what context parallelism splits)."""
        return self.count_tokens(self.sample_shape, (model or self.model).config)

    @staticmethod
    def count_tokens(sample_shape: tuple[int, ...], config) -> int:  # pragma: no cover - interface
        """Tokens per sample of latents `sample_shape` ([C, H, W] or [C, T, H, W]) for a transformer of
        `config` (its config.json as a dict, or the loaded model's config): the one count the adapter
        and the pre-load check (`pipelines.Preflight.patch_tokens`) both use."""
        raise NotImplementedError

    def _cp_plan(self, model: nn.Module, group, text: Optional[JointText]):  # pragma: no cover - interface
        """(forward hook handles that split the tokens and gather the output, [(attention module, its
        JointText or None)] to shard) for one diffusers model."""
        raise NotImplementedError

    def set_context_parallel(self, group, attention: str = "ulysses") -> None:
        """Shards every sample's image / video tokens over the ranks of `group` (a torch.distributed
        process group; None or one rank: off), as `DiT.set_context_parallel` does, on each expert:
        each rank runs the blocks on its contiguous slice of the patch tokens (split after the patch
        embedding, rotary tables the same way), every self-attention attends over the whole sequence
        through the Ulysses all-to-all or, with attention = "ring", torch's ring (a DDRLAttnProcessor
        with the group; a joint text + image attention with the text replicated, `JointText`:
        Ulysses only), cross-attention to the text needs no communication, and the tokens are
        all-gathered before unpatchify: the output is the whole sample on every rank (the trainer's
        gradient rule: ddrl_engine.attention.context_parallel). Needs `tokens()` (and for Ulysses
        the heads) divisible by the group size (checked before any change). Call it after
        enable_lora (the hooks sit on the modules as they are then)."""
        import torch.distributed as dist

        size = 1 if group is None else dist.get_world_size(group)
        check_ring_applies(type(self), attention, size)
        for model in self.experts:
            check_context_parallel(model.config.num_attention_heads, self.tokens(model), size, self.model_class_name,
                                   attention)
        for handle in getattr(self, "_cp_hooks", ()):
            handle.remove()
        for module, previous in getattr(self, "_cp_saved", ()):
            module.set_processor(previous)
        self._cp_hooks, self._cp_saved, self._cp_group, self._cp_text = [], [], None, None
        if size == 1:
            return
        text = None if self.cp_text_first is None else JointText(self.cp_text_first)
        for model in self.experts:
            hooks, modules = self._cp_plan(model, group, text)
            self._cp_hooks += hooks
            for module, module_text in modules:
                self._cp_saved.append((module, module.processor))
                module.set_processor(DDRLAttnProcessor.wrap(module.processor, cp_group=group, cp_text=module_text,
                                                            cp_attention=attention))
        self._cp_group, self._cp_text = group, text

    # -- forward -------------------------------------------------------------------------------------------

    def forward(self, x: Tensor, t: Tensor, cond: Union[Tensor, TextCondition]) -> Tensor:
        t = self.check_state(x, t, exact_shape=True)
        batch = x.shape[0]
        c = self.resolve_cond(cond, batch, x.device)
        dtype = self.model.dtype
        c = c.to(dtype=dtype)
        if self._cp_text is not None:  # the joint attentions' replicated text tokens, this forward
            self._cp_text.length = c.embeds.shape[1]
        out = self._velocity(x.to(dtype), t.float(), c)  # timesteps stay fp32, as in the pipelines
        return out.to(x.dtype)

    def _velocity(self, x: Tensor, t: Tensor, cond: TextCondition) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


# context parallelism: forward hooks on the diffusers models' modules (DiffusersPolicy.set_context_parallel)


def _split_rotary(group, module, args, output):
    """Forward hook on WanTransformer3DModel.rope: this rank's rows of the rotary (cos, sin), [1, S, 1, D]
    each, the same token slice as the block input's."""
    return tuple(split_sequence(f, group, dim=1) for f in output)


def _split_block_input(group, module, args, kwargs):
    """Forward pre-hook on the first block: this rank's contiguous slice of hidden_states [B, S, D] (the
    patch tokens in (frame, row, column) order, after the patch embedding)."""
    if args:
        return (split_sequence(args[0], group, dim=1), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": split_sequence(kwargs["hidden_states"], group, dim=1)}


def _split_output(group, module, args, output):
    """Forward hook on SD3's pos_embed: this rank's contiguous slice of the embedded patch tokens [B, S, D]."""
    return split_sequence(output, group, dim=1)


def _gather_output(group, module, args, output):
    """Forward hook on proj_out: every rank's tokens [B, S, C * prod(patch)] in order, so the model's
    unpatchify sees the whole sample."""
    return gather_sequence(output, group, dim=1)


class SD3Policy(DiffusersPolicy):
    """Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`); x: [B, C, H, W] latents; cond needs pooled.
    Timestep convention: t * 1000 (the FlowMatchEulerDiscreteScheduler's sigma * num_train_timesteps)."""

    model_class_name = "SD3Transformer2DModel"
    block_attrs = ("transformer_blocks",)
    cp_text_first = False  # JointAttnProcessor2_0 concatenates [image, text]

    @staticmethod
    def count_tokens(sample_shape: tuple[int, ...], config) -> int:
        """Patch tokens per sample: (H / p) (W / p)."""
        p = int(config.get("patch_size", 2))
        return (sample_shape[1] // p) * (sample_shape[2] // p)

    def _cp_plan(self, model: nn.Module, group, text: Optional[JointText]):
        # pos_embed (patches + position embedding) -> this rank's tokens; proj_out gathered before
        # unpatchify. The joint attention (attn) has the text; SD3.5's second attention (attn2) the
        # image tokens only.
        hooks = [model.pos_embed.register_forward_hook(functools.partial(_split_output, group)),
                 model.proj_out.register_forward_hook(functools.partial(_gather_output, group))]
        modules = [(block.attn, text) for block in model.transformer_blocks]
        modules += [(block.attn2, None) for block in model.transformer_blocks if getattr(block, "attn2", None) is not None]
        return hooks, modules

    def _velocity(self, x: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        if cond.pooled is None:
            raise ValueError("SD3Policy: cond.pooled (the pooled CLIP embedding [B, P]) is required")
        return self.model(hidden_states=x, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                          timestep=t * 1000.0, return_dict=False)[0]


class FluxPolicy(DiffusersPolicy):
    """FLUX.1 (`FluxTransformer2DModel`); x: [B, C, H, W] latents with C = in_channels / 4 and even H,
    W (packed into 2x2 patches here, as FluxPipeline does); cond needs pooled, and guidance [B] for
    guidance-distilled checkpoints (FLUX.1-dev: guidance_embeds=True; the raw scale, e.g. 3.5).
    Timestep convention: t in [0, 1] (the model multiplies by 1000 itself)."""

    model_class_name = "FluxTransformer2DModel"
    block_attrs = ("transformer_blocks", "single_transformer_blocks")
    cp_text_first = True  # both block kinds attend over [text, image]

    def __init__(self, model: nn.Module, sample_shape: Sequence[int], prompts: Optional[TextCondition] = None,
                 **kwargs) -> None:
        super().__init__(model, sample_shape, prompts, **kwargs)
        c, h, w = self.sample_shape if len(self.sample_shape) == 3 else (None, 1, 1)
        if len(self.sample_shape) != 3 or h % 2 or w % 2 or 4 * c != model.config.in_channels:
            raise ValueError(f"FluxPolicy: sample_shape must be (in_channels/4={model.config.in_channels // 4}, H, W) "
                             f"with even H, W, got {self.sample_shape}")

    @staticmethod
    def count_tokens(sample_shape: tuple[int, ...], config) -> int:
        """Packed 2x2 tokens per sample: (H / 2) (W / 2)."""
        return (sample_shape[1] // 2) * (sample_shape[2] // 2)

    def _cp_plan(self, model: nn.Module, group, text: Optional[JointText]):
        # no hooks: `_velocity` splits the packed tokens and their position ids (the rotary tables follow)
        # and gathers the output itself
        return [], [(block.attn, text) for attr in self.block_attrs for block in getattr(model, attr)]

    @staticmethod
    def pack(x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, (H/2)(W/2), 4C] (FluxPipeline._pack_latents)."""
        b, c, h, w = x.shape
        return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)

    @staticmethod
    def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
        """Inverse of `pack`."""
        b, _, c4 = tokens.shape
        c = c4 // 4
        return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    @staticmethod
    def image_ids(h: int, w: int, device, dtype) -> Tensor:
        """[(H/2)(W/2), 3] position ids (0, row, col) of the packed tokens."""
        rows = torch.arange(h // 2, device=device).repeat_interleave(w // 2)
        cols = torch.arange(w // 2, device=device).repeat(h // 2)
        return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype)

    def _velocity(self, x: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        if cond.pooled is None:
            raise ValueError("FluxPolicy: cond.pooled (the pooled CLIP embedding [B, P]) is required")
        guidance = None
        if self.model.config.guidance_embeds:
            if cond.guidance is None:
                raise ValueError("FluxPolicy: this FLUX checkpoint is guidance-distilled; cond.guidance [B] is required")
            guidance = cond.guidance
        _, _, h, w = x.shape
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=x.dtype)
        tokens, img_ids = self.pack(x), self.image_ids(h, w, x.device, x.dtype)
        group = self._cp_group
        if group is not None:  # this rank's packed tokens and their ids (so the rotary tables match)
            tokens, img_ids = split_sequence(tokens, group, dim=1), split_sequence(img_ids, group, dim=0)
        out = self.model(hidden_states=tokens, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                         timestep=t, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        if group is not None:
            out = gather_sequence(out, group, dim=1)
        return self.unpack(out, h, w)


class WanPolicy(DiffusersPolicy):
    """Wan2.1 / Wan2.2 text-to-video (`WanTransformer3DModel`); x: [B, C, T, H, W] latents; cond: umT5
    embeddings (a TextCondition or a bare [B, L, D] tensor). Timestep convention: t * 1000.
    Context parallelism: the video tokens in (frame, row, column) order are split; self-attention only."""

    model_class_name = "WanTransformer3DModel"
    block_attrs = ("blocks",)

    @staticmethod
    def count_tokens(sample_shape: tuple[int, ...], config) -> int:
        """Patch tokens per sample: (T / p_t) (H / p_h) (W / p_w)."""
        patch = tuple(config.get("patch_size", (1, 2, 2)))
        return math.prod(s // p for s, p in zip(sample_shape[1:], patch))

    def _cp_plan(self, model: nn.Module, group, text: Optional[JointText]):
        # the rotary tables and the first block's input (after the patch embedding) cut to this rank's
        # tokens; proj_out's gathered before the model unpatchifies; attn1 (self) sharded, attn2 (to the
        # replicated text) untouched
        hooks = [model.rope.register_forward_hook(functools.partial(_split_rotary, group)),
                 model.blocks[0].register_forward_pre_hook(functools.partial(_split_block_input, group), with_kwargs=True),
                 model.proj_out.register_forward_hook(functools.partial(_gather_output, group))]
        return hooks, [(block.attn1, None) for block in model.blocks]

    def _velocity(self, x: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        return self.model(hidden_states=x, timestep=t * 1000.0, encoder_hidden_states=cond.embeds, return_dict=False)[0]


class WanExpertsPolicy(WanPolicy):
    """Two-expert Wan2.2 (A14B) text-to-video: `model` (diffusers' `transformer`, the high-noise expert)
    and `model_2` (`transformer_2`, the low-noise expert), routed as WanPipeline routes them.

    boundary_timestep = boundary_ratio * num_train_timesteps (the folder's model_index.json and
    scheduler); a row whose timestep t * 1000 is >= boundary_timestep runs `model`, the others
    `model_2`. A rollout step's rows share t (one expert, the whole batch: bitwise the pipeline's call);
    the trainer's recomputation and the data loss may mix levels in a batch, then the rows are split
    by expert (index_select), each expert runs on its rows and the outputs are put back in place
    (index_copy). The split reads the routing on the host (one sync per forward), so this policy
    cannot be captured in a CUDA graph (a data-dependent split): it raises under capture. Under FSDP2
    the ranks agree on which experts run (`_experts_needed`), so levels that differ across ranks
    cannot leave one rank waiting in another expert's collectives.

    Both experts are held, LoRA'd (`enable_lora`: one config, distinct seeds via `expert_seed`) and
    trained; state-dict keys are "model.*" (transformer) and "model_2.*" (transformer_2). FSDP2 shards
    the blocks of both (`blocks`).
    """

    def __init__(self, model: nn.Module, model_2: nn.Module, sample_shape: Sequence[int],
                 prompts: Optional[TextCondition] = None, *, boundary_ratio: float, num_train_timesteps: int = 1000,
                 ddrl_attention: bool = True) -> None:
        if isinstance(boundary_ratio, bool) or not isinstance(boundary_ratio, (int, float)) or not 0 < boundary_ratio <= 1:
            raise ValueError(f"WanExpertsPolicy: boundary_ratio must be a number in (0, 1] (model_index.json's "
                             f"boundary_ratio), got {boundary_ratio!r}")
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"WanExpertsPolicy: num_train_timesteps must be an int >= 1, got {num_train_timesteps!r}")
        super().__init__(model, sample_shape, prompts, ddrl_attention=False)
        cls = getattr(require_diffusers(), self.model_class_name)
        if not isinstance(model_2, cls):
            raise TypeError(f"WanExpertsPolicy: model_2 (transformer_2) must be a {self.model_class_name}, got "
                            f"{type(model_2).__name__}")
        if model_2 is model:
            raise ValueError("WanExpertsPolicy: model and model_2 are the same module; pass the two experts")
        for key in ("in_channels", "out_channels", "patch_size", "text_dim"):
            a, b = model.config.get(key), model_2.config.get(key)
            if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
                raise ValueError(f"WanExpertsPolicy: the experts disagree on {key}: transformer {a}, transformer_2 {b}")
        if model_2.dtype != model.dtype:
            raise ValueError(f"WanExpertsPolicy: the experts' dtypes differ ({model.dtype} vs {model_2.dtype})")
        self.model_2 = model_2
        self.boundary_ratio = float(boundary_ratio)
        self.num_train_timesteps = num_train_timesteps
        self.boundary_timestep = self.boundary_ratio * num_train_timesteps  # WanPipeline's own formula
        self.use_ddrl_attention(ddrl_attention)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], path_2: Union[str, os.PathLike], sample_shape: Sequence[int],
                        prompts: Optional[TextCondition] = None, *, boundary_ratio: float, num_train_timesteps: int = 1000,
                        torch_dtype: Optional[torch.dtype] = None, ddrl_attention: bool = True,
                        **kwargs) -> "WanExpertsPolicy":
        """Loads both experts from local folders (<pipeline>/transformer, <pipeline>/transformer_2)."""
        model_cls = getattr(require_diffusers(), cls.model_class_name)
        path = _check_dir(path, f"{cls.__name__}.from_pretrained")
        path_2 = _check_dir(path_2, f"{cls.__name__}.from_pretrained (transformer_2)")
        model = model_cls.from_pretrained(path, local_files_only=True, torch_dtype=torch_dtype, **kwargs)
        model_2 = model_cls.from_pretrained(path_2, local_files_only=True, torch_dtype=torch_dtype, **kwargs)
        return cls(model, model_2, sample_shape, prompts, boundary_ratio=boundary_ratio,
                   num_train_timesteps=num_train_timesteps, ddrl_attention=ddrl_attention)

    def save_pretrained(self, path: Union[str, os.PathLike], **kwargs) -> None:
        """Writes path/transformer and path/transformer_2 (the pipeline's subfolders)."""
        self.model.save_pretrained(os.path.join(os.fspath(path), "transformer"), safe_serialization=True, **kwargs)
        self.model_2.save_pretrained(os.path.join(os.fspath(path), "transformer_2"), safe_serialization=True, **kwargs)

    @property
    def experts(self) -> tuple[nn.Module, ...]:
        if "model_2" not in self._modules:  # during __init__, before model_2 is set
            return (self.model,)
        return (self.model, self.model_2)

    @property
    def blocks(self) -> list[nn.Module]:
        """The blocks of both experts (transformer's, then transformer_2's): FSDP2 and activation
        checkpointing units."""
        return [block for model in self.experts for attr in self.block_attrs for block in getattr(model, attr)]

    def _experts_needed(self, high: bool, low: bool, device) -> tuple[bool, bool]:
        """Which experts run in this forward: those this batch needs, or under FSDP2 those any rank needs
        (an all-reduce of two flags), so every rank joins the same all-gathers / reduce-scatters even when
        levels differ across ranks (algorithm.data_noise = "fresh"); a rank that needs no row of an
        expert runs it on one row and adds 0 x its output (bitwise the same result, zero gradients)."""
        import torch.distributed as dist

        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # pragma: no cover - older torch
            return high, low
        sharded = isinstance(self, FSDPModule) or any(isinstance(m, FSDPModule) for m in self.experts)
        if not (sharded and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return high, low
        flags = torch.tensor([float(high), float(low)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def high_noise(self, t: Tensor) -> Tensor:
        """[B] bool: the rows (levels t in [0, 1]) that WanPipeline runs with `transformer`."""
        return t.float() * 1000.0 >= self.boundary_timestep

    def _velocity(self, x: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        timestep = t * 1000.0
        high = timestep >= self.boundary_timestep
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("WanExpertsPolicy: the two-expert routing splits the batch by level on the host, "
                               "which a CUDA graph cannot capture; set rollout.cuda_graph = false")
        n_high = int(high.sum())  # host sync: the split is data-dependent
        batch = x.shape[0]
        need_high, need_low = self._experts_needed(n_high > 0, n_high < batch, x.device)

        def run(model, rows):
            if rows is None:
                return model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond.embeds, return_dict=False)[0]
            return model(hidden_states=x.index_select(0, rows), timestep=timestep.index_select(0, rows),
                         encoder_hidden_states=cond.embeds.index_select(0, rows), return_dict=False)[0]

        if n_high in (0, batch):
            model, other, other_needed = ((self.model, self.model_2, need_low) if n_high else
                                          (self.model_2, self.model, need_high))
            out = run(model, None)
            if other_needed:  # another rank runs the other expert: join its collectives, add an exact 0
                out = out + 0.0 * run(other, torch.zeros(1, dtype=torch.long, device=x.device)).sum()
            return out
        rows_high = high.nonzero().squeeze(1)
        rows_low = (~high).nonzero().squeeze(1)
        out_high, out_low = run(self.model, rows_high), run(self.model_2, rows_low)
        out = out_high.new_empty((batch, *out_high.shape[1:]))
        return out.index_copy(0, rows_high, out_high).index_copy(0, rows_low, out_low)
