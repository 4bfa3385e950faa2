"""Rewards: the interface, their validation and weighting, the default (hackable) rewards, and
`AsyncReward` (rewards in worker processes), `HttpReward` / `serve_reward` (a reward model behind a
local HTTP endpoint), `PickScoreReward` (a local transformers CLIP folder), `FrameAggregated` (image
rewards on video frames), `load_reward` / `build_named_rewards` (rewards by name or import path).
CLIP-based rewards (open_clip, local weights) live in `ddrl_engine.rewards.clip`."""

from .async_rewards import AsyncReward, AsyncRewardStats, RewardFailedError, RewardHandle, RewardWorkerError
from .base import InvalidRewardError, Reward, RewardBatch, WeightedReward, validate_rewards
from .classifier import ClassConfidenceReward, ClassMarginReward, class_margin, reward_classifier
from .http import HttpReward, RewardServer, serve_reward
from .image import BrightnessReward, ContrastReward
from .pickscore import PickScoreReward
from .registry import RewardContext, build_named_rewards, load_reward
from .video import FrameAggregated


__all__ = [
    "FrameAggregated",
    "InvalidRewardError",
    "PickScoreReward",
    "RewardContext",
    "build_named_rewards",
    "load_reward",
    "AsyncReward",
    "AsyncRewardStats",
    "BrightnessReward",
    "ClassConfidenceReward",
    "ClassMarginReward",
    "ContrastReward",
    "HttpReward",
    "Reward",
    "RewardBatch",
    "RewardFailedError",
    "RewardHandle",
    "RewardServer",
    "RewardWorkerError",
    "WeightedReward",
    "class_margin",
    "reward_classifier",
    "serve_reward",
    "validate_rewards",
]
