"""A folder of samples as (x, y) tensors, for users who bring their own data.

Files: `.pt` (a tensor saved with torch.save), `.safetensors` (one tensor, or one named "x"), and
`.png`/`.jpg`/`.jpeg` images (pixels scaled to [-1, 1], shape [C, H, W]). Labels, in order of precedence:
  1. `labels.json` at the root: {"relative/path.png": class_id, ...}; every file must be listed;
  2. one subfolder per class (root/<class>/file): class ids are the folder names when all are
     non-negative integers, else the index of the name in sorted order (like torchvision's ImageFolder);
  3. otherwise all files at the root, all labelled `default_label`.
Everything is loaded eagerly (the stream samples from memory); all samples must share one shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

TENSOR_SUFFIXES = (".pt", ".safetensors")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABELS_FILE = "labels.json"


def _load_tensor_file(path: Path) -> Tensor:
    if path.suffix.lower() == ".pt":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, Tensor):
            raise ValueError(f"{path}: expected a tensor saved with torch.save, got {type(obj).__name__}")
        return obj
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if "x" in tensors:
        return tensors["x"]
    if len(tensors) != 1:
        raise ValueError(f"{path}: expected one tensor (or one named 'x'), found {sorted(tensors)}")
    return next(iter(tensors.values()))


def _load_image(path: Path, image_mode: Optional[str]) -> Tensor:
    from PIL import Image

    with Image.open(path) as im:
        if image_mode is not None:
            im = im.convert(image_mode)
        elif im.mode not in ("L", "RGB"):
            im = im.convert("RGB")  # palette / RGBA / 16-bit: normalise to 8-bit RGB
        arr = np.asarray(im, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(arr / 127.5 - 1.0)


def _class_ids(names: list[str]) -> dict[str, int]:
    if all(n.isdigit() for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(sorted(names))}


class FolderDataset:
    """Loads every sample under `root`; `x` [N, *shape] float32, `y` [N] long, `files` relative paths."""

    def __init__(
        self, root: Union[str, Path], *, image_mode: Optional[str] = None, default_label: int = 0
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder root={str(self.root)!r} does not exist or is not a directory")
        suffixes = TENSOR_SUFFIXES + IMAGE_SUFFIXES
        paths = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        if not paths:
            raise FileNotFoundError(f"data folder {str(self.root)!r} holds no {'/'.join(suffixes)} files")
        self.files = [p.relative_to(self.root).as_posix() for p in paths]
        self.classes: dict[str, int] = {}
        labels = self._labels(default_label)

        samples = []
        for path, rel in zip(paths, self.files):
            x = _load_image(path, image_mode) if path.suffix.lower() in IMAGE_SUFFIXES else _load_tensor_file(path)
            if samples and x.shape != samples[0].shape:
                raise ValueError(
                    f"data folder {str(self.root)!r}: {rel} has shape {tuple(x.shape)} but {self.files[0]} "
                    f"has {tuple(samples[0].shape)}; all samples must share one shape"
                )
            samples.append(x.float())
        self.x = torch.stack(samples)
        self.y = torch.tensor(labels, dtype=torch.long)

    def _labels(self, default_label: int) -> list[int]:
        labels_path = self.root / LABELS_FILE
        if labels_path.exists():
            mapping = json.loads(labels_path.read_text())
            if not isinstance(mapping, dict):
                raise ValueError(f"{labels_path}: expected a JSON object mapping file name -> class id")
            out = []
            for rel in self.files:
                label = mapping.get(rel)
                if isinstance(label, bool) or not isinstance(label, int) or label < 0:
                    raise ValueError(f"{labels_path}: file {rel!r} needs a non-negative integer label, got {label!r}")
                out.append(label)
            return out
        depths = {len(Path(rel).parts) for rel in self.files}
        if depths == {2}:
            self.classes = _class_ids(sorted({Path(rel).parts[0] for rel in self.files}))
            return [self.classes[Path(rel).parts[0]] for rel in self.files]
        if depths == {1}:
            return [int(default_label)] * len(self.files)
        raise ValueError(
            f"data folder {str(self.root)!r} mixes files at several depths; put all files at the root or one "
            f"subfolder per class, or list every file in {LABELS_FILE}"
        )

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


def load_folder(
    root: Union[str, Path], *, image_mode: Optional[str] = None, default_label: int = 0
) -> tuple[Tensor, Tensor]:
    """(x, y) tensors of every sample under `root`; see `FolderDataset`."""
    ds = FolderDataset(root, image_mode=image_mode, default_label=default_label)
    return ds.x, ds.y
