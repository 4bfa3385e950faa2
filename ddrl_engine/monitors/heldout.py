"""Watches the held-out diffusion loss: a rise above its starting value is the paper's sign of reward
hacking (over 10% is a red flag). The loss itself is computed by the trainer; this only judges it."""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional


class HeldoutLossMonitor:
    """`update(step, value)`: the first value is the baseline; warns once each time the loss crosses
    above baseline * (1 + rise_threshold) (re-armed when it falls back below). With early_stop, the
    first crossing sets `should_stop`, which stays set (stopping is a one-way decision)."""

    def __init__(self, rise_threshold: float = 0.10, early_stop: bool = False) -> None:
        if not (isinstance(rise_threshold, (int, float)) and rise_threshold > 0 and math.isfinite(rise_threshold)):
            raise ValueError(f"rise_threshold must be a positive finite number, got {rise_threshold!r}")
        self.rise_threshold = float(rise_threshold)
        self.early_stop = bool(early_stop)
        self.start: Optional[float] = None
        self.start_step: Optional[int] = None
        self.last_step: Optional[int] = None
        self.last_value: Optional[float] = None
        self.above = False
        self.num_crossings = 0
        self.should_stop = False

    @property
    def limit(self) -> Optional[float]:
        return None if self.start is None else self.start * (1 + self.rise_threshold)

    @property
    def rise(self) -> Optional[float]:
        """Relative change of the last value from the start (0.1 = 10% higher)."""
        if self.start is None or self.last_value is None:
            return None
        return self.last_value / self.start - 1

    def update(self, step: int, value: float) -> bool:
        """Records one measurement; returns whether it is above the limit."""
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"held-out loss at step {step} is not finite: {value}")
        if self.start is None:
            if value <= 0:
                raise ValueError(f"held-out loss baseline must be positive for a relative threshold, got {value}")
            self.start, self.start_step = value, int(step)
        self.last_step, self.last_value = int(step), value
        above = value > self.limit
        if above and not self.above:
            self.num_crossings += 1
            warnings.warn(
                f"held-out diffusion loss rose {100 * (value / self.start - 1):.1f}% (step {step}: {value:.4g}, "
                f"start at step {self.start_step}: {self.start:.4g}), above the {100 * self.rise_threshold:.0f}% "
                "threshold: a sign of reward hacking",
                RuntimeWarning,
                stacklevel=2,
            )
            if self.early_stop:
                self.should_stop = True
        self.above = above
        return above

    _STATE_KEYS = ("start", "start_step", "last_step", "last_value", "above", "num_crossings", "should_stop")

    def state_dict(self) -> dict[str, Any]:
        return {
            "rise_threshold": self.rise_threshold,
            "early_stop": self.early_stop,
            **{k: getattr(self, k) for k in self._STATE_KEYS},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the baseline and crossing state; the threshold and early_stop of this instance
        (from the current config) are kept, so a resumed run may change them."""
        missing = [k for k in self._STATE_KEYS if k not in state]
        if missing:
            raise KeyError(f"HeldoutLossMonitor state is missing {missing}")
        for k in self._STATE_KEYS:
            setattr(self, k, state[k])
        self.should_stop = bool(state["should_stop"]) and self.early_stop
