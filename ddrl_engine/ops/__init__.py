"""Fused ops of ddrl-engine (torch.ops.ddrl.*), with autograd and torch.compile support."""
from ddrl_engine.ops import transitions
from ddrl_engine.ops.diffusion_loss import diffusion_loss
from ddrl_engine.ops.fp8_attention import fp8_attention
from ddrl_engine.ops.step_logprob import step_logprob
from ddrl_engine.ops.transitions import StepCoefs

__all__ = ["diffusion_loss", "fp8_attention", "step_logprob", "transitions", "StepCoefs"]
