"""Policies: the interface samplers and algorithms rely on, and our DiT. The diffusers adapters
(SD3, FLUX, Wan) live in `ddrl_engine.models.diffusers` (optional dependency: diffusers, peft)."""

from .dit import DiT, DiTConfig
from .policy import Policy

__all__ = ["DiT", "DiTConfig", "Policy"]
