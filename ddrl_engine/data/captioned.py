"""Captioned folders (the Hugging Face imagefolder convention) and their on-disk latent cache.

A captioned folder holds images (.png/.jpg/.jpeg/.webp) or videos (.mp4/.webm/.mov/.mkv/.avi) and a
`metadata.jsonl` at its root, one JSON object a line: {"file_name": "relative/path.png", "text": "a
caption"} (other fields are ignored; blank lines are skipped; a file not listed is not used).

`LatentCache` encodes every item once through the caller's `encode_fn` and stores the latents in
safetensors shards under `root/<model_key>/latents-*.safetensors` (same shard store, atomic writes
and concurrency rules as the prompt cache, see `embedding_cache`). An entry's key hashes the file's
bytes, model_key, the resolution and (videos) the frame count, so a renamed file is reused and an
edited one re-encoded.

Preprocessing, for a target resolution (H, W) (an int r means (r, r)): the image is converted to RGB,
resized with PIL bicubic resampling so that it covers (H, W) while keeping its aspect ratio (the
scale is max(H / h, W / w); an image already of size (H, W) is not resampled), then center-cropped
to (H, W) (an odd excess puts the extra pixel at the bottom/right), and scaled from [0, 255] to [-1, 1]:
`pixels [3, H, W] float32`. Videos: the first `num_frames` frames, each preprocessed like an image,
as [3, T, H, W]; decoding needs PyAV (`pip install av`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .embedding_cache import CacheReport, ShardReader, ShardStore, _format_bytes, _hash, _positive, check_model_key

METADATA_FILE = "metadata.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi")
_PREPROCESS_VERSION = "resize-cover-bicubic+center-crop-v1"

Resolution = Union[int, tuple[int, int]]


class VideoDecodingUnavailable(ImportError):
    """Raised when a video must be decoded and no video library (PyAV) is installed."""


def read_captioned(root: Union[str, Path]) -> list[tuple[Path, str]]:
    """[(path, caption)] of a captioned folder, in metadata.jsonl order (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"captioned folder {str(root)!r} does not exist or is not a directory")
    meta = root / METADATA_FILE
    if not meta.is_file():
        raise FileNotFoundError(f"captioned folder {str(root)!r} has no {METADATA_FILE} "
                                f"(one JSON object a line: {{\"file_name\": ..., \"text\": ...}})")
    items: list[tuple[Path, str]] = []
    seen: dict[str, int] = {}
    with meta.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            where = f"{meta}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict) or "file_name" not in obj or "text" not in obj:
                raise ValueError(f"{where}: expected a JSON object with \"file_name\" and \"text\", got {line[:80]!r}")
            name, text = obj["file_name"], obj["text"]
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: \"file_name\" must be a non-empty string, got {name!r}")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: empty caption for {name!r} (\"text\" must be a non-empty string)")
            path = root / name
            if Path(name).is_absolute() or os.path.normpath(name).split(os.sep)[0] == "..":
                raise ValueError(f"{where}: file_name {name!r} must be a path inside the folder")
            if path.suffix.lower() not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
                raise ValueError(f"{where}: {name!r} is neither an image ({', '.join(IMAGE_SUFFIXES)}) "
                                 f"nor a video ({', '.join(VIDEO_SUFFIXES)})")
            if not path.is_file():
                raise FileNotFoundError(f"{where}: listed file {name!r} does not exist")
            if name in seen:
                raise ValueError(f"{where}: {name!r} is listed twice (first on line {seen[name]})")
            seen[name] = lineno
            items.append((path, text.strip()))
    if not items:
        raise ValueError(f"{meta} lists no file")
    return items


def _resolution(resolution: Resolution) -> tuple[int, int]:
    hw = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in hw):
        raise ValueError(f"resolution must be a positive int or (height, width), got {resolution!r}")
    return hw  # type: ignore[return-value]


def _resize_crop(im, hw: tuple[int, int]) -> Tensor:
    from PIL import Image

    im = im.convert("RGB")
    (h, w), (th, tw) = (im.height, im.width), hw
    if (h, w) != (th, tw):
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        top, left = (nh - th) // 2, (nw - tw) // 2
        im = im.crop((left, top, left + tw, top + th))
    arr = np.asarray(im, dtype=np.float32).transpose(2, 0, 1)
    return torch.from_numpy(arr / 127.5 - 1.0)


def load_image(path: Union[str, Path], resolution: Resolution) -> Tensor:
    """An image as pixels [3, H, W] float32 in [-1, 1], resized and center-cropped (module docstring)."""
    from PIL import Image

    with Image.open(path) as im:
        return _resize_crop(im, _resolution(resolution))


def load_video(path: Union[str, Path], resolution: Resolution, num_frames: int) -> Tensor:
    """The first `num_frames` frames of a video as [3, T, H, W] float32 in [-1, 1] (needs PyAV)."""
    hw, num_frames = _resolution(resolution), _positive("num_frames", num_frames)
    try:
        import av
    except ImportError:
        raise VideoDecodingUnavailable(f"decoding the video {str(path)!r} needs PyAV (`pip install av`), "
                                       "which is not installed") from None
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(_resize_crop(frame.to_image(), hw))
            if len(frames) == num_frames:
                break
    if len(frames) < num_frames:
        raise ValueError(f"video {str(path)!r} has {len(frames)} frames, fewer than num_frames={num_frames}")
    return torch.stack(frames, dim=1)


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


@dataclass
class CaptionedLatents:
    """Latents of a captioned folder: `latents` [N, ...] (encode_fn's dtype), `caption_ids` long [N]
    indexing `captions` (the distinct captions, first-appearance order), `files` [N] the sources.

    (latents, caption_ids) fit `Dataset` when the prompt list is `captions`; to use another prompt
    list that contains the captions (e.g. training prompts + captions), use `ids_into(prompts)`.
    Put the captions into the PromptCache so that the ids resolve to embeddings.
    """

    latents: Tensor
    caption_ids: Tensor
    captions: list[str]
    files: list[Path]

    def ids_into(self, prompts: Sequence[str]) -> Tensor:
        """Each item's caption as an index into `prompts` (its first occurrence there)."""
        first: dict[str, int] = {}
        for i, p in enumerate(prompts):
            first.setdefault(p, i)
        absent = [c for c in self.captions if c not in first]
        if absent:
            raise KeyError(f"{len(absent)} captions are not in the prompt list, e.g. {absent[:3]}")
        table = torch.tensor([first[c] for c in self.captions], dtype=torch.long)
        return table[self.caption_ids]


class LatentCache:
    """Encoder latents of captioned-folder items on disk under `root/<model_key>/` (module docstring)."""

    def __init__(self, root: Union[str, Path], model_key: str) -> None:
        self.root = Path(root)
        self.model_key = check_model_key(model_key)
        self.directory = self.root / model_key
        self.store = ShardStore(self.directory, "latents")
        self._digests: dict[tuple[str, int, int], str] = {}

    def __repr__(self) -> str:
        return f"LatentCache({str(self.directory)!r}: {len(self.store)} items, {_format_bytes(self.disk_bytes())} on disk)"

    def disk_bytes(self) -> int:
        return self.store.disk_bytes()

    def _digest(self, path: Path) -> str:
        st = path.stat()
        memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if memo not in self._digests:
            h = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._digests[memo] = h.hexdigest()
        return self._digests[memo]

    def key(self, path: Union[str, Path], resolution: Resolution, num_frames: Optional[int] = None) -> str:
        path = Path(path)
        h, w = _resolution(resolution)
        frames = str(_positive("num_frames", num_frames)) if _is_video(path) else "image"
        return _hash("latent", self.model_key, _PREPROCESS_VERSION, f"{h}x{w}", frames, self._digest(path))

    def _load(self, path: Path, hw: tuple[int, int], num_frames: Optional[int]) -> Tensor:
        return load_video(path, hw, num_frames) if _is_video(path) else load_image(path, hw)

    def build(
        self,
        items: Sequence[tuple[Union[str, Path], str]],
        encode_fn: Callable[[Tensor], Tensor],
        *,
        resolution: Resolution,
        num_frames: Optional[int] = None,
        batch_size: int = 8,
        progress: bool = True,
    ) -> CacheReport:
        """Encodes the items not cached yet, `batch_size` at a time: `encode_fn(pixels)` gets
        [B, 3, H, W] (videos: [B, 3, T, H, W]) float32 in [-1, 1] and returns latents [B, ...], stored
        as CPU tensors in their dtype, one shard per batch. items: (path, caption) as read_captioned gives."""
        from tqdm.auto import tqdm

        hw, batch_size = _resolution(resolution), _positive("batch_size", batch_size)
        paths = [Path(p) for p, _ in items]
        if len({_is_video(p) for p in paths}) > 1:
            raise ValueError("a captioned folder must hold only images or only videos (encode_fn takes one kind)")
        self.store.refresh()
        todo: dict[str, Path] = {}
        for p in paths:
            k = self.key(p, hw, num_frames)
            if k not in self.store:
                todo.setdefault(k, p)
        reused = len({self.key(p, hw, num_frames) for p in paths}) - len(todo)
        keys, shards = list(todo), 0
        with tqdm(total=len(keys), unit="item", desc=f"latent cache {self.model_key}",
                  disable=not progress or not keys) as bar:
            for i in range(0, len(keys), batch_size):
                batch = keys[i : i + batch_size]
                pixels = torch.stack([self._load(todo[k], hw, num_frames) for k in batch])
                with torch.no_grad():
                    latents = encode_fn(pixels)
                if not isinstance(latents, Tensor) or latents.dim() < 1 or latents.shape[0] != len(batch):
                    raise ValueError(f"encode_fn must return latents [B={len(batch)}, ...], got "
                                     f"{tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__}")
                files = json.dumps([todo[k].name for k in batch])
                self.store.write(batch, {"latents": latents.detach().to("cpu").contiguous()},
                                 {"model_key": self.model_key, "files": files, "resolution": f"{hw[0]}x{hw[1]}"})
                shards += 1
                bar.update(len(batch))
            if keys:
                bar.set_postfix_str(f"{_format_bytes(self.disk_bytes())} on disk")
        return CacheReport(encoded=len(keys), reused=reused, shards_written=shards, disk_bytes=self.disk_bytes())

    def load(
        self,
        items: Sequence[tuple[Union[str, Path], str]],
        *,
        resolution: Resolution,
        num_frames: Optional[int] = None,
    ) -> CaptionedLatents:
        """The cached latents of `items` (all must be built), stacked in item order."""
        hw = _resolution(resolution)
        if not items:
            raise ValueError("load() needs at least one (path, caption) item")
        self.store.refresh()
        paths = [Path(p) for p, _ in items]
        keys = [self.key(p, hw, num_frames) for p in paths]
        absent = [str(p) for p, k in zip(paths, keys) if k not in self.store]
        if absent:
            raise KeyError(f"{len(absent)} items are not in {self!r}, e.g. {absent[:3]}; call build() first")
        specs = {self.store.shard(self.store.location(k)[0]).rows["latents"] for k in keys}
        if len(specs) > 1:
            raise ValueError(f"{self.directory}: cached latents differ in (dtype, shape): {sorted(specs)}")
        reader = ShardReader(self.store, max_open=8)
        latents = reader.read_rows([self.store.location(k) for k in keys], {"latents": specs.pop()})["latents"]
        captions = list(dict.fromkeys(c for _, c in items))
        index = {c: i for i, c in enumerate(captions)}
        caption_ids = torch.tensor([index[c] for _, c in items], dtype=torch.long)
        return CaptionedLatents(latents, caption_ids, captions, paths)

    def encode(
        self,
        items: Sequence[tuple[Union[str, Path], str]],
        encode_fn: Callable[[Tensor], Tensor],
        *,
        resolution: Resolution,
        num_frames: Optional[int] = None,
        batch_size: int = 8,
        progress: bool = True,
    ) -> CaptionedLatents:
        """build() then load(): encodes what is missing and returns all latents."""
        self.build(items, encode_fn, resolution=resolution, num_frames=num_frames,
                   batch_size=batch_size, progress=progress)
        return self.load(items, resolution=resolution, num_frames=num_frames)
