"""A model family loaded from a local diffusers folder: policy, text encoding, VAE, scheduler config.

    bundle = load_bundle("sd3", "/models/stable-diffusion-3.5-medium", resolution=(512, 512),
                         dtype=torch.bfloat16, device="cuda")
    bank = bundle.prompt_bank(["a red car", "a blue bird"])   # 2 prompts + the empty prompt (row 2)
    bundle.free_text_encoders()                               # once the prompts are cached
    bundle.policy.set_prompts(bank)                           # cond = prompt ids from here on
    pixels = bundle.decode(latents)                           # [B, 3, H, W] in [-1, 1]

What comes from diffusers and what is ours:
  - The transformer is loaded into our adapter (`SD3Policy`, `FluxPolicy`, `WanPolicy`), with
    sample_shape = the latent shape of `resolution` (FLUX: the unpacked [C, h, w] latents). A
    two-expert Wan2.2 folder (transformer_2, boundary_ratio) loads both into `WanExpertsPolicy`
    (policy.model is the pipeline's transformer, policy.model_2 its transformer_2).
  - Text encoding is the pipeline's own `encode_prompt`, called on a pipeline object built from the
    loaded components (the same transformer object as the policy's), so the embeddings are exactly
    the pipeline's, including its padding, truncation and prompt cleaning.
  - decode / encode undo / apply the pipeline's latent normalisation exactly as it does
    (SD3, FLUX: z = latents / scaling_factor + shift_factor; Wan: z = latents / (1 / latents_std) +
    latents_mean), around `vae.decode` / `vae.encode`. `encode` takes the mode of the VAE's
    posterior (its mean; what diffusers' img2img / video2video pipelines use with
    sample_mode="argmax"), so a data image maps to one latent deterministically.
  - The scheduler is data only: `scheduler_config` (its class name and config, e.g. shift,
    use_dynamic_shifting for FLUX, flow_shift for Wan's UniPC).

Everything except the transformer is frozen (requires_grad False, eval). decode and encode run
without autograd, `decode_batch` samples at a time, and return float32.
"""
from __future__ import annotations

import gc
import os
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..models.diffusers import FluxPolicy, SD3Policy, TextCondition, WanExpertsPolicy, WanPolicy, require_diffusers
from .specs import Preflight, preflight

__all__ = ["ModelBundle", "load_bundle", "policy_class"]

# The pipelines' own defaults, used when max_sequence_length is None.
_MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512, "wan": 226}
FLUX_DEFAULT_GUIDANCE = 3.5  # FluxPipeline's guidance_scale default
_TEXT_ENCODERS = {"sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"),
                  "flux": ("text_encoder", "text_encoder_2"), "wan": ("text_encoder",)}


class ModelBundle:
    """One model family built from a diffusers folder (see the module docstring). Build with `load_bundle`.

    Attributes:
        kind: "sd3", "flux" or "wan".
        path: the pipeline folder.
        resolution: pixels, (H, W) or (frames, H, W).
        latent_shape: the policy's sample_shape.
        policy: the transformer in our adapter (the only trainable part).
        pipeline: the diffusers pipeline built from the same components (policy.model is its transformer).
        vae: the frozen VAE.
        scheduler_config: the folder's scheduler, as data: {"_class_name": ..., **config}.
        null_prompt: "" (the unconditional prompt; the last row of `prompt_bank`).
        decode_batch: samples per VAE call in decode / encode.
        prompt_batch: prompts per text-encoder call in encode_prompts.
    """

    null_prompt = ""

    def __init__(self, pre: Preflight, policy: nn.Module, pipeline, *, dtype: torch.dtype, device: torch.device,
                 max_sequence_length: int, guidance: Optional[float], decode_batch: int, prompt_batch: int) -> None:
        self.kind = pre.spec.name
        self.path = pre.path
        self.resolution = pre.resolution
        self.latent_shape = pre.latent_shape
        self.policy = policy
        self.pipeline = pipeline
        self.vae = pipeline.vae
        self.dtype = dtype
        self.device = device
        self.max_sequence_length = max_sequence_length
        self.guidance = guidance
        self.decode_batch = decode_batch
        self.prompt_batch = prompt_batch
        self.scheduler_config = {"_class_name": type(pipeline.scheduler).__name__,
                                 **{k: v for k, v in dict(pipeline.scheduler.config).items() if not k.startswith("_")}}
        self._text_encoders_freed = False

    # -- text ----------------------------------------------------------------------------------------------

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        return _TEXT_ENCODERS[self.kind]

    @property
    def guidance_distilled(self) -> bool:
        """FLUX checkpoints with guidance_embeds (FLUX.1-dev): the guidance scale is a model input."""
        return self.kind == "flux" and bool(self.policy.model.config.guidance_embeds)

    def encode_prompts(self, texts: Sequence[str], *, guidance: Optional[float] = None) -> TextCondition:
        """The pipeline's own `encode_prompt` on `texts` (no negative prompts), `prompt_batch` at a time.

        Returns a TextCondition on `device`: SD3 embeds [N, 77 + L, D] (CLIP tokens then T5) and pooled;
        FLUX embeds [N, L, D] (T5), pooled (CLIP) and, for guidance-distilled checkpoints, guidance [N]
        (`guidance`, else the bundle's, else FluxPipeline's 3.5); Wan embeds [N, L, D] (umT5, zero past
        each prompt's tokens). L = max_sequence_length.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_prompts takes a list of strings")
        texts = list(texts)
        if not texts:
            raise ValueError("encode_prompts: no texts given")
        if self._text_encoders_freed:
            raise RuntimeError("encode_prompts: the text encoders were freed (free_text_encoders); encode every "
                               "prompt before freeing them, or load the bundle again")
        if guidance is not None and not self.guidance_distilled:
            raise ValueError(f"encode_prompts: guidance={guidance} given but this {self.kind} transformer takes no "
                             "guidance input (only guidance-distilled FLUX does: guidance_embeds=True)")
        chunks = [self._encode_chunk(texts[i:i + self.prompt_batch]) for i in range(0, len(texts), self.prompt_batch)]
        cond = TextCondition.cat(chunks)
        if self.guidance_distilled:
            g = guidance if guidance is not None else self.guidance if self.guidance is not None else FLUX_DEFAULT_GUIDANCE
            cond = TextCondition(cond.embeds, cond.pooled, torch.full((len(texts),), float(g), device=self.device))
        return cond

    def prompt_bank(self, texts: Sequence[str], **kwargs) -> TextCondition:
        """encode_prompts(texts + [null_prompt]): the bank `policy.set_prompts` takes (row N = unconditional)."""
        return self.encode_prompts(list(texts) + [self.null_prompt], **kwargs)

    @torch.no_grad()
    def _encode_chunk(self, texts: list[str]) -> TextCondition:
        pipe, msl = self.pipeline, self.max_sequence_length
        if self.kind == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None, device=self.device,
                                                      do_classifier_free_guidance=False, max_sequence_length=msl)
            return TextCondition(embeds, pooled)
        if self.kind == "flux":
            embeds, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, device=self.device,
                                                   max_sequence_length=msl)
            return TextCondition(embeds, pooled)
        embeds, _ = pipe.encode_prompt(prompt=texts, do_classifier_free_guidance=False, max_sequence_length=msl,
                                       device=self.device)
        return TextCondition(embeds)

    def free_text_encoders(self) -> None:
        """Drops the text encoders and tokenizers (after the prompts are encoded and cached); encode_prompts
        raises afterwards."""
        for name in self.text_encoder_names:
            setattr(self.pipeline, name, None)
            setattr(self.pipeline, name.replace("text_encoder", "tokenizer"), None)
        self._text_encoders_freed = True
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- latents <-> pixels --------------------------------------------------------------------------------

    def _check(self, x: Tensor, shape: tuple[int, ...], what: str) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point() or tuple(x.shape[1:]) != shape or x.dim() != len(shape) + 1:
            raise ValueError(f"{what} must be a float tensor [B, {', '.join(map(str, shape))}], got "
                             f"{getattr(x, 'shape', type(x))}")

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        """(3, H, W), or (3, frames, H, W) for Wan."""
        return (3, *self.resolution)

    def _norm(self, like: Tensor) -> tuple[Union[Tensor, float], Union[Tensor, float]]:
        """(a, b) with VAE latents z = latents / a + b, as the pipeline builds them (SD3, FLUX: the config's
        Python floats; Wan: 1 / latents_std and latents_mean as [1, C, 1, 1, 1] tensors of z's dtype)."""
        cfg = self.vae.config
        if self.kind == "wan":
            shape = (1, cfg.z_dim, 1, 1, 1)
            mean = torch.tensor(cfg.latents_mean).view(shape).to(like.device, like.dtype)
            inv_std = 1.0 / torch.tensor(cfg.latents_std).view(shape).to(like.device, like.dtype)
            return inv_std, mean
        return cfg.scaling_factor, cfg.shift_factor or 0.0

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents [B, *latent_shape] -> pixels [B, *pixel_shape] in [-1, 1], float32."""
        self._check(latents, self.latent_shape, "decode: latents")
        out = []
        for chunk in latents.split(self.decode_batch):
            z = chunk.to(self.device, self.vae.dtype)
            a, b = self._norm(z)
            pixels = self.vae.decode(z / a + b, return_dict=False)[0]
            out.append(pixels.float().clamp(-1.0, 1.0))
        return torch.cat(out)

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels [B, *pixel_shape] in [-1, 1] -> normalised latents [B, *latent_shape], float32 (the mode,
        i.e. mean, of the VAE posterior; the inverse of decode up to the VAE's reconstruction error)."""
        self._check(pixels, self.pixel_shape, "encode: pixels")
        out = []
        for chunk in pixels.split(self.decode_batch):
            x = chunk.to(self.device, self.vae.dtype)
            z = self.vae.encode(x).latent_dist.mode()
            a, b = self._norm(z)
            out.append(((z - b) * a).float())
        return torch.cat(out)

    def __repr__(self) -> str:
        return (f"ModelBundle(kind={self.kind!r}, path={str(self.path)!r}, resolution={self.resolution}, "
                f"latent_shape={self.latent_shape}, dtype={self.dtype}, device={self.device})")


_POLICIES = {"sd3": SD3Policy, "flux": FluxPolicy, "wan": WanPolicy}


def policy_class(kind: str) -> type:
    """The adapter class a pipeline folder of `kind` ("sd3", "flux", "wan") loads into."""
    return _POLICIES[kind]


def _num_train_timesteps(pre: Preflight) -> int:
    """The folder's scheduler num_train_timesteps (WanPipeline's boundary is boundary_ratio times it)."""
    import json

    path = pre.path / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return int(config.get("num_train_timesteps", 1000))


def load_bundle(kind: str, path: Union[str, os.PathLike], *, resolution: Sequence[int], dtype: torch.dtype,
                device: Union[str, torch.device], vae_dtype: Optional[torch.dtype] = None,
                max_sequence_length: Optional[int] = None, guidance: Optional[float] = None,
                decode_batch: int = 4, prompt_batch: int = 16, ddrl_attention: bool = True) -> ModelBundle:
    """Loads a local diffusers pipeline folder of `kind` ("sd3", "flux", "wan") as a ModelBundle.

    Every check on the folder and the arguments runs before any weight is read (specs.preflight):
    errors name the field (`model.kind`, `model.path`, `model.resolution`).

    resolution: pixels, [H, W] (sd3, flux; an int means square) or [frames, H, W] (wan).
    dtype: of every component (the transformer too; load fp32 for an FSDP master copy).
    vae_dtype: the VAE's own dtype when it differs (Wan's VAE is usually run in float32).
    max_sequence_length: T5 / umT5 tokens (None: the pipeline's default, sd3 256, flux 512, wan 226).
    guidance: FLUX guidance-distilled checkpoints only: the default guidance of encode_prompts (None: 3.5).
    decode_batch, prompt_batch: micro-batch sizes of decode/encode and encode_prompts.
    ddrl_attention: route the policy's attention through ddrl_engine.attention (the adapters' default).
    """
    pre = preflight(kind, path, resolution)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"model.dtype: dtype must be a floating torch.dtype, got {dtype!r}")
    if vae_dtype is not None and (not isinstance(vae_dtype, torch.dtype) or not vae_dtype.is_floating_point):
        raise TypeError(f"vae_dtype must be a floating torch.dtype, got {vae_dtype!r}")
    device = torch.device(device)
    for name, value in (("decode_batch", decode_batch), ("prompt_batch", prompt_batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    msl = _MAX_SEQUENCE_LENGTH[kind] if max_sequence_length is None else max_sequence_length
    if not isinstance(msl, int) or isinstance(msl, bool) or not 1 <= msl <= 512:
        raise ValueError(f"max_sequence_length must be an int in [1, 512] (the pipelines' limit), got {msl!r}")
    if guidance is not None and not (kind == "flux" and pre.transformer_config.get("guidance_embeds")):
        raise ValueError(f"guidance: only guidance-distilled FLUX transformers (guidance_embeds=True) take a guidance "
                         f"input; {pre.path / 'transformer'} does not")

    diffusers = require_diffusers()
    experts = {}
    if pre.two_experts:  # Wan2.2 A14B: both experts in one policy, the pipeline built around the same modules
        policy = WanExpertsPolicy.from_pretrained(
            pre.path / "transformer", pre.path / "transformer_2", pre.latent_shape, boundary_ratio=pre.boundary_ratio,
            num_train_timesteps=_num_train_timesteps(pre), torch_dtype=dtype, ddrl_attention=ddrl_attention)
        experts = {"transformer_2": policy.model_2}
    else:
        policy = _POLICIES[kind].from_pretrained(pre.path / "transformer", pre.latent_shape, torch_dtype=dtype,
                                                 ddrl_attention=ddrl_attention)
    pipeline_cls = getattr(diffusers, pre.spec.pipeline_class)
    pipeline = pipeline_cls.from_pretrained(os.fspath(pre.path), transformer=policy.model, local_files_only=True,
                                            dtype=dtype, **experts)
    pipeline.to(device)
    for model in policy.experts:
        model.eval()
    if vae_dtype is not None:
        pipeline.vae.to(dtype=vae_dtype)
    for name in ("vae",) + _TEXT_ENCODERS[kind]:
        module = getattr(pipeline, name)
        module.requires_grad_(False)
        module.eval()
    return ModelBundle(pre, policy, pipeline, dtype=dtype, device=device, max_sequence_length=msl,
                       guidance=guidance, decode_batch=decode_batch, prompt_batch=prompt_batch)
