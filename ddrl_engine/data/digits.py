"""The default data set: scikit-learn's bundled 8x8 digits (1797 images, no download)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DIGITS_NUM_CLASSES = 10
DIGITS_SAMPLE_SHAPE = (1, 8, 8)


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """All digits as (x [N, 1, 8, 8] float32 in [-1, 1], y [N] long); background -1, full ink +1."""
    from sklearn.datasets import load_digits  # local: sklearn is slow to import and only needed here

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)  # pixel values are 0..16
    y = torch.from_numpy(d.target.astype(np.int64))
    return x, y


@dataclass
class DigitsSplit:
    """A stratified split; *_index are the row numbers in `load_digits_tensors()` (disjoint)."""

    train_x: Tensor
    train_y: Tensor
    heldout_x: Tensor
    heldout_y: Tensor
    train_index: Tensor
    heldout_index: Tensor


def digits_split(seed: int = 0, heldout_fraction: float = 0.2) -> DigitsSplit:
    """Deterministic stratified train/held-out split of the digits (same seed -> same split)."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    x, y = load_digits_tensors()
    idx = np.arange(len(y))
    train_idx, held_idx = train_test_split(
        idx, test_size=heldout_fraction, random_state=int(seed), shuffle=True, stratify=y.numpy()
    )
    train_idx, held_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(held_idx))
    return DigitsSplit(x[train_idx], y[train_idx], x[held_idx], y[held_idx], train_idx, held_idx)
