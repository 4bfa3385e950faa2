"""PickScore (and any Hugging Face CLIP model scored the same way) as a reward, from a local folder.

PickScore (Kirstain et al., 2023) is a CLIP ViT-H/14 fine-tuned on human preferences between
generated images. Its score for an image and a prompt is

    score = exp(logit_scale) * cos(image_embeds, text_embeds)

with `logit_scale` the CLIP model's learned (log) temperature and the embeddings the projected
`get_image_features` / `get_text_features` outputs. That is exactly CLIP's `logits_per_image`, so
any transformers `CLIPModel` folder works; for PickScore the scale is about 100 and scores are
about 18-23.

Nothing is downloaded: `path` is a folder written by `save_pretrained` (config.json with model_type
"clip", the weights, the processor and tokenizer files), fetched beforehand. PickScore's model
folder may lack the processor files (they come from the base laion/CLIP-ViT-H-14 model); pass that
folder as `processor_path`. Folder problems raise before any weight is read.

Prompts: `prompts` is the list of prompt texts; `cond` [B] holds prompt ids into it. The last id
may be the empty prompt "" (the classifier-free-guidance null condition): it is embedded like any
other text. Text embeddings of all prompts are computed once at construction and cached.

Preprocessing is done on tensors, without a PIL round trip, following the folder's image-processor
config in the processor's order: samples in [-1, 1] are mapped to [0, 1] (what a uint8 image times
`rescale_factor` = 1/255 gives), resized (shortest edge, or height/width) with antialiased bicubic
(`F.interpolate(..., antialias=True)`, which uses PIL's bicubic kernel) in PIL's two passes (width,
then height), each clamped to [0, 1] as PIL's 8-bit passes are, center-cropped (zero-padded where the crop is larger, as the processor
does), then normalised with image_mean/image_std. The only difference from the processor on PIL
images is PIL's uint8 quantisation (of the input, between the passes and of the output): on the
same uint8 pixels, values agree to about one 1/255 step (tests/test_pickscore.py checks it).
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PickScoreReward", "check_clip_folder", "check_processor_folder"]

PathLike = Union[str, os.PathLike]

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# PIL resampling ids (PIL.Image.Resampling) -> F.interpolate modes
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _local_hint() -> str:
    return "reward models are read from local folders only (nothing is downloaded); fetch it beforehand"


def check_clip_folder(path: PathLike, *, what: str = "PickScoreReward", processor: bool = True) -> str:
    """Checks, without reading weights, that `path` is a local CLIP model folder (config.json with
    model_type "clip" and a weights file) and, with processor=True, that it also holds the image
    processor and tokenizer files. Returns the path as a str; raises FileNotFoundError / ValueError
    naming what is missing."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: no model folder at {path!r}; {_local_hint()} "
                                "(a folder written by save_pretrained)")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{what}: {path!r} has no config.json: not a Hugging Face model folder")
    try:
        with open(config_file) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{what}: {config_file!r} is not a readable JSON model config ({e})") from None
    if model_type != "clip":
        raise ValueError(f"{what}: {path!r} holds a {model_type!r} model (config.json model_type), not a CLIP model "
                         "(model_type 'clip')")
    if not any(os.path.isfile(os.path.join(path, f)) for f in _WEIGHT_FILES):
        raise FileNotFoundError(f"{what}: {path!r} has no weights file (one of {', '.join(_WEIGHT_FILES)})")
    if processor:
        check_processor_folder(path, what=what)
    return path


def check_processor_folder(path: PathLike, *, what: str = "PickScoreReward") -> str:
    """Checks that `path` holds a CLIP processor: an image-processor config and tokenizer files."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: no processor folder at {path!r}; {_local_hint()}")
    has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    if not any(has(f) for f in _IMAGE_PROCESSOR_FILES):
        raise FileNotFoundError(f"{what}: {path!r} has no image-processor config ({' or '.join(_IMAGE_PROCESSOR_FILES)}); "
                                "pass processor_path= a folder with the processor files (for PickScore: the base "
                                "laion/CLIP-ViT-H-14-laion2B-s32B-b79K folder)")
    if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
        raise FileNotFoundError(f"{what}: {path!r} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt); "
                                "pass processor_path= a folder with the processor files")
    return path


def _field(obj, key):
    """A key of a size dict (a plain dict in older transformers, a SizeDict in newer ones)."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


class _TensorPreprocess:
    """The image processor's resize / center-crop / rescale / normalise on [B, 3, H, W] tensors."""

    def __init__(self, image_processor) -> None:
        ip = image_processor
        self.do_resize = bool(getattr(ip, "do_resize", True))
        size = getattr(ip, "size", None)
        self.shortest_edge = _field(size, "shortest_edge")
        self.size_hw = (_field(size, "height"), _field(size, "width"))
        if self.do_resize:
            if _field(size, "longest_edge") or _field(size, "max_height"):
                raise ValueError(f"PickScoreReward: unsupported image-processor size {size} (only shortest_edge or height/width)")
            if not self.shortest_edge and not all(self.size_hw):
                raise ValueError(f"PickScoreReward: image-processor size {size} has neither shortest_edge nor height/width")
        resample = getattr(ip, "resample", 3)
        resample = getattr(resample, "value", resample) if resample is not None else 2  # an enum -> its value
        if isinstance(resample, str):  # a torchvision InterpolationMode value ("bicubic", ...)
            resample = {mode: pil_id for pil_id, mode in _RESAMPLE.items()}.get(resample.lower(), resample)
        if self.do_resize and resample not in _RESAMPLE:
            raise ValueError(f"PickScoreReward: image-processor resample={resample} is not supported on tensors "
                             f"(supported PIL ids: {_RESAMPLE})")
        self.mode = _RESAMPLE.get(resample, "bicubic")
        self.do_center_crop = bool(getattr(ip, "do_center_crop", False))
        crop = getattr(ip, "crop_size", None)
        self.crop_hw = (_field(crop, "height"), _field(crop, "width"))
        if self.do_center_crop and not all(self.crop_hw):
            raise ValueError(f"PickScoreReward: image-processor crop_size {crop} needs height and width")
        self.do_normalize = bool(getattr(ip, "do_normalize", True))
        mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
        self.mean = torch.tensor(mean if mean is not None else 0.0, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.std = torch.tensor(std if std is not None else 1.0, dtype=torch.float32).reshape(1, -1, 1, 1)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        if not self.do_resize:
            return h, w
        if self.shortest_edge:
            s = int(self.shortest_edge)
            # as transformers' get_resize_output_image_size(default_to_square=False): the long side truncates
            return (int(s * h / w), s) if w <= h else (s, int(s * w / h))
        return int(self.size_hw[0]), int(self.size_hw[1])

    def __call__(self, images01: Tensor) -> Tensor:
        """images in [0, 1], float, [B, 3, H, W] -> the model's pixel_values (float32)."""
        x = images01
        if self.do_resize:
            size = self.output_size(x.shape[-2], x.shape[-1])
            if self.mode == "nearest":
                x = F.interpolate(x, size=size, mode="nearest") if size != tuple(x.shape[-2:]) else x
            else:
                # PIL resizes 8-bit images in two passes (width, then height), each clipped to the pixel
                # range: an overshoot clipped after the first pass changes the second (by up to ~10/255 on
                # noisy images), so do the same (F.interpolate's antialiased kernels are PIL's).
                if size[1] != x.shape[-1]:
                    x = F.interpolate(x, size=(x.shape[-2], size[1]), mode=self.mode, align_corners=False,
                                      antialias=True).clamp(0, 1)
                if size[0] != x.shape[-2]:
                    x = F.interpolate(x, size=size, mode=self.mode, align_corners=False, antialias=True).clamp(0, 1)
        if self.do_center_crop:
            x = _center_crop(x, int(self.crop_hw[0]), int(self.crop_hw[1]))
        if self.do_normalize:
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x


def _center_crop(x: Tensor, ch: int, cw: int) -> Tensor:
    h, w = x.shape[-2:]
    if ch > h or cw > w:  # the processor zero-pads to the larger size first (centred, ceil on the top/left)
        nh, nw = max(ch, h), max(cw, w)
        top, left = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
        x = F.pad(x, (left, nw - w - left, top, nh - h - top))
        h, w = nh, nw
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top:top + ch, left:left + cw]


def _pooled(out) -> Tensor:
    """get_*_features output -> the projected embeddings (a tensor in transformers 4, a ModelOutput in 5)."""
    if isinstance(out, Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        pooled = out[0] if isinstance(out, (tuple, list)) else None
    if not isinstance(pooled, Tensor):
        raise TypeError(f"PickScoreReward: unexpected CLIP features output {type(out).__name__}")
    return pooled


class PickScoreReward:
    """exp(logit_scale) * cos(CLIP image embedding, prompt text embedding) per sample (see the module
    docstring). samples: images [B, 3, H, W] in [-1, 1]; cond: [B] prompt ids into `prompts`.

    path: local CLIPModel folder (save_pretrained); processor_path: the folder of the processor and
    tokenizer files (default: path). dtype: the model's dtype (e.g. torch.bfloat16 on a GPU); scores
    are computed in float32 from its embeddings. batch_size: images (and prompts) per forward.
    Returns float32 [B] on the samples' device. The model is frozen (eval, no gradients).
    """

    name = "pickscore"

    def __init__(self, path: PathLike, prompts: Sequence[str], *, device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 32, processor_path: Optional[PathLike] = None,
                 name: Optional[str] = None) -> None:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("PickScoreReward: prompts must be a non-empty sequence of prompt texts (cond indexes it)")
        if not all(isinstance(p, str) for p in prompts):
            bad = next(type(p).__name__ for p in prompts if not isinstance(p, str))
            raise TypeError(f"PickScoreReward: prompts must all be str, got a {bad}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"PickScoreReward: batch_size must be an int >= 1, got {batch_size!r}")
        if name is not None:
            self.name = name
        path = check_clip_folder(path, what="PickScoreReward", processor=processor_path is None)
        processor_path = path if processor_path is None else check_processor_folder(processor_path, what="PickScoreReward")
        try:
            from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
        except ImportError as e:
            raise ImportError("PickScoreReward needs the `transformers` package (pip install transformers, or ddrl-engine[pickscore])") from e

        self.prompts = list(prompts)
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        self.path, self.processor_path = path, os.fspath(processor_path)
        # the two halves of the CLIPProcessor, loaded on their own: a folder may hold a combined
        # processor_config.json (transformers 5) or preprocessor_config.json + tokenizer files
        image_processor = AutoImageProcessor.from_pretrained(self.processor_path, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(self.processor_path, local_files_only=True)
        self.preprocess = _TensorPreprocess(image_processor)
        self.model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.logit_scale = float(self.model.logit_scale.detach().float().exp())
        self.text_embeds = self._embed_texts(self.prompts)  # [P, D] float32, L2-normalised

    # -- embeddings ------------------------------------------------------------------------------------

    @torch.no_grad()
    def _embed_texts(self, texts: list[str]) -> Tensor:
        max_len = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True, max_length=max_len,
                                 return_tensors="pt")
            tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
            out.append(_pooled(self.model.get_text_features(**tok)).float())
        return F.normalize(torch.cat(out), dim=-1)

    def _check_images(self, samples) -> None:
        if not isinstance(samples, Tensor) or samples.dim() != 4 or samples.shape[1] != 3 or not samples.is_floating_point():
            got = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
            video = isinstance(samples, Tensor) and samples.dim() == 5
            hint = " (video [B, 3, T, H, W]: wrap the reward in ddrl_engine.rewards.video.FrameAggregated)" if video else ""
            raise ValueError(f"{self.name}: samples must be float images [B, 3, H, W] in [-1, 1], got {got}{hint}")

    def pixel_values(self, samples: Tensor) -> Tensor:
        """samples [B, 3, H, W] in [-1, 1] -> the model's preprocessed pixel_values (float32, on the model's device)."""
        self._check_images(samples)
        x = (samples.detach().to(self.device, torch.float32).clamp(-1, 1) + 1) / 2
        return self.preprocess(x)

    @torch.no_grad()
    def image_features(self, samples: Tensor, *, normalize: bool = True) -> Tensor:
        """CLIP image embeddings [B, D] float32 of samples [B, 3, H, W] in [-1, 1] (L2-normalised unless
        normalize=False), on the samples' device: a feature space for diversity measures."""
        self._check_images(samples)
        out = [torch.zeros(0, self.text_embeds.shape[1], device=self.device)]
        for chunk in samples.split(self.batch_size) if samples.shape[0] else ():
            pixels = self.pixel_values(chunk).to(self.dtype)
            out.append(_pooled(self.model.get_image_features(pixel_values=pixels)).float())
        feats = torch.cat(out)
        return (F.normalize(feats, dim=-1) if normalize else feats).to(samples.device)

    @torch.no_grad()
    def __call__(self, samples: Tensor, cond: Tensor) -> Tensor:
        if not isinstance(cond, Tensor) or cond.dim() != 1 or cond.shape[0] != samples.shape[0]:
            got = tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
            raise ValueError(f"{self.name}: cond must be a tensor [B]=[{samples.shape[0]}] of prompt ids, got {got}")
        if cond.is_floating_point() or cond.dtype == torch.bool:
            raise TypeError(f"{self.name}: cond must hold integer prompt ids, got dtype {cond.dtype}")
        n = len(self.prompts)
        if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= n):
            raise ValueError(f"{self.name}: cond must hold prompt ids in [0, {n}), got {cond.tolist()}")
        img = self.image_features(samples).to(self.device)
        text = self.text_embeds[cond.to(self.device).long()]
        return (self.logit_scale * (img * text).sum(-1)).float().to(samples.device)
