"""Rewards: the interface, their validation and weighting, the default (hackable) rewards, and
`AsyncReward` (rewards in worker processes). CLIP-based rewards (open_clip, local weights) live in
`ddrl_engine.rewards.clip`."""

from .async_rewards import AsyncReward, AsyncRewardStats, RewardFailedError, RewardHandle, RewardWorkerError
from .base import Reward, RewardBatch, WeightedReward, validate_rewards
from .classifier import ClassConfidenceReward, reward_classifier
from .image import BrightnessReward, ContrastReward

__all__ = [
    "AsyncReward",
    "AsyncRewardStats",
    "BrightnessReward",
    "ClassConfidenceReward",
    "ContrastReward",
    "Reward",
    "RewardBatch",
    "RewardFailedError",
    "RewardHandle",
    "RewardWorkerError",
    "WeightedReward",
    "reward_classifier",
    "validate_rewards",
]
