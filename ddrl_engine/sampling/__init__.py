"""Stochastic samplers as policies: schedules, the shared step function, the rollout loop.

Works on any policy `policy(x, t, cond) -> Tensor` (ddrl_engine.models.Policy); knows nothing of
training. See base.py for the sampler interface and each sampler for its level conventions.
"""
from ddrl_engine.sampling.base import Sampler, Schedule
from ddrl_engine.sampling.ddim import DDIM
from ddrl_engine.sampling.edm import EDMChurn
from ddrl_engine.sampling.factory import SAMPLERS, make_sampler
from ddrl_engine.sampling.mismatch import logprob_mismatch, recompute_log_probs, rollout_logprob_mismatch
from ddrl_engine.sampling.rectified_flow import RectifiedFlowSDE
from ddrl_engine.sampling.rollout import Rollout, StepRows, group_conditions, rollout
from ddrl_engine.sampling.step import StepResult, transition

__all__ = [
    "DDIM",
    "EDMChurn",
    "RectifiedFlowSDE",
    "Rollout",
    "SAMPLERS",
    "Sampler",
    "Schedule",
    "StepResult",
    "StepRows",
    "group_conditions",
    "logprob_mismatch",
    "make_sampler",
    "recompute_log_probs",
    "rollout",
    "rollout_logprob_mismatch",
    "transition",
]
