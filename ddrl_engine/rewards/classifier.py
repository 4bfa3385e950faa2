"""Rewards from the engine's digits classifier (trained on the train split): the class confidence, and
the class margin, a learned reward model that can be fooled (`ClassMarginReward`)."""

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


def class_margin(logits: Tensor, cond: Tensor) -> Tensor:
    """logit[cond] - max over the other classes' logits, per row ([B, C], [B] -> [B])."""
    own = logits.gather(1, cond.long().unsqueeze(1)).squeeze(1)
    others = logits.scatter(1, cond.long().unsqueeze(1), float("-inf")).amax(dim=1)
    return own - others


def _check_cond(name: str, samples: Tensor, cond: Tensor, num_classes: int) -> None:
    if cond.dim() != 1 or cond.shape[0] != samples.shape[0]:
        raise ValueError(f"{name}: cond must have shape [B]=[{samples.shape[0]}], got {tuple(cond.shape)}")
    if cond.numel() and (cond.min() < 0 or cond.max() >= num_classes):
        raise ValueError(f"{name}: cond must hold class ids in [0, {num_classes}), got {cond.tolist()}")


class _ClassifierReward:
    """A reward read from the classifier's logits of the samples (clamped to the image range) and cond."""

    name = ""

    def __init__(self, classifier: DigitsClassifier) -> None:
        self.classifier = classifier.eval().requires_grad_(False)

    def score(self, logits: Tensor, cond: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, samples: Tensor, cond: Tensor) -> Tensor:
        _check_cond(self.name, samples, cond, self.classifier.config.num_classes)
        self.classifier.to(samples.device)
        return self.score(self.classifier.logits(samples.detach().float().clamp(-1, 1)), cond).float()


class ClassConfidenceReward(_ClassifierReward):
    """p(cond | sample) under the classifier, in [0, 1]. cond must be a real class, not the null class."""

    name = "class_confidence"

    def score(self, logits: Tensor, cond: Tensor) -> Tensor:
        return logits.softmax(dim=-1).gather(1, cond.long().unsqueeze(1)).squeeze(1)


class ClassMarginReward(_ClassifierReward):
    """A learned reward model to exploit: the train-split classifier's logit margin of the conditioned
    class, logit[cond] - max_other logit (unbounded, unlike the confidence).

    It rises within the data (clear, typical digits of the class score higher than ambiguous ones) and
    also for patterns off the data that push the classifier's logits apart, so a policy can raise it by
    fooling the reward model, as RL on learned image rewards can. The evaluation's `class_margin_heldout`
    is the same margin under an independent classifier (trained on the held-out split): a gain that
    does not carry over to it fooled this model rather than drew better digits.
    """

    name = "class_margin"

    def score(self, logits: Tensor, cond: Tensor) -> Tensor:
        return class_margin(logits, cond)
