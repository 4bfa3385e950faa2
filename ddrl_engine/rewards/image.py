"""Pixel-statistics rewards: deliberately easy to hack, to show what DDRL's data term prevents.

Samples are clamped to [-1, 1] first, as decoding to an image would, so the hack is saturation
(every pixel at +1), not unbounded values.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _flat(samples: Tensor, name: str) -> Tensor:
    if not isinstance(samples, Tensor) or samples.dim() < 2 or not samples.is_floating_point():
        got = getattr(samples, "shape", samples)
        raise ValueError(f"{name}: samples must be a floating tensor [B, ...], got {got}")
    return samples.detach().float().clamp(-1, 1).flatten(1)


class BrightnessReward:
    """Mean pixel value ("ink" for digits: background -1, strokes +1). Hacked by saturating to +1."""

    name = "brightness"

    @torch.no_grad()
    def __call__(self, samples: Tensor, cond: Tensor) -> Tensor:
        return _flat(samples, self.name).mean(dim=1)


class ContrastReward:
    """Pixel standard deviation per sample. Hacked by pushing every pixel to -1 or +1."""

    name = "contrast"

    @torch.no_grad()
    def __call__(self, samples: Tensor, cond: Tensor) -> Tensor:
        return _flat(samples, self.name).std(dim=1, unbiased=False)
