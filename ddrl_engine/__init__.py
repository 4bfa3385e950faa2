"""ddrl-engine: data-regularized diffusion RL (DDRL) with fused kernels.

Layers (each imports only those below it): ops -> attention -> models -> sampling ->
algorithms; rewards, data, monitors are leaves; trainer brings them together; cli on top.
"""
from ddrl_engine._loader import load_extension as _load_extension

_load_extension()

__version__ = "0.1.0"
