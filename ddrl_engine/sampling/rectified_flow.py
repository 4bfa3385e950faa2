"""Rectified-flow SDE sampler (Flow-GRPO style): x_t = (1 - t) x0 + t eps, the network predicts the
velocity f ~ eps - x0, and each step is the SDE transition of `ops.transitions.rectified_flow_sde`."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ddrl_engine.ops import transitions
from ddrl_engine.sampling.base import NoiseLevel, Sampler, Schedule, check_num_steps, check_positive
from ddrl_engine.sampling.factory import register_sampler


@register_sampler
@dataclass(frozen=True)
class RectifiedFlowSDE(Sampler):
    """K SDE steps from t = 1 (pure noise) to t = 0 (the sample itself; `finish` is the identity).

    Levels: t_k = s(1 - k/K), k = 0..K, with the SD3 time shift s(t) = shift t / (1 + (shift - 1) t)
    (shift = 1: uniform). The last step goes to t = 0; its std uses the current t, so it is finite.
    Network level: t itself, in [0, 1] (1 = pure noise). Training target: the velocity eps - x0.

    Fields:
        num_steps: K >= 1.
        noise_level: a > 0 in std_t = a sqrt(t / (1 - t)) (0.7 is the Flow-GRPO default).
        shift: > 0; values above 1 spend more steps at high noise (SD3 uses 3).
    """

    num_steps: int
    noise_level: float = 0.7
    shift: float = 1.0

    name = "rectified_flow_sde"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_num_steps(owner, self.num_steps)
        check_positive(owner, "noise_level", self.noise_level)
        check_positive(owner, "shift", self.shift)
        self._init_tables()

    @staticmethod
    def continuous_level(t: torch.Tensor) -> NoiseLevel:
        """The forward process at continuous times t in [0, 1] ([B] or 0-dim): x = (1 - t) x0 + t eps,
        the network sees t, the target is the velocity eps - x0 (flow-matching pretraining)."""
        one = torch.ones((), dtype=t.dtype, device=t.device)
        return NoiseLevel(t, 1 - t, t, one, -one)

    def _schedule(self) -> Schedule:
        t = torch.linspace(1.0, 0.0, self.num_steps + 1, dtype=torch.float64)
        t = self.shift * t / (1 + (self.shift - 1) * t)
        ones = torch.ones_like(t)
        return Schedule(
            network_level=t,
            step=transitions.rectified_flow_sde(t[:-1], t[1:], self.noise_level),
            data_scale=1 - t,
            noise_scale=t,
            target_noise=ones,
            target_data=-ones,
            finish_x=None,
            finish_out=None,
        )
