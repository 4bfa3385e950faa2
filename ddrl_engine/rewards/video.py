"""Image rewards on video samples: score frames, reduce over time.

    reward = FrameAggregated(PickScoreReward(path, prompts), reduce="mean", frames=[0, 8, 15])
    reward(videos [B, 3, T, H, W], cond [B]) -> [B]          # name "pickscore/frames_mean"

The chosen frames of every video go through the image reward in one call ([B * T', 3, H, W], each
frame with its video's condition), so an inner reward's own batching applies. In reward workers,
build it from a picklable factory: `functools.partial(frame_aggregated, functools.partial(
PickScoreReward, path, prompts), "min")` (the inner reward is then built in the worker).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["FrameAggregated", "frame_aggregated"]

_REDUCE = ("mean", "min", "max")


class FrameAggregated:
    """Applies an image reward to frames of videos [B, C, T, H, W] and reduces over frames.

    reduce: "mean", "min" (the worst frame) or "max". frames: frame indices to score (negative ones
    count from the end; duplicates are kept, weighting a frame twice in "mean"), or None for all.
    The inner reward's output is checked (a floating tensor [B * T']); a non-finite frame score is
    not hidden: it makes its video's aggregate non-finite, for the caller's validation to catch.
    """

    def __init__(self, reward: Any, reduce: str = "mean", frames: Optional[Sequence[int]] = None) -> None:
        inner_name = getattr(reward, "name", None)
        if not callable(reward) or not isinstance(inner_name, str):
            raise TypeError(f"FrameAggregated: reward must be a Reward (callable with a str `name`), got {type(reward).__name__}")
        if reduce not in _REDUCE:
            raise ValueError(f"FrameAggregated: reduce must be one of {_REDUCE}, got {reduce!r}")
        if frames is not None:
            if isinstance(frames, (str, bytes)) or not isinstance(frames, Sequence):
                raise TypeError(f"FrameAggregated: frames must be a sequence of frame indices or None, got {frames!r}")
            frames = list(frames)
            if not frames or not all(isinstance(f, int) and not isinstance(f, bool) for f in frames):
                raise ValueError(f"FrameAggregated: frames must be a non-empty list of ints, got {frames!r}")
        self.reward, self.reduce, self.frames = reward, reduce, frames
        self.name = f"{inner_name}/frames_{reduce}"

    def frame_indices(self, num_frames: int) -> list[int]:
        """The frame indices scored in a video of num_frames frames (negative ones resolved)."""
        if self.frames is None:
            return list(range(num_frames))
        bad = [f for f in self.frames if not -num_frames <= f < num_frames]
        if bad:
            raise ValueError(f"{self.name}: frame indices {bad} are out of range for videos of {num_frames} frames")
        return [f % num_frames for f in self.frames]

    @torch.no_grad()
    def __call__(self, samples: Tensor, cond: Tensor) -> Tensor:
        if not isinstance(samples, Tensor) or samples.dim() != 5:
            got = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
            raise ValueError(f"{self.name}: samples must be videos [B, C, T, H, W], got {got}")
        b, t = samples.shape[0], samples.shape[2]
        idx = self.frame_indices(t)
        n = len(idx)
        frames = samples[:, :, torch.tensor(idx, device=samples.device)]  # [B, C, T', H, W]
        frames = frames.transpose(1, 2).reshape(b * n, samples.shape[1], *samples.shape[3:])
        if isinstance(cond, Tensor):
            if cond.shape[:1] != (b,):
                raise ValueError(f"{self.name}: cond must have a leading dimension of B={b}, got {tuple(cond.shape)}")
            frame_cond = cond.repeat_interleave(n, dim=0)
        else:
            if len(cond) != b:
                raise ValueError(f"{self.name}: cond must hold B={b} conditions, got {len(cond)}")
            frame_cond = [c for c in cond for _ in range(n)]
        r = self.reward(frames, frame_cond)
        inner = self.reward.name
        if not isinstance(r, Tensor):
            raise TypeError(f"{self.name}: the inner reward {inner!r} returned {type(r).__name__}, expected a torch.Tensor")
        if not r.is_floating_point():
            raise TypeError(f"{self.name}: the inner reward {inner!r} returned dtype {r.dtype}, expected a floating-point tensor")
        if tuple(r.shape) != (b * n,):
            raise ValueError(f"{self.name}: the inner reward {inner!r} returned shape {tuple(r.shape)} for "
                             f"{b * n} frames ({b} videos x {n} frames), expected [{b * n}]")
        per_frame = r.float().view(b, n)
        if self.reduce == "mean":
            return per_frame.mean(1)
        return per_frame.amin(1) if self.reduce == "min" else per_frame.amax(1)


def frame_aggregated(reward_factory: Callable[[], Any], reduce: str = "mean",
                     frames: Optional[Sequence[int]] = None) -> FrameAggregated:
    """FrameAggregated(reward_factory(), reduce, frames): a picklable reward factory for AsyncReward
    workers when reward_factory is (a functools.partial of) a top-level function or class."""
    return FrameAggregated(reward_factory(), reduce, frames)
