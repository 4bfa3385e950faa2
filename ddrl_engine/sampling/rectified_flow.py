"""Rectified-flow SDE sampler (Flow-GRPO style): x_t = (1 - t) x0 + t eps, the network predicts the
velocity f ~ eps - x0, and each step is the SDE transition of `ops.transitions.rectified_flow_sde`."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddrl_engine.ops import transitions
from ddrl_engine.ops.transitions import StepCoefs
from ddrl_engine.sampling.base import NoiseLevel, Sampler, Schedule, check_num_steps, check_positive
from ddrl_engine.sampling.factory import register_sampler


def _float_tuple(owner: str, name: str, value) -> tuple[float, ...]:
    """A list/tuple of finite real numbers (ints accepted, bools not) as a tuple of floats."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().tolist()
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{owner}: '{name}' must be a list of numbers, got {type(value).__name__} {value!r}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{owner}: '{name}[{i}]' must be a number, got {type(v).__name__} {v!r}")
        if not math.isfinite(v):
            raise ValueError(f"{owner}: '{name}[{i}]' must be finite, got {v}")
        out.append(float(v))
    return tuple(out)


def check_levels(sampler) -> None:
    """Validates a rectified-flow sampler's `shift` and `sigmas` fields (stores sigmas as a tuple of
    floats); shared by RectifiedFlowSDE and RectifiedFlowCPS."""
    owner, k = type(sampler).__name__, sampler.num_steps
    check_positive(owner, "shift", sampler.shift)
    if sampler.sigmas is not None:
        sig = _float_tuple(owner, "sigmas", sampler.sigmas)
        if len(sig) != k + 1:
            raise ValueError(f"{owner}: 'sigmas' must have num_steps + 1 = {k + 1} values "
                             f"(levels 0..K, ending at 0), got {len(sig)}")
        if sig[-1] != 0:
            raise ValueError(f"{owner}: 'sigmas' must end at 0 (the chain ends at the sample), got {sig[-1]}")
        if not sig[0] <= 1:
            raise ValueError(f"{owner}: 'sigmas' must start at a level <= 1 (1 = pure noise), got {sig[0]}")
        bad = [i for i in range(k) if not sig[i] > sig[i + 1]]
        if bad:
            i = bad[0]
            raise ValueError(f"{owner}: 'sigmas' must be strictly decreasing, got sigmas[{i}] = {sig[i]} "
                             f"<= sigmas[{i + 1}] = {sig[i + 1]}")
        if sampler.shift != 1.0:
            raise ValueError(f"{owner}: give either 'sigmas' or 'shift' (sigmas already include any "
                             f"shift), got both (shift={sampler.shift})")
        object.__setattr__(sampler, "sigmas", sig)


def flow_levels(num_steps: int, shift: float, sigmas: tuple[float, ...] | None) -> torch.Tensor:
    """The K+1 levels t_0..t_K in float64: the given sigmas, or the shifted uniform schedule."""
    if sigmas is not None:
        return torch.tensor(sigmas, dtype=torch.float64)
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def euler_ode(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ode_x, ode_out) of the deterministic Euler steps over the levels t [K+1]:
    x_{k+1} = x_k + (t_{k+1} - t_k) f (the probability-flow ODE of a velocity model)."""
    return torch.ones_like(t[:-1]), t[1:] - t[:-1]


@register_sampler
@dataclass(frozen=True)
class RectifiedFlowSDE(Sampler):
    """K SDE steps from t = t_0 <= 1 (1: pure noise) to t = 0 (the sample itself; `finish` is the identity).

    Levels: t_k = s(1 - k/K), k = 0..K, with the SD3 time shift s(t) = shift t / (1 + (shift - 1) t)
    (shift = 1: uniform), or the K+1 given `sigmas` (e.g. a diffusers scheduler's, see
    `sampling.from_diffusers`). The last step goes to t = 0; its std uses the current t, so it is finite.
    Network level: t itself, in [0, 1] (1 = pure noise). Training target: the velocity eps - x0.

    Fields:
        num_steps: K >= 1.
        noise_level: a > 0 in std_t = a sqrt(t / (1 - t)) (0.7 is the Flow-GRPO default), or a list of
            K per-step values a_k > 0 (step k uses a_k).
        shift: > 0; values above 1 spend more steps at high noise (SD3 uses 3). Must stay 1 when sigmas
            is given.
        sigmas: the K+1 levels t_0 > t_1 > ... > t_K = 0 with t_0 <= 1 (unset: the shifted uniform
            schedule), overriding shift.
    """

    num_steps: int
    noise_level: float | tuple[float, ...] = 0.7
    shift: float = 1.0
    sigmas: tuple[float, ...] | None = None

    name = "rectified_flow_sde"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_num_steps(owner, self.num_steps)
        k = self.num_steps
        if isinstance(self.noise_level, (list, tuple, torch.Tensor)):
            levels = _float_tuple(owner, "noise_level", self.noise_level)
            if len(levels) != k:
                raise ValueError(f"{owner}: 'noise_level' as a list must have num_steps = {k} values "
                                 f"(one per step), got {len(levels)}")
            for i, a in enumerate(levels):
                check_positive(owner, f"noise_level[{i}]", a)
            object.__setattr__(self, "noise_level", levels)
        else:
            check_positive(owner, "noise_level", self.noise_level)
        check_levels(self)
        self._init_tables()

    @staticmethod
    def continuous_level(t: torch.Tensor) -> NoiseLevel:
        """The forward process at continuous times t in [0, 1] ([B] or 0-dim): x = (1 - t) x0 + t eps,
        the network sees t, the target is the velocity eps - x0 (flow-matching pretraining)."""
        one = torch.ones((), dtype=t.dtype, device=t.device)
        return NoiseLevel(t, 1 - t, t, one, -one)

    def _levels(self) -> torch.Tensor:
        """The K+1 levels t_0..t_K in float64."""
        return flow_levels(self.num_steps, self.shift, self.sigmas)

    def _schedule(self) -> Schedule:
        t = self._levels()
        ones = torch.ones_like(t)
        if isinstance(self.noise_level, tuple):
            # One transition per step (elementwise float64 math: the same per element as one call).
            # t_for_first_std = t_1 keeps the first step's std finite at t_0 = 1, as in the one call.
            per = [transitions.rectified_flow_sde(t[i], t[i + 1], a, t_for_first_std=t[1])
                   for i, a in enumerate(self.noise_level)]
            step = StepCoefs(*(torch.stack([getattr(p, f) for p in per]) for f in ("x_coef", "out_coef", "std")))
        else:
            step = transitions.rectified_flow_sde(t[:-1], t[1:], self.noise_level)
        ode_x, ode_out = euler_ode(t)
        return Schedule(
            network_level=t,
            step=step,
            data_scale=1 - t,
            noise_scale=t,
            target_noise=ones,
            target_data=-ones,
            finish_x=None,
            finish_out=None,
            ode_x=ode_x,
            ode_out=ode_out,
        )
