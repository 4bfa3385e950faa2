"""Samplers by name (what configs and the command line use): the sampler registry.

A sampler is one frozen dataclass (a `Sampler` subclass with a class attribute `name`) plus one
registration, `@register_sampler` above its `@dataclass`. Its dataclass fields are its configuration:
`[sampler]` in a TOML config takes `name`, `num_steps` and exactly the chosen sampler's other fields
(types from their annotations, defaults from the dataclass), documented in the sampler's docstring
under "Fields:". The built-in samplers register when `ddrl_engine.sampling` is imported (its
__init__ imports their modules); this module imports none of them, so they can import it.
"""
from __future__ import annotations

import dataclasses

from ddrl_engine.sampling.base import Sampler

SAMPLERS: dict[str, type[Sampler]] = {}
"""The registered samplers, name -> class (filled by `register_sampler`)."""


def register_sampler(cls: type[Sampler]) -> type[Sampler]:
    """Records a Sampler dataclass under its `name`; returns it (so it works as a class decorator).

    The class must be a dataclass subclass of Sampler with a non-empty string `name`, a `num_steps`
    field, and defaults for all its other fields (so a config naming it needs nothing else).
    Registering a second class under a taken name is an error.
    """
    if not (isinstance(cls, type) and issubclass(cls, Sampler) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"register_sampler: {cls!r} must be a dataclass subclass of Sampler "
                        "(put @register_sampler above @dataclass)")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_sampler: {cls.__name__} must set its own class attribute `name` (a non-empty str)")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "num_steps" not in fields:
        raise TypeError(f"register_sampler: {cls.__name__} must have a `num_steps` field")
    missing = [n for n, f in fields.items() if n != "num_steps"
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise TypeError(f"register_sampler: {cls.__name__}'s field(s) {missing} need defaults")
    if "name" in fields:
        raise TypeError(f"register_sampler: {cls.__name__}: 'name' is the registry key, not a field")
    taken = SAMPLERS.get(name)
    if taken is not None and taken is not cls:
        raise ValueError(f"register_sampler: name {name!r} is taken by {taken.__module__}.{taken.__qualname__}")
    SAMPLERS[name] = cls
    return cls


def sampler_class(name: str) -> type[Sampler]:
    """The registered class called `name` (ValueError listing the registered names otherwise)."""
    cls = SAMPLERS.get(name)
    if cls is None:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return cls


def sampler_fields(name: str) -> tuple[dataclasses.Field, ...]:
    """The configuration fields of sampler `name` other than num_steps, in declaration order."""
    return tuple(f for f in dataclasses.fields(sampler_class(name)) if f.name != "num_steps")


def make_sampler(name: str, **kwargs) -> Sampler:
    """make_sampler(name, num_steps=..., **fields), name one of SAMPLERS (e.g. "rectified_flow_sde",
    "ddim", "edm_churn")."""
    cls = sampler_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(f"make_sampler({name!r}): unknown field(s) {unknown}; {cls.__name__} has {sorted(fields)}")
    return cls(**kwargs)
