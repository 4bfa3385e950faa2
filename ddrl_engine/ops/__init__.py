"""Fused ops of ddrl-engine (torch.ops.ddrl.*), with autograd and torch.compile support."""
from ddrl_engine.ops import transitions
from ddrl_engine.ops.diffusion_loss import diffusion_loss
from ddrl_engine.ops.step_logprob import step_logprob
from ddrl_engine.ops.transitions import StepCoefs

__all__ = ["diffusion_loss", "step_logprob", "transitions", "StepCoefs"]
