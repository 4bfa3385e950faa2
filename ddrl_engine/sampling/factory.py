"""Samplers by name (what configs and the command line use)."""
from __future__ import annotations

import dataclasses

from ddrl_engine.sampling.base import Sampler
from ddrl_engine.sampling.ddim import DDIM
from ddrl_engine.sampling.edm import EDMChurn
from ddrl_engine.sampling.rectified_flow import RectifiedFlowSDE

SAMPLERS: dict[str, type[Sampler]] = {cls.name: cls for cls in (RectifiedFlowSDE, DDIM, EDMChurn)}


def make_sampler(name: str, **kwargs) -> Sampler:
    """make_sampler("rectified_flow_sde" | "ddim" | "edm_churn", num_steps=..., **fields)."""
    cls = SAMPLERS.get(name)
    if cls is None:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(f"make_sampler({name!r}): unknown field(s) {unknown}; {cls.__name__} has {sorted(fields)}")
    return cls(**kwargs)
