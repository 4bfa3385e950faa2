"""Samplers on a diffusers pipeline's own schedule: `from_diffusers(scheduler, num_steps, ...)`.

Flow-matching pipelines (SD3, FLUX, Wan) step through `scheduler.sigmas` after
`scheduler.set_timesteps(num_steps, ...)`: K+1 levels from (about) 1 down to a final 0 that the
scheduler appends. Those are the rectified-flow levels t_k themselves (x_t = (1 - t) x0 + t eps), so
the sampler here is `RectifiedFlowSDE(num_steps, sigmas=...)` on exactly those values.
"""
from __future__ import annotations

import copy
import inspect

import torch

from ddrl_engine.sampling.rectified_flow import RectifiedFlowSDE


def from_diffusers(scheduler, num_steps: int, *, noise_level: float | tuple[float, ...] | list[float] = 0.7,
                   **set_timesteps_kwargs) -> RectifiedFlowSDE:
    """The rectified-flow SDE sampler whose levels (`network_level(k)`, k = 0..K) are exactly
    `scheduler.sigmas` after `scheduler.set_timesteps(num_steps, **set_timesteps_kwargs)`.

    scheduler: a diffusers flow-matching scheduler (e.g. FlowMatchEulerDiscreteScheduler); it is not
        modified (set_timesteps runs on a deep copy).
    num_steps: K, the number of SDE steps.
    noise_level: a in std_t = a sqrt(t / (1 - t)), or K per-step values (see RectifiedFlowSDE).
    set_timesteps_kwargs: passed on to set_timesteps; FLUX-style schedulers with
        `use_dynamic_shifting` need `mu` (the resolution-dependent shift).

    Errors (ValueError/TypeError): a scheduler without set_timesteps or sigmas, sigmas outside [0, 1]
    or not K+1 strictly decreasing values ending at 0 (not a flow-matching scheduler), and a
    dynamic-shifting scheduler called without `mu`.
    """
    owner = "from_diffusers"
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"{owner}: 'num_steps' must be an int >= 1, got {num_steps!r}")
    if not callable(getattr(scheduler, "set_timesteps", None)):
        raise TypeError(f"{owner}: 'scheduler' must be a diffusers scheduler with set_timesteps, "
                        f"got {type(scheduler).__name__}")
    config = getattr(scheduler, "config", None)
    dynamic = bool(config.get("use_dynamic_shifting", False)) if hasattr(config, "get") else False
    if dynamic and set_timesteps_kwargs.get("mu") is None:
        raise ValueError(f"{owner}: {type(scheduler).__name__} uses dynamic shifting "
                         "(use_dynamic_shifting=True, as FLUX does): pass its shift as the argument `mu` "
                         "(e.g. from_diffusers(scheduler, num_steps, mu=...), the value the pipeline "
                         "computes from the image sequence length)")
    accepted = inspect.signature(scheduler.set_timesteps).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(set_timesteps_kwargs) - set(accepted))
        if unknown:
            raise TypeError(f"{owner}: {type(scheduler).__name__}.set_timesteps takes no argument(s) {unknown}")
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(num_steps, **set_timesteps_kwargs)
    sigmas = getattr(sched, "sigmas", None)
    if sigmas is None:
        raise ValueError(f"{owner}: {type(scheduler).__name__} has no `sigmas` after set_timesteps: "
                         "not a flow-matching scheduler")
    sigmas = torch.as_tensor(sigmas).detach().cpu().to(torch.float64).flatten()
    name = type(scheduler).__name__
    if sigmas.numel() != num_steps + 1:
        raise ValueError(f"{owner}: {name}.sigmas has {sigmas.numel()} values after "
                         f"set_timesteps({num_steps}), expected num_steps + 1 = {num_steps + 1} "
                         "(K levels and the final 0)")
    if not bool(torch.isfinite(sigmas).all()) or float(sigmas.min()) < 0 or float(sigmas.max()) > 1:
        raise ValueError(f"{owner}: {name}.sigmas must lie in [0, 1] (a flow-matching scheduler's "
                         f"levels t, x_t = (1 - t) x0 + t eps), got min {float(sigmas.min())}, "
                         f"max {float(sigmas.max())}: not a flow-matching scheduler?")
    if isinstance(noise_level, list):
        noise_level = tuple(noise_level)
    return RectifiedFlowSDE(num_steps=num_steps, noise_level=noise_level, sigmas=tuple(sigmas.tolist()))
