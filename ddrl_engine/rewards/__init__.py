"""Rewards: the interface, their validation and weighting, and the default (hackable) rewards."""

from .base import Reward, RewardBatch, WeightedReward, validate_rewards
from .classifier import ClassConfidenceReward, reward_classifier
from .image import BrightnessReward, ContrastReward

__all__ = [
    "BrightnessReward",
    "ClassConfidenceReward",
    "ContrastReward",
    "Reward",
    "RewardBatch",
    "WeightedReward",
    "reward_classifier",
    "validate_rewards",
]
