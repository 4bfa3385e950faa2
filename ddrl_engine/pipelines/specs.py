"""What each model kind needs of a local diffusers folder, checked before any weight is read.

`preflight(kind, path, resolution)` reads only JSON (model_index.json, transformer/config.json,
vae/config.json) and returns a `Preflight` with the latent shape the resolution gives; every problem
raises with the config field it concerns (`model.kind`, `model.path`, `model.resolution`).

Resolution rules (the pipelines' own `check_inputs`):
  sd3:  [H, W], each divisible by vae_scale_factor * patch_size (8 * 2 = 16 for the real models), and
        H / vae_scale_factor / patch_size <= pos_embed_max_size.
  flux: [H, W], each divisible by vae_scale_factor * 2 (FLUX packs 2x2 latent patches; 16 real).
  wan:  [frames, H, W], frames = 4n + 1 (the VAE's temporal factor), H and W divisible by
        scale_factor_spatial * patch_size (8 * 2 = 16 real).

Two-expert Wan2.2 (A14B): a Wan folder naming `transformer_2` must set `boundary_ratio` (and the
reverse); both experts must agree on channels, patch size and text width (`Preflight.two_experts`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

__all__ = ["KINDS", "KindSpec", "Preflight", "preflight"]


@dataclass(frozen=True)
class KindSpec:
    """Static facts of one model kind.

    pipeline_class: the diffusers pipeline model_index.json must name (`_class_name`).
    components: the subfolders the bundle loads, each with what it is (for error messages).
    video: resolution is [frames, H, W] (else [H, W]).
    """

    name: str
    pipeline_class: str
    components: tuple[tuple[str, str], ...]
    video: bool = False


KINDS: dict[str, KindSpec] = {
    "sd3": KindSpec("sd3", "StableDiffusion3Pipeline", (
        ("transformer", "the SD3Transformer2DModel"), ("vae", "the AutoencoderKL"),
        ("text_encoder", "the first CLIP text encoder"), ("tokenizer", "the first CLIP tokenizer"),
        ("text_encoder_2", "the second CLIP text encoder"), ("tokenizer_2", "the second CLIP tokenizer"),
        ("text_encoder_3", "the T5 text encoder"), ("tokenizer_3", "the T5 tokenizer"),
        ("scheduler", "the scheduler config"))),
    "flux": KindSpec("flux", "FluxPipeline", (
        ("transformer", "the FluxTransformer2DModel"), ("vae", "the AutoencoderKL"),
        ("text_encoder", "the CLIP text encoder"), ("tokenizer", "the CLIP tokenizer"),
        ("text_encoder_2", "the T5 text encoder"), ("tokenizer_2", "the T5 tokenizer"),
        ("scheduler", "the scheduler config"))),
    "wan": KindSpec("wan", "WanPipeline", (
        ("transformer", "the WanTransformer3DModel"), ("vae", "the AutoencoderKLWan"),
        ("text_encoder", "the umT5 text encoder"), ("tokenizer", "the umT5 tokenizer"),
        ("scheduler", "the scheduler config")), video=True),
}


@dataclass(frozen=True)
class Preflight:
    """The result of the checks: what loading will build.

    resolution: pixels, (H, W) or (frames, H, W) for video.
    latent_shape: the policy's sample_shape, (C, h, w) or (C, t, h, w).
    model_index: the parsed model_index.json.
    """

    spec: KindSpec
    path: Path
    resolution: tuple[int, ...]
    latent_shape: tuple[int, ...]
    model_index: dict
    transformer_config: dict
    vae_config: dict
    boundary_ratio: Optional[float] = None  # two-expert Wan2.2 (A14B) only: model_index.json's boundary_ratio
    transformer_2_config: Optional[dict] = None  # two-expert Wan2.2 only: transformer_2/config.json

    @property
    def two_experts(self) -> bool:
        """A two-expert Wan2.2 folder (transformer_2 + boundary_ratio): loads as WanExpertsPolicy."""
        return self.transformer_2_config is not None

    @property
    def attention_heads(self) -> int:
        return int(self.transformer_config.get("num_attention_heads", 0))

    @property
    def patch_tokens(self) -> int:
        """Image / video tokens per sample (what context parallelism splits): the adapter's own count
        (`DiffusersPolicy.count_tokens`) from the folder's transformer config, no weights loaded."""
        from .bundle import policy_class

        return policy_class(self.spec.name).count_tokens(self.latent_shape, self.transformer_config)


def _read_json(path: Path, field: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{field}: {path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{field}: {path} must hold a JSON object")
    return data


def _resolution(spec: KindSpec, resolution: Any) -> tuple[int, ...]:
    want = "[frames, height, width]" if spec.video else "[height, width]"
    if isinstance(resolution, int) and not isinstance(resolution, bool) and not spec.video:
        resolution = (resolution, resolution)
    try:
        res = tuple(resolution)
    except TypeError:
        res = ()
    if len(res) != (3 if spec.video else 2) or not all(isinstance(r, int) and not isinstance(r, bool) and r > 0
                                                       for r in res):
        raise ValueError(f"model.resolution: {spec.name} takes {want} in pixels (positive ints), got {resolution!r}")
    return res


def preflight(kind: str, path: Union[str, os.PathLike], resolution: Sequence[int]) -> Preflight:
    """Checks a diffusers folder for `kind` without loading weights (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"model.kind: unknown model kind {kind!r}; choose one of {sorted(KINDS)}")
    spec = KINDS[kind]
    root = Path(os.fspath(path))
    if not root.is_dir():
        raise FileNotFoundError(
            f"model.path: no model folder at {str(root)!r}. Models are read from a local diffusers folder only "
            "(the whole pipeline repository, holding model_index.json); download it beforehand, e.g. "
            "`huggingface-cli download <repo> --local-dir DIR`")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"model.path: {str(root)!r} has no model_index.json; pass the pipeline folder itself "
                                "(the one holding model_index.json, transformer/, vae/, ...), not a subfolder")
    index = _read_json(index_path, "model.path")
    found = index.get("_class_name")
    if found != spec.pipeline_class:
        raise ValueError(f"model.kind: model.kind = {kind!r} expects a {spec.pipeline_class} folder, but "
                         f"{index_path} names {found!r}; set model.kind to match the folder")
    for name, what in spec.components:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] is not None):
            raise FileNotFoundError(f"model.path: {index_path} has no {name!r} entry ({what}, which {kind} needs)")
        sub = root / name
        if not sub.is_dir() or not any(sub.iterdir()):
            raise FileNotFoundError(f"model.path: {str(root)!r} has no {name}/ subfolder ({what}, which {kind} needs)")
    boundary, t2cfg = None, None
    if kind == "wan":
        boundary, t2cfg = _experts(root, index, index_path)
        # expand_timesteps (Wan2.2 TI2V-5B): per-token timesteps, which differ only under an image mask; in
        # text-to-video every token has its sample's timestep, and the transformer's output for a per-sample
        # timestep is bitwise the same (tests/test_pipeline_run.py), so the policy passes that.
    for name in ("transformer", "vae"):
        if not (root / name / "config.json").is_file():
            raise FileNotFoundError(f"model.path: {str(root / name)!r} has no config.json")
    tcfg = _read_json(root / "transformer" / "config.json", "model.path")
    vcfg = _read_json(root / "vae" / "config.json", "model.path")
    res = _resolution(spec, resolution)
    if t2cfg is not None:
        for key in ("in_channels", "out_channels", "patch_size", "text_dim"):
            if tcfg.get(key) != t2cfg.get(key):
                raise ValueError(f"model.path: the two experts of {str(root)!r} disagree on {key}: transformer "
                                 f"{tcfg.get(key)!r}, transformer_2 {t2cfg.get(key)!r}")
    return Preflight(spec, root, res, _latent_shape(spec, res, tcfg, vcfg), index, tcfg, vcfg, boundary, t2cfg)


def _experts(root: Path, index: dict, index_path: Path) -> tuple[Optional[float], Optional[dict]]:
    """(boundary_ratio, transformer_2 config) of a two-expert Wan2.2 folder (A14B: `transformer` runs the
    timesteps >= boundary_ratio * num_train_timesteps, `transformer_2` the others), (None, None) for a
    one-transformer Wan folder; a half-configured folder raises."""
    entry = index.get("transformer_2")
    has_2 = isinstance(entry, list) and len(entry) == 2 and entry[1] is not None
    ratio = index.get("boundary_ratio")
    if not has_2:
        if ratio is not None:
            raise ValueError(f"model.path: {index_path} sets boundary_ratio = {ratio!r} but has no transformer_2 "
                             "(the low-noise expert of a two-expert Wan2.2 pipeline); WanPipeline could not run it")
        return None, None
    if ratio is None:
        raise ValueError(f"model.path: {index_path} names a transformer_2 but no boundary_ratio; a two-expert Wan2.2 "
                         "pipeline needs boundary_ratio (e.g. 0.875 for Wan2.2-T2V-A14B) to choose the expert per step")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"model.path: {index_path}: boundary_ratio must be a number in (0, 1], got {ratio!r}")
    if entry[1] != "WanTransformer3DModel":
        raise ValueError(f"model.path: {index_path}: transformer_2 must be a WanTransformer3DModel, got {entry[1]!r}")
    sub = root / "transformer_2"
    if not (sub / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {str(root)!r} has no transformer_2/config.json (the low-noise expert "
                                "of this two-expert Wan2.2 pipeline)")
    return float(ratio), _read_json(sub / "config.json", "model.path")


def _divisible(res: tuple[int, ...], multiple: int, why: str) -> None:
    bad = [r for r in res if r % multiple]
    if bad:
        raise ValueError(f"model.resolution: height and width must be divisible by {multiple} ({why}), got "
                         f"{list(res)}; e.g. {[r - r % multiple or multiple for r in res]}")


def _latent_shape(spec: KindSpec, res: tuple[int, ...], tcfg: dict, vcfg: dict) -> tuple[int, ...]:
    if spec.name in ("sd3", "flux"):
        scale = 2 ** (len(vcfg.get("block_out_channels", (0,) * 4)) - 1)
        if spec.name == "sd3":
            patch = int(tcfg.get("patch_size", 2))
            _divisible(res, scale * patch, f"VAE scale factor {scale} x patch size {patch}")
            limit = tcfg.get("pos_embed_max_size")
            if limit is not None and max(res) // (scale * patch) > limit:
                raise ValueError(f"model.resolution: {list(res)} is {max(res) // (scale * patch)} patches across, more "
                                 f"than the transformer's pos_embed_max_size {limit}")
            channels = int(tcfg["in_channels"])
        else:
            _divisible(res, scale * 2, f"VAE scale factor {scale} x FLUX's 2x2 latent packing")
            channels = int(tcfg["in_channels"]) // 4
        return (channels, res[0] // scale, res[1] // scale)
    frames, h, w = res
    temporal = int(vcfg.get("scale_factor_temporal") or 4)
    spatial = int(vcfg.get("scale_factor_spatial") or 8)
    if (frames - 1) % temporal:
        n = (frames - 1) // temporal
        raise ValueError(f"model.resolution: frames must be {temporal}n + 1 (the VAE compresses time {temporal}x), got "
                         f"{frames}; e.g. {temporal * n + 1} or {temporal * (n + 1) + 1}")
    patch = tcfg.get("patch_size", (1, 2, 2))
    _divisible((h,), spatial * int(patch[1]), f"VAE spatial factor {spatial} x patch size {patch[1]}")
    _divisible((w,), spatial * int(patch[2]), f"VAE spatial factor {spatial} x patch size {patch[2]}")
    return (int(tcfg["in_channels"]), (frames - 1) // temporal + 1, h // spatial, w // spatial)
