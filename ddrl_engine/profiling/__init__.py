"""Profiling ranges shared by every layer (see ranges.py); the harness and tools live in profiling/ and tools/."""
from ddrl_engine.profiling.ranges import DOMAIN, PHASES, TORCH_PREFIX, phase

__all__ = ["DOMAIN", "PHASES", "TORCH_PREFIX", "phase"]
