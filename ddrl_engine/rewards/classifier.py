"""Class-confidence reward from the engine's digits classifier (trained on the train split)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from ..data.digits import DigitsSplit, digits_split
from ..data.digits_classifier import DigitsClassifier, DigitsClassifierConfig, load_or_train_digits_classifier


def reward_classifier(
    split: Optional[DigitsSplit] = None,
    config: DigitsClassifierConfig = DigitsClassifierConfig(),
    cache_dir: Optional[Union[str, Path]] = None,
) -> DigitsClassifier:
    """The reward's classifier: trained on the TRAIN split (monitors use one trained on the held-out split)."""
    split = digits_split() if split is None else split
    return load_or_train_digits_classifier(split.train_x, split.train_y, config, cache_dir)


class ClassConfidenceReward:
    """p(cond | sample) under the classifier, in [0, 1]. cond must be a real class, not the null class."""

    name = "class_confidence"

    def __init__(self, classifier: DigitsClassifier) -> None:
        self.classifier = classifier.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, samples: Tensor, cond: Tensor) -> Tensor:
        num_classes = self.classifier.config.num_classes
        if cond.dim() != 1 or cond.shape[0] != samples.shape[0]:
            raise ValueError(f"cond must have shape [B]=[{samples.shape[0]}], got {tuple(cond.shape)}")
        if cond.numel() and (cond.min() < 0 or cond.max() >= num_classes):
            raise ValueError(f"{self.name}: cond must hold class ids in [0, {num_classes}), got {cond.tolist()}")
        self.classifier.to(samples.device)
        probs = self.classifier.logits(samples.detach().float().clamp(-1, 1)).softmax(dim=-1)
        return probs.gather(1, cond.long().unsqueeze(1)).squeeze(1).float()
