"""An infinite, seeded, resumable batch stream over in-memory tensors.

Each epoch is a permutation drawn from (seed, epoch) alone, so the stream's full state is three
integers: a resumed run regenerates the permutation and continues with exactly the same batches.
A batch that reaches the end of an epoch is completed from the start of the next one, so every
batch is full and every epoch visits every item once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


class DataStream:
    """`next_batch()` -> (x[idx], y[idx]) forever; `state_dict()`/`load_state_dict()` for resume."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int = 0) -> None:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"x must hold at least one item along dim 0, got shape {tuple(x.shape)}")
        if y.shape[:1] != x.shape[:1]:
            raise ValueError(f"y must have one entry per item of x: x {tuple(x.shape)}, y {tuple(y.shape)}")
        if int(batch_size) <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size!r}")
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0  # items of the current epoch already served
        self._perm = self._permutation(0)

    def __len__(self) -> int:
        return self.x.shape[0]

    def _permutation(self, epoch: int) -> Tensor:
        # SeedSequence([seed, epoch]) gives independent streams per (seed, epoch) without collisions.
        rng = np.random.default_rng([self.seed, epoch])
        return torch.from_numpy(rng.permutation(len(self))).to(self.x.device)

    def next_indices(self) -> Tensor:
        parts, need = [], self.batch_size
        while need > 0:
            take = min(need, len(self) - self.position)
            parts.append(self._perm[self.position : self.position + take])
            self.position += take
            need -= take
            if self.position == len(self):
                self.epoch += 1
                self.position = 0
                self._perm = self._permutation(self.epoch)
        return torch.cat(parts)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        idx = self.next_indices()
        return self.x[idx], self.y[idx]

    def __iter__(self) -> "DataStream":
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "num_items": len(self),
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "epoch", "position", "num_items"):
            if key not in state:
                raise KeyError(f"DataStream state is missing {key!r}")
        if int(state["num_items"]) != len(self):
            raise ValueError(
                f"DataStream state was saved for {state['num_items']} items but this stream has {len(self)}"
            )
        if not 0 <= int(state["position"]) < len(self) or int(state["epoch"]) < 0:
            raise ValueError(f"DataStream state has an invalid epoch/position: {state['epoch']}/{state['position']}")
        # batch_size is not restored: changing it on resume is legitimate; the item order stays the same.
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)
