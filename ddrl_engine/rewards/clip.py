"""Rewards from CLIP models (open_clip), loaded from local weight files only: a CLIP text-image score
and the LAION aesthetic predictor (an MLP on CLIP ViT-L/14 image embeddings).

Nothing is downloaded: weights are files you fetched beforehand, e.g.
    CLIP ViT-L/14 (OpenAI):  open_clip's "ViT-L-14" / "openai" checkpoint (a .pt or .bin file)
    aesthetic head:          sac+logos+ava1-l14-linearMSE.pth (LAION improved-aesthetic-predictor)
A missing file or a missing `open_clip_torch` package raise with the cause and the fix. Tokenizers:
models whose open_clip config uses the built-in BPE tokenizer (the OpenAI ViT-B/L models) need no
download; models with a Hugging Face tokenizer would try to fetch it and are not supported here.

Samples are images [B, 3, H, W] in [-1, 1] (pass `decode=` to map latents to images first, e.g. a
VAE decode); they are resized to the model's input size and normalised with its mean/std. Both
rewards are plain `Reward`s, so they run in `AsyncReward` workers through a picklable factory:
`functools.partial(AestheticReward, clip_weights=..., head_weights=...)`.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AestheticHead", "AestheticReward", "CLIPScoreReward", "load_open_clip"]

PathLike = Union[str, os.PathLike]
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_file(path: PathLike, what: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no weight file at {path!r}. Reward weights are read from local files only "
                                "(nothing is downloaded); fetch them beforehand and pass the file's path")
    return path


def load_open_clip(model_name: str, weights: PathLike, device: Union[str, torch.device] = "cpu"):
    """(model, tokenizer) of open_clip `model_name` with weights from the local file `weights`."""
    weights = _check_file(weights, f"open_clip {model_name}")
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("CLIP-based rewards need the `open_clip_torch` package (pip install open_clip_torch); "
                          f"weights file {weights!r} was found") from e
    try:
        model = open_clip.create_model(model_name, pretrained=weights, device=device)
    except (AssertionError, KeyError, RuntimeError) as e:
        raise ValueError(f"open_clip {model_name}: the weights in {weights!r} do not fit this model "
                         f"({type(e).__name__}: {e}); check model_name") from e
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(model_name)


class _CLIPImages(nn.Module):
    """Images in [-1, 1] -> L2-normalised CLIP image embeddings."""

    def __init__(self, model, decode: Optional[Callable[[Tensor], Tensor]]) -> None:
        super().__init__()
        self.model, self.decode = model, decode
        size = getattr(model.visual, "image_size", 224)
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", _OPENAI_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", _OPENAI_STD)).view(1, 3, 1, 1), persistent=False)

    def forward(self, samples: Tensor) -> Tensor:
        x = self.decode(samples) if self.decode is not None else samples
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"CLIP rewards need images [B, 3, H, W] in [-1, 1], got {tuple(x.shape)} (pass decode=)")
        x = ((x.float().clamp(-1, 1) + 1) / 2).to(self.mean.device)
        x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False, antialias=True)
        feats = self.model.encode_image((x - self.mean) / self.std)
        return F.normalize(feats.float(), dim=-1)


class CLIPScoreReward:
    """Cosine similarity between the image and its prompt's CLIP embeddings, in [-1, 1].

    prompts: the prompt texts; cond [B] holds prompt ids into them.
    """

    name = "clip_score"

    def __init__(self, prompts: Sequence[str], *, weights: PathLike, model_name: str = "ViT-L-14",
                 device: Union[str, torch.device] = "cpu", decode: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        if not prompts:
            raise ValueError("CLIPScoreReward: prompts must not be empty")
        model, tokenizer = load_open_clip(model_name, weights, device)
        self.images = _CLIPImages(model, decode).to(device)
        with torch.no_grad():
            self.text = F.normalize(model.encode_text(tokenizer(list(prompts)).to(device)).float(), dim=-1)

    @torch.no_grad()
    def __call__(self, samples: Tensor, cond: Tensor) -> Tensor:
        img = self.images(samples)
        return (img * self.text[cond.to(self.text.device)]).sum(-1).cpu()


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP (input: L2-normalised CLIP ViT-L/14 embeddings, 768)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, emb: Tensor) -> Tensor:
        return self.layers(emb).squeeze(-1)

    @classmethod
    def load(cls, path: PathLike) -> "AestheticHead":
        """From a local state-dict file (keys layers.{0,2,4,6,7}.{weight,bias}; the input size is read
        from layers.0.weight); errors name what is off."""
        path = _check_file(path, "AestheticHead")
        state = torch.load(path, map_location="cpu", weights_only=True)
        first = state.get("layers.0.weight") if isinstance(state, dict) else None
        if not isinstance(first, Tensor) or first.dim() != 2:
            raise ValueError(f"AestheticHead: {path!r} is not an aesthetic-predictor state dict (no layers.0.weight)")
        head = cls(first.shape[1])
        missing, unexpected = head.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"AestheticHead: {path!r} is not an aesthetic-predictor state dict "
                             f"(missing keys {missing}, unexpected keys {unexpected})")
        return head.eval().requires_grad_(False)


class AestheticReward:
    """The LAION aesthetic score (about 1-10) of each image; cond is ignored."""

    name = "aesthetic"

    def __init__(self, *, clip_weights: PathLike, head_weights: PathLike, model_name: str = "ViT-L-14",
                 device: Union[str, torch.device] = "cpu", decode: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        head = AestheticHead.load(head_weights)  # the small file first: cheap to check
        model, _ = load_open_clip(model_name, clip_weights, device)
        dim = getattr(model.visual, "output_dim", None)
        if dim is not None and dim != head.layers[0].in_features:
            raise ValueError(f"AestheticReward: the head takes {head.layers[0].in_features}-d embeddings but "
                             f"{model_name} gives {dim}-d ones (the LAION head is for ViT-L-14)")
        self.images = _CLIPImages(model, decode).to(device)
        self.head = head.to(device)

    @torch.no_grad()
    def __call__(self, samples: Tensor, cond: Tensor) -> Tensor:
        return self.head(self.images(samples)).float().cpu()
