"""Rewards for tests/test_async_rewards.py, importable by spawned worker processes."""

import os
import time

import torch

from ddrl_engine.rewards import BrightnessReward, ContrastReward, WeightedReward


def weighted_pixels():
    return WeightedReward([BrightnessReward(), ContrastReward()], weights=[1.0, 0.5])


class ScriptedReward:
    """Mean pixel value, unless cond is a dict {"mode": ..., "once": key} asking it to misbehave:
    "slow" (sleeps cond["delay"] s first), "hang" (sleeps an hour), "fail" (raises), "crash" (the
    process exits), "nan" (returns NaN). With "once", it misbehaves only on the first attempt for
    that key (a marker file in `marker_dir`, which survives worker restarts)."""

    name = "scripted"

    def __init__(self, marker_dir: str) -> None:
        self.marker_dir = marker_dir

    def __call__(self, samples, cond):
        mean = samples.flatten(1).float().mean(1)
        if not isinstance(cond, dict):
            return mean
        once = cond.get("once")
        if once is not None:
            marker = os.path.join(self.marker_dir, once)
            if os.path.exists(marker):
                return mean
            open(marker, "w").close()
        mode = cond["mode"]
        if mode == "slow":
            time.sleep(cond["delay"])
        elif mode == "hang":
            time.sleep(3600)
        elif mode == "fail":
            raise RuntimeError("reward server unreachable")
        elif mode == "crash":
            os._exit(3)
        elif mode == "nan":
            return torch.full_like(mean, float("nan"))
        return mean


class SlowReward:
    name = "slow"

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __call__(self, samples, cond):
        time.sleep(self.delay)
        return samples.flatten(1).float().mean(1)


def broken_factory():
    raise FileNotFoundError("reward weights not found at /nonexistent/aesthetic.pth")


class SlowBrightness:
    """The built-in brightness reward after `delay` seconds (a slow reward model)."""

    name = "brightness"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay, self.inner = delay, BrightnessReward()

    def __call__(self, samples, cond):
        time.sleep(self.delay)
        return self.inner(samples, cond)


class FailingBrightness:
    """Named like the run's reward, fails every time (an unreachable reward service)."""

    name = "brightness"

    def __call__(self, samples, cond):
        raise ConnectionError("reward service unreachable")


class NaNBrightness:
    """Named like the run's reward, returns NaN (a reward model that diverged)."""

    name = "brightness"

    def __call__(self, samples, cond):
        return torch.full((samples.shape[0],), float("nan"))


class WrongShapeBrightness:
    """Named like the run's reward, returns one value per pixel row instead of one per sample."""

    name = "brightness"

    def __call__(self, samples, cond):
        return samples.flatten(1).float()
