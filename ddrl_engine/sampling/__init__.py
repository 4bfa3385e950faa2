"""Stochastic samplers as policies: schedules, the shared step function, the rollout loop (eager, or
captured in a CUDA graph by RolloutRunner: one implementation, `run_chain`).

Works on any policy `policy(x, t, cond) -> Tensor` (ddrl_engine.models.Policy); knows nothing of
training. See base.py for the sampler interface and each sampler for its level conventions; factory.py
for the registry (`register_sampler`) that makes a new sampler usable from configs by name. Importing
this package registers the built-in samplers (their modules are imported here).
"""
from ddrl_engine.sampling.base import NoiseLevel, Sampler, Schedule
from ddrl_engine.sampling.cps import RectifiedFlowCPS
from ddrl_engine.sampling.ddim import DDIM
from ddrl_engine.sampling.edm import EDMChurn
from ddrl_engine.sampling.edm_2ab import EDM2AB
from ddrl_engine.sampling.factory import SAMPLERS, make_sampler, register_sampler
from ddrl_engine.sampling.graphs import RolloutRunner, graph_unavailable_reason
from ddrl_engine.sampling.guidance import Guided
from ddrl_engine.sampling.mismatch import logprob_mismatch, recompute_log_probs, rollout_logprob_mismatch
from ddrl_engine.sampling.rectified_flow import RectifiedFlowSDE
from ddrl_engine.sampling.rollout import Rollout, group_conditions, rollout
from ddrl_engine.sampling.schedules import from_diffusers
from ddrl_engine.sampling.step import StepResult, transition

# The stable names (docs/backend.md). Internals (RolloutBuffers, StepRows, run_chain, draw_noise)
# stay importable from their modules but may change.
__all__ = [
    "DDIM",
    "EDM2AB",
    "EDMChurn",
    "Guided",
    "NoiseLevel",
    "RectifiedFlowCPS",
    "RectifiedFlowSDE",
    "Rollout",
    "RolloutRunner",
    "SAMPLERS",
    "Sampler",
    "Schedule",
    "StepResult",
    "from_diffusers",
    "graph_unavailable_reason",
    "group_conditions",
    "logprob_mismatch",
    "make_sampler",
    "recompute_log_probs",
    "register_sampler",
    "rollout",
    "rollout_logprob_mismatch",
    "transition",
]
