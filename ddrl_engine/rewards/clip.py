"""Rewards from CLIP models (open_clip), loaded from local files only: a CLIP text-image score
(`CLIPScoreReward`, the built-in "clip_score" of a pipeline run) and the LAION aesthetic predictor
(`AestheticReward`, the built-in "aesthetic": a head on L2-normalised CLIP image embeddings).

Nothing is downloaded. Two ways to give the weights:

1. A model folder in the layout open_clip's Hugging Face hub repositories use (what
   `huggingface-cli download laion/CLIP-ViT-H-14-laion2B-s32B-b79K --local-dir DIR` writes), as
   `[reward_models] clip_score = "DIR"`:
       open_clip_config.json      {"model_cfg": {embed_dim, vision_cfg, text_cfg, ...}, "preprocess_cfg": {...}}
       open_clip_model.safetensors  (or open_clip_pytorch_model.safetensors / .bin / .pth: the first found)
   The model is built here from model_cfg with open_clip's own classes (CLIP, or CustomTextCLIP when
   custom_text is set) and the file loaded into it with open_clip's `load_checkpoint` (strict), never
   through open_clip's hub or pretrained-tag lookups. The tokenizer is open_clip's built-in BPE
   (`SimpleTokenizer`, bundled with the package) with text_cfg's context_length; configs that name a
   Hugging Face text tower or tokenizer (hf_model_name, hf_tokenizer_name) would fetch it and are
   refused with that reason.
   An aesthetic folder (`[reward_models] aesthetic = "DIR"`) is such a CLIP folder (for the LAION
   heads: OpenAI's ViT-L/14, e.g. timm/vit_large_patch14_clip_224.openai) plus ONE head file:
       aesthetic_head.safetensors | aesthetic_head.pth | sac+logos+ava1-l14-linearMSE.pth | sa_0_4_vit_l_14_linear.pth
   holding either the improved-aesthetic-predictor MLP (keys layers.{0,2,4,6,7}.{weight,bias}; the
   LAION sac+logos+ava1 file) or a linear head (keys weight [1, D], bias [1]; LAION's v1 linear file).
2. A built-in open_clip model name and a weights file (`weights=`, `clip_weights=`), as before:
   open_clip.create_model(model_name, pretrained=<the file>).

Folder problems (not a folder, no open_clip_config.json, no weights, no head, a transformers CLIP
folder given instead) raise FileNotFoundError / ValueError naming the folder before any weight is read.

Samples are images [B, 3, H, W] in [-1, 1] (pass `decode=` to map latents to images first). With a
folder, preprocessing follows preprocess_cfg on tensors: [0, 1] pixels, resized with antialiased
`interpolation` (bicubic by default) so the shorter side is the model's image size, center-cropped
(resize_mode "shortest", open_clip's default; "squash" resizes both sides), then normalised with its
mean/std. The difference from open_clip's PIL transform is PIL's uint8 quantisation. With a weights
file, images are resized to the model's square input size. Both rewards are plain `Reward`s, so they
run in `AsyncReward` workers through a picklable factory (`functools.partial(CLIPScoreReward, prompts,
path=...)`).
"""

from __future__ import annotations

import copy
import json
import os
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AESTHETIC_HEAD_FILES", "OPEN_CLIP_WEIGHT_FILES", "AestheticHead", "AestheticReward", "CLIPScoreReward",
           "LinearAestheticHead", "check_open_clip_folder", "load_aesthetic_head", "load_open_clip",
           "load_open_clip_folder"]

PathLike = Union[str, os.PathLike]
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                          "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")  # open_clip's own order
AESTHETIC_HEAD_FILES = ("aesthetic_head.safetensors", "aesthetic_head.pth", "sac+logos+ava1-l14-linearMSE.pth",
                        "sa_0_4_vit_l_14_linear.pth")
_RESIZE_MODES = ("shortest", "squash")
_INTERPOLATIONS = ("bicubic", "bilinear")


def _check_file(path: PathLike, what: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no weight file at {path!r}. Reward weights are read from local files only "
                                "(nothing is downloaded); fetch them beforehand and pass the file's path")
    return path


def _require_open_clip(found: str):
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("CLIP-based rewards need the `open_clip_torch` package (pip install open_clip_torch, or "
                          f"ddrl-engine[clip]); {found} was found") from e
    return open_clip


def load_open_clip(model_name: str, weights: PathLike, device: Union[str, torch.device] = "cpu"):
    """(model, tokenizer) of open_clip `model_name` with weights from the local file `weights`."""
    weights = _check_file(weights, f"open_clip {model_name}")
    open_clip = _require_open_clip(f"weights file {weights!r}")
    try:
        model = open_clip.create_model(model_name, pretrained=weights, device=device)
    except (AssertionError, KeyError, RuntimeError) as e:
        raise ValueError(f"open_clip {model_name}: the weights in {weights!r} do not fit this model "
                         f"({type(e).__name__}: {e}); check model_name") from e
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(model_name)


# ---- open_clip hub-layout folders ------------------------------------------------------------------


def check_open_clip_folder(path: PathLike, *, what: str = "open_clip") -> tuple[str, dict, str]:
    """Checks, without reading weights, that `path` is an open_clip model folder (see the module
    docstring). Returns (path, the parsed open_clip_config.json, the weights file); raises
    FileNotFoundError / ValueError naming the folder and what is missing or unsupported."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: no model folder at {path!r}; reward models are read from local folders only "
                                "(nothing is downloaded): fetch the open_clip repository beforehand")
    config_file = os.path.join(path, OPEN_CLIP_CONFIG)
    if not os.path.isfile(config_file):
        hint = ""
        if os.path.isfile(os.path.join(path, "config.json")):
            hint = (" (it has a config.json: a transformers model folder, e.g. the kind PickScore reads, is not an "
                    "open_clip folder)")
        raise FileNotFoundError(f"{what}: {path!r} has no {OPEN_CLIP_CONFIG}: not an open_clip model folder{hint}; "
                                f"expected {OPEN_CLIP_CONFIG} and one of {', '.join(OPEN_CLIP_WEIGHT_FILES)}")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}: {config_file!r} is not a readable JSON file ({e})") from None
    model_cfg = config.get("model_cfg") if isinstance(config, dict) else None
    if not isinstance(model_cfg, dict) or not all(isinstance(model_cfg.get(k), dict) for k in ("vision_cfg", "text_cfg")):
        raise ValueError(f"{what}: {config_file!r} has no model_cfg with vision_cfg and text_cfg: not an open_clip "
                         "model config")
    text_cfg = model_cfg["text_cfg"]
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text_cfg.get(key):
            raise ValueError(f"{what}: {path!r} uses a Hugging Face text tower or tokenizer (text_cfg.{key} = "
                             f"{text_cfg[key]!r}), which open_clip would download; only models with open_clip's own "
                             "text tower and built-in tokenizer are supported")
    if "multimodal_cfg" in model_cfg:
        raise ValueError(f"{what}: {path!r} is a CoCa model (model_cfg.multimodal_cfg); CLIP models only")
    weights = next((os.path.join(path, f) for f in OPEN_CLIP_WEIGHT_FILES if os.path.isfile(os.path.join(path, f))), None)
    if weights is None:
        raise FileNotFoundError(f"{what}: {path!r} has no weights file (one of {', '.join(OPEN_CLIP_WEIGHT_FILES)})")
    return path, config, weights


def load_open_clip_folder(path: PathLike, device: Union[str, torch.device] = "cpu", *, what: str = "open_clip"):
    """(model, tokenizer, preprocess_cfg) of the open_clip folder `path` (checked first; built from its
    model_cfg, weights loaded strictly; frozen, eval, float32)."""
    path, config, weights = check_open_clip_folder(path, what=what)
    open_clip = _require_open_clip(f"the open_clip folder {path!r}")
    model_cfg = copy.deepcopy(config["model_cfg"])
    custom_text = bool(model_cfg.pop("custom_text", False))
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        model = cls(**model_cfg)
        open_clip.load_checkpoint(model, weights, strict=True)
    except (AssertionError, KeyError, RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{what}: the weights {weights!r} do not fit the model of {os.path.join(path, OPEN_CLIP_CONFIG)!r} "
                         f"({type(e).__name__}: {e})") from e
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model_cfg["text_cfg"].get("context_length", 77),
                                                    **model_cfg["text_cfg"].get("tokenizer_kwargs", {}))
    preprocess = dict(config.get("preprocess_cfg") or {})
    return model.to(device).eval().requires_grad_(False), tokenizer, preprocess


class _CLIPImages(nn.Module):
    """Images in [-1, 1] -> L2-normalised CLIP image embeddings.

    preprocess: a folder's preprocess_cfg (shortest-side resize and center crop by default), or None
    for a model from a weights file (a direct resize to the square input size, as before)."""

    def __init__(self, model, decode: Optional[Callable[[Tensor], Tensor]], preprocess: Optional[dict] = None,
                 *, what: str = "CLIP") -> None:
        super().__init__()
        self.model, self.decode = model, decode
        size = getattr(model.visual, "image_size", 224)
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        cfg = preprocess if preprocess is not None else (getattr(model.visual, "preprocess_cfg", {}) or {})
        self.resize_mode = cfg.get("resize_mode", "shortest") if preprocess is not None else "squash"
        self.interpolation = cfg.get("interpolation", "bicubic") if preprocess is not None else "bicubic"
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(f"{what}: preprocess_cfg.resize_mode = {self.resize_mode!r} is not supported "
                             f"(supported: {_RESIZE_MODES})")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"{what}: preprocess_cfg.interpolation = {self.interpolation!r} is not supported "
                             f"(supported: {_INTERPOLATIONS})")
        self.register_buffer("mean", torch.tensor(cfg.get("mean", _OPENAI_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", _OPENAI_STD)).view(1, 3, 1, 1), persistent=False)

    def pixels(self, x01: Tensor) -> Tensor:
        """[0, 1] images -> the model's input (resized, cropped, normalised), in x01's dtype."""
        th, tw = self.size
        h, w = x01.shape[-2:]
        if self.resize_mode == "shortest":
            short = min(th, tw)  # the shorter side becomes the (square) input size, the longer keeps the aspect
            size = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        else:
            size = (th, tw)
        if size != (h, w):
            x01 = F.interpolate(x01, size=size, mode=self.interpolation, align_corners=False, antialias=True)
        h, w = x01.shape[-2:]
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        x01 = x01[..., top:top + th, left:left + tw]
        return (x01 - self.mean.to(x01)) / self.std.to(x01)

    def forward(self, samples: Tensor) -> Tensor:
        x = self.decode(samples) if self.decode is not None else samples
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            hint = " (video [B, 3, T, H, W]: wrap the reward in ddrl_engine.rewards.video.FrameAggregated)" if (
                isinstance(x, Tensor) and x.dim() == 5) else " (pass decode=)"
            raise ValueError(f"CLIP rewards need images [B, 3, H, W] in [-1, 1], got {got}{hint}")
        x = ((x.float().clamp(-1, 1) + 1) / 2).to(self.mean.device)
        feats = self.model.encode_image(self.pixels(x))
        return F.normalize(feats.float(), dim=-1)


def _check_cond(name: str, cond, n: int, batch: int) -> Tensor:
    if not isinstance(cond, Tensor) or cond.dim() != 1 or cond.shape[0] != batch:
        got = tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
        raise ValueError(f"{name}: cond must be a tensor [B]=[{batch}] of prompt ids, got {got}")
    if cond.is_floating_point() or cond.dtype == torch.bool:
        raise TypeError(f"{name}: cond must hold integer prompt ids, got dtype {cond.dtype}")
    if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= n):
        raise ValueError(f"{name}: cond must hold prompt ids in [0, {n}), got {cond.tolist()}")
    return cond.long()


class CLIPScoreReward:
    """Cosine similarity between the image and its prompt's CLIP embeddings, in [-1, 1].

    prompts: the prompt texts; cond [B] holds prompt ids into them (the last may be the empty prompt).
    path: a local open_clip folder (see the module docstring); or weights + model_name: a built-in
        open_clip model and its local weights file. Give one of the two.
    batch_size: images per forward. name: the reward's name (default "clip_score").
    Returns float32 [B] on the CPU. The model is frozen (eval, no gradients).
    """

    name = "clip_score"

    def __init__(self, prompts: Sequence[str], *, path: Optional[PathLike] = None, weights: Optional[PathLike] = None,
                 model_name: str = "ViT-L-14", device: Union[str, torch.device] = "cpu",
                 decode: Optional[Callable[[Tensor], Tensor]] = None, batch_size: int = 32,
                 name: Optional[str] = None) -> None:
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("CLIPScoreReward: prompts must be a non-empty sequence of prompt texts (cond indexes it)")
        if (path is None) == (weights is None):
            raise ValueError("CLIPScoreReward: give path= (an open_clip folder) or weights= (a weights file for "
                             "model_name), exactly one")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"CLIPScoreReward: batch_size must be an int >= 1, got {batch_size!r}")
        if name is not None:
            self.name = name
        self.prompts, self.batch_size = list(prompts), batch_size
        if path is not None:
            model, tokenizer, preprocess = load_open_clip_folder(path, device, what=f"CLIPScoreReward ({self.name})")
            self.images = _CLIPImages(model, decode, preprocess, what=f"CLIPScoreReward ({self.name})").to(device)
        else:
            model, tokenizer = load_open_clip(model_name, weights, device)
            self.images = _CLIPImages(model, decode).to(device)
        with torch.no_grad():
            text = [model.encode_text(tokenizer(self.prompts[i:i + batch_size]).to(device)).float()
                    for i in range(0, len(self.prompts), batch_size)]
        self.text = F.normalize(torch.cat(text), dim=-1)

    @torch.no_grad()
    def image_features(self, samples: Tensor) -> Tensor:
        """L2-normalised CLIP image embeddings [B, D] (float32, on the samples' device): a feature space for
        the evaluation's diversity."""
        out = [self.images(chunk) for chunk in samples.split(self.batch_size)]
        return (torch.cat(out) if out else torch.zeros(0, self.text.shape[1])).to(samples.device)

    @torch.no_grad()
    def __call__(self, samples: Tensor, cond: Tensor) -> Tensor:
        cond = _check_cond(self.name, cond, len(self.prompts), samples.shape[0])
        img = self.image_features(samples).to(self.text.device)
        return (img * self.text[cond.to(self.text.device)]).sum(-1).cpu()


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP (input: L2-normalised CLIP ViT-L/14 embeddings, 768)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    @property
    def input_size(self) -> int:
        return self.layers[0].in_features

    def forward(self, emb: Tensor) -> Tensor:
        return self.layers(emb).squeeze(-1)

    @classmethod
    def load(cls, path: PathLike) -> "AestheticHead":
        """From a local state-dict file (.pth/.pt or .safetensors; keys layers.{0,2,4,6,7}.{weight,bias}; the
        input size is read from layers.0.weight); errors name what is off."""
        path = _check_file(path, "AestheticHead")
        state = _read_state(path, "AestheticHead")
        first = state.get("layers.0.weight") if isinstance(state, dict) else None
        if not isinstance(first, Tensor) or first.dim() != 2:
            raise ValueError(f"AestheticHead: {path!r} is not an aesthetic-predictor state dict (no layers.0.weight)")
        head = cls(first.shape[1])
        missing, unexpected = head.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"AestheticHead: {path!r} is not an aesthetic-predictor state dict "
                             f"(missing keys {missing}, unexpected keys {unexpected})")
        return head.eval().requires_grad_(False)


class LinearAestheticHead(nn.Module):
    """A linear aesthetic head (LAION's v1 predictor: one nn.Linear(D, 1) on normalised CLIP embeddings)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.linear = nn.Linear(input_size, 1)

    @property
    def input_size(self) -> int:
        return self.linear.in_features

    def forward(self, emb: Tensor) -> Tensor:
        return self.linear(emb).squeeze(-1)


def _read_state(path: str, what: str) -> dict:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: say which
        raise ValueError(f"{what}: {path!r} could not be read as a state dict ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def load_aesthetic_head(path: PathLike) -> nn.Module:
    """The aesthetic head in a local file: the MLP (AestheticHead, keys layers.*) or a linear head
    (LinearAestheticHead, keys weight [1, D] and bias [1]); frozen, eval."""
    path = _check_file(path, "aesthetic head")
    state = _read_state(path, "aesthetic head")
    if isinstance(state, dict) and "layers.0.weight" in state:
        return AestheticHead.load(path)
    weight = state.get("weight") if isinstance(state, dict) else None
    if isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[0] == 1 and set(state) == {"weight", "bias"}:
        head = LinearAestheticHead(weight.shape[1])
        head.linear.load_state_dict(state)
        return head.eval().requires_grad_(False)
    keys = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
    raise ValueError(f"aesthetic head: {path!r} is neither the aesthetic-predictor MLP (layers.0.weight, ...) nor a "
                     f"linear head (weight [1, D], bias [1]); its keys: {keys}")


def _head_file(path: str, what: str) -> str:
    found = [f for f in AESTHETIC_HEAD_FILES if os.path.isfile(os.path.join(path, f))]
    if not found:
        raise FileNotFoundError(f"{what}: {path!r} has no aesthetic head file (one of {', '.join(AESTHETIC_HEAD_FILES)}) "
                                "beside the CLIP model's files")
    if len(found) > 1:
        raise ValueError(f"{what}: {path!r} has several aesthetic head files ({', '.join(found)}); keep one")
    return os.path.join(path, found[0])


class AestheticReward:
    """The LAION aesthetic score (about 1-10 for the LAION heads) of each image; cond is ignored.

    path: a local aesthetic folder (an open_clip folder plus one head file, see the module docstring);
        or clip_weights + head_weights (+ model_name): a built-in open_clip model's weights file and the
        head's file. Give one of the two. Returns float32 [B] on the CPU.
    """

    name = "aesthetic"

    def __init__(self, *, path: Optional[PathLike] = None, clip_weights: Optional[PathLike] = None,
                 head_weights: Optional[PathLike] = None, model_name: str = "ViT-L-14",
                 device: Union[str, torch.device] = "cpu", decode: Optional[Callable[[Tensor], Tensor]] = None,
                 batch_size: int = 32, name: Optional[str] = None) -> None:
        if name is not None:
            self.name = name
        what = f"AestheticReward ({self.name})"
        if (path is None) == (clip_weights is None and head_weights is None):
            raise ValueError("AestheticReward: give path= (an aesthetic folder) or clip_weights= and head_weights= "
                             "(weights files), exactly one of the two")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"AestheticReward: batch_size must be an int >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        if path is not None:
            path = check_open_clip_folder(path, what=what)[0]
            head = load_aesthetic_head(_head_file(path, what))  # the small file first: cheap to check
            model, _, preprocess = load_open_clip_folder(path, device, what=what)
            images = _CLIPImages(model, decode, preprocess, what=what)
            source = path
        else:
            if clip_weights is None or head_weights is None:
                raise ValueError("AestheticReward: give both clip_weights= and head_weights=")
            head = AestheticHead.load(head_weights)  # the small file first: cheap to check
            model, _ = load_open_clip(model_name, clip_weights, device)
            images = _CLIPImages(model, decode)
            source = model_name
        dim = getattr(model.visual, "output_dim", None)
        if dim is not None and dim != head.input_size:
            raise ValueError(f"{what}: the head takes {head.input_size}-d embeddings but the CLIP model of {source!r} "
                             f"gives {dim}-d ones (the LAION heads are for ViT-L/14: 768)")
        self.images = images.to(device)
        self.head = head.to(device)

    @torch.no_grad()
    def image_features(self, samples: Tensor) -> Tensor:
        """L2-normalised CLIP image embeddings [B, D] (float32, on the samples' device)."""
        out = [self.images(chunk) for chunk in samples.split(self.batch_size)]
        return (torch.cat(out) if out else torch.zeros(0, self.head.input_size)).to(samples.device)

    @torch.no_grad()
    def __call__(self, samples: Tensor, cond: Tensor) -> Tensor:
        emb = self.image_features(samples).to(next(self.head.parameters()).device)
        return self.head(emb).float().cpu()
