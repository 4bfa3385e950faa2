"""The policy interface: what samplers and algorithms may assume about a network.

A policy maps (state x, noise level t, condition cond) to a network output of the same shape as x
(a velocity, an epsilon, ...; what it means is the sampler's business). Everything above the models
layer talks to networks only through this interface, so our DiT and adapters for other model
libraries are interchangeable.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class Policy(nn.Module):
    """Base class of all policies.

    Attributes:
        sample_shape: the per-sample state shape, (C, H, W) for images or (C, T, H, W) for video.
        num_classes: the number of real classes; the class id `num_classes` is the null
            (unconditional) class used for classifier-free guidance.

    Subclasses implement `forward(x, t, cond)`:
        x: [B, *sample_shape] float state.
        t: [B] float noise level in the sampler's own parametrisation (rectified flow: t in [0, 1],
           1 = pure noise). A 0-dim t is broadcast to the batch.
        cond: [B] long class ids in [0, num_classes] (num_classes = null).
        returns: a tensor with the shape and dtype of x.
    """

    def __init__(self, sample_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        shape = tuple(int(s) for s in sample_shape)
        if len(shape) not in (3, 4) or any(s <= 0 for s in shape):
            raise ValueError(f"sample_shape must be (C, H, W) or (C, T, H, W) of positive sizes, got {sample_shape!r}")
        if int(num_classes) < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes!r}")
        self.sample_shape: tuple[int, ...] = shape
        self.num_classes: int = int(num_classes)

    @property
    def null_class(self) -> int:
        """The class id that means "no condition" (classifier-free guidance)."""
        return self.num_classes

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x, t, cond)")

    def check_state(self, x: Tensor, t: Tensor, *, exact_shape: bool = False) -> Tensor:
        """Checks the state x and the level t (no host sync); returns t as [B]. With exact_shape the
        spatial size must be sample_shape's too (models that cannot change resolution)."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        same = tuple(x.shape[1:]) == self.sample_shape if exact_shape else x.shape[1] == self.sample_shape[0]
        if x.dim() != len(self.sample_shape) + 1 or not same:
            raise ValueError(f"x must have shape [B, *{self.sample_shape}], got {tuple(x.shape)}")
        batch = x.shape[0]
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"t must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must have shape [B]=[{batch}] (or be 0-dim), got {tuple(t.shape)}")
        return t

    def check_inputs(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Checks shapes and dtypes (no host sync, so it is safe under CUDA graphs); returns t as [B]."""
        t = self.check_state(x, t)
        batch = x.shape[0]
        if not isinstance(cond, Tensor) or cond.dtype != torch.long:
            raise TypeError(f"cond must be a long tensor of class ids, got {getattr(cond, 'dtype', type(cond))}")
        if cond.shape != (batch,):
            raise ValueError(f"cond must have shape [B]=[{batch}], got {tuple(cond.shape)}")
        return t
