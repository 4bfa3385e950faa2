"""Diversity of a sample set: reward hacking typically collapses it (mode collapse, one saturated look)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def mean_pairwise_distance(samples: Tensor) -> float:
    """Mean L2 distance over all pairs i < j of flattened samples [N, ...] (N >= 2), in float64."""
    if not isinstance(samples, Tensor) or samples.dim() < 1 or samples.shape[0] < 2:
        raise ValueError(f"samples must be a tensor [N, ...] with N >= 2, got {getattr(samples, 'shape', samples)}")
    x = samples.detach().reshape(samples.shape[0], -1).to(torch.float64)
    n = x.shape[0]
    d = torch.cdist(x, x)
    return float(d.sum() / (n * (n - 1)))  # the diagonal is 0; each pair is counted twice over n(n-1)


def label_entropy(labels: Tensor, num_classes: int | None = None) -> float:
    """Entropy (nats) of the empirical distribution of integer labels [N]; 0 when all are equal."""
    if labels.dim() != 1 or labels.numel() == 0 or labels.is_floating_point():
        raise ValueError(f"labels must be a non-empty 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    counts = torch.bincount(labels.detach().long().cpu(), minlength=num_classes or 0).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def class_entropy(samples: Tensor, logits_fn: Callable[[Tensor], Tensor]) -> float:
    """Entropy (nats) of the classes a classifier assigns (argmax of `logits_fn(samples)` [N, K]).

    log(K) for samples spread evenly over K classes, 0 when all fall in one class.
    """
    with torch.no_grad():
        logits = logits_fn(samples)
    if logits.dim() != 2 or logits.shape[0] != samples.shape[0]:
        raise ValueError(f"logits_fn must return [N, K] = [{samples.shape[0]}, K] logits, got {tuple(logits.shape)}")
    return label_entropy(logits.argmax(dim=1), logits.shape[1])

