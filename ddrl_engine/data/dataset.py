"""A dataset as the trainer and evaluator see it: train and held-out tensors with condition ids."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Dataset:
    """train_x / heldout_x: [N, *sample_shape] in the policy's state space (pixels in [-1, 1], or
    latents); train_y / heldout_y: long [N] condition ids (classes, prompt ids)."""

    train_x: Tensor
    train_y: Tensor
    heldout_x: Tensor
    heldout_y: Tensor

    def __post_init__(self) -> None:
        for split in ("train", "heldout"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
                raise TypeError(f"Dataset.{split}_x must be a floating-point tensor [N, *sample_shape], "
                                f"got {getattr(x, 'shape', type(x).__name__)}")
            if not isinstance(y, Tensor) or y.dtype != torch.long or y.shape != x.shape[:1]:
                raise TypeError(f"Dataset.{split}_y must be a long tensor [N] = [{x.shape[0]}] of condition ids, "
                                f"got {getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")

    @classmethod
    def split(cls, x: Tensor, y: Tensor, heldout_fraction: float, seed: int = 0) -> "Dataset":
        """A random split keeping round(heldout_fraction * N) items (at least 1) out of training."""
        n_held = max(1, int(round(heldout_fraction * x.shape[0])))
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
        held, train = perm[:n_held], perm[n_held:]
        return cls(x[train], y[train], x[held], y[held])
