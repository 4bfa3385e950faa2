"""ddrl-engine: data-regularized diffusion RL (DDRL) with fused kernels.

Package imports (each imports only the packages in its parentheses, all named before it):
  ops (the compiled extension only); profiling and data (nothing of the engine);
  attention (ops); models (attention); sampling (ops, attention, profiling; a policy is any
  callable, so not models); algorithms (ops, sampling); rewards (data: the digits classifier);
  monitors (data: the held-out digits classifier); pipelines (models: a diffusers folder's policy,
  text encoders and VAE); trainer (any of the above); cli (trainer);
  info (attention and the extension loader).
"""
from ddrl_engine._loader import load_extension as _load_extension

_load_extension()

__version__ = "0.1.0"
