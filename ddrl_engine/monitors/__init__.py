"""Monitors of reward hacking: realism (Frechet distance), diversity, held-out loss rise."""

from .diversity import class_entropy, label_entropy, mean_pairwise_distance
from .heldout import HeldoutLossMonitor
from .realism import FrechetDistance, digits_frechet_distance, frechet_distance, realism_classifier_features

__all__ = [
    "FrechetDistance",
    "HeldoutLossMonitor",
    "class_entropy",
    "digits_frechet_distance",
    "frechet_distance",
    "label_entropy",
    "mean_pairwise_distance",
    "realism_classifier_features",
]
