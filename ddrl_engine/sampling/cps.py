"""Coefficients-Preserving Sampling (CPS) for rectified flow: Flow-GRPO's sde_type "cps" with a true
Gaussian log-density.

Wang & Yu, "Coefficients-Preserving Sampling for Reinforcement Learning with Flow Matching" (arXiv
2509.05952): each step re-noises the predicted sample so the next state has exactly the forward
process's coefficients, x_{t'} = (1 - t') x0_hat + t' (mixed noise), unlike the SDE step whose extra
noise inflates the noise level. Flow-GRPO's CPS "log-prob" is -(x_next - mu)^2 with every constant
dropped, the 1/(2 std^2) scale included; here the log-prob is the Gaussian's own (`ops.step_logprob`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ddrl_engine.ops import transitions
from ddrl_engine.sampling.base import NoiseLevel, Sampler, Schedule, check_num_steps, check_positive
from ddrl_engine.sampling.factory import register_sampler
from ddrl_engine.sampling.rectified_flow import RectifiedFlowSDE, check_levels, euler_ode, flow_levels


@register_sampler
@dataclass(frozen=True)
class RectifiedFlowCPS(Sampler):
    """K CPS steps from t = t_0 <= 1 (1: pure noise) to t = 0 (the sample itself; `finish` is the identity).

    Levels, network level, forward process and training target are RectifiedFlowSDE's (x_t = (1 - t) x0
    + t eps, the network sees t and predicts the velocity v ~ eps - x0). A step from t to t' < t, with
    x0_hat = x - t v and eps_hat = x + (1 - t) v (`ops.transitions.rectified_flow_cps`):

        std = t' sin(eta pi / 2),   mu = (1 - t') x0_hat + sqrt(t'^2 - std^2) eps_hat.

    The last step lands on t' = 0, so its std is 0: it is deterministic (x_K = x0_hat, no noise drawn,
    log-prob 0, not a density) and never trained (`stochastic_steps` is False there; the trainer leaves
    it out of train_steps "all"/"every_other" and refuses it in a list or an SDE window). Its ODE
    step (outside an SDE window) is the Euler step x + (t' - t) v, which is also CPS at eta -> 0.

    Fields:
        num_steps: K >= 1 (K - 1 stochastic steps; K = 1 has none to train).
        eta: in (0, 1], the share of fresh noise: std = t' sin(eta pi / 2); 1 re-draws all of the next
            level's noise, small values approach the deterministic ODE. 0.8 is the value Flow-GRPO's
            CPS configs set as their noise_level (config/grpo.py, e.g. geneval_sd3_fast_nocfg).
        shift: > 0, the SD3 time shift of the uniform levels, as in rectified_flow_sde; must stay 1 when
            sigmas is given.
        sigmas: the K+1 levels t_0 > ... > t_K = 0 with t_0 <= 1, as in rectified_flow_sde.
    """

    num_steps: int
    eta: float = 0.8
    shift: float = 1.0
    sigmas: tuple[float, ...] | None = None

    name = "rectified_flow_cps"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_num_steps(owner, self.num_steps)
        check_positive(owner, "eta", self.eta)
        if self.eta > 1:
            raise ValueError(f"{owner}: 'eta' must be in (0, 1] (std = t' sin(eta pi / 2)), got {self.eta}")
        check_levels(self)
        self._init_tables()

    @staticmethod
    def continuous_level(t: torch.Tensor) -> NoiseLevel:
        """The forward process at continuous times t (as RectifiedFlowSDE.continuous_level)."""
        return RectifiedFlowSDE.continuous_level(t)

    def _schedule(self) -> Schedule:
        t = flow_levels(self.num_steps, self.shift, self.sigmas)
        ones = torch.ones_like(t)
        ode_x, ode_out = euler_ode(t)
        return Schedule(
            network_level=t,
            step=transitions.rectified_flow_cps(t[:-1], t[1:], self.eta),
            data_scale=1 - t,
            noise_scale=t,
            target_noise=ones,
            target_data=-ones,
            finish_x=None,
            finish_out=None,
            ode_x=ode_x,
            ode_out=ode_out,
        )
