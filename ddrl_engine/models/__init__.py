"""Policies: the interface samplers and algorithms rely on, and our DiT."""

from .dit import DiT, DiTConfig
from .policy import Policy

__all__ = ["DiT", "DiTConfig", "Policy"]
