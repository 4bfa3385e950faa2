"""EDM (Karras et al. 2022) Euler sampler with churn, the network a denoiser D(x; sigma) ~ x0."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ddrl_engine.ops import transitions
from ddrl_engine.sampling.base import Sampler, Schedule, check_num_steps, check_positive
from ddrl_engine.sampling.factory import register_sampler


@register_sampler
@dataclass(frozen=True)
class EDMChurn(Sampler):
    """K stochastic Euler-with-churn steps over Karras sigmas; the state is the churned x_hat.

    Sigmas: sigma_i = (sigma_max^(1/rho) + i/K (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i = 0..K, churned to sigma_hat_i = (1 + churn) sigma_i (churn is Karras' gamma, applied at every
    level). x_0 = x_hat_0 ~ N(0, sigma_hat_0^2 I); step k is the Euler step from x_hat_k at
    sigma_hat_k to sigma_{k+1} followed by the churn to sigma_hat_{k+1}, one Gaussian transition
    (`ops.transitions.edm_churn`); `finish` returns D(x_hat_K; sigma_hat_K).
    Network level: Karras' c_noise, t = ln(sigma_hat) / 4; the policy returns D itself (its
    preconditioning is inside the policy). Forward process x = x0 + sigma_hat eps; target: x0.

    Fields:
        num_steps: K >= 1.
        churn: gamma > 0, the relative noise increase per level (sigma_hat = (1 + gamma) sigma).
        sigma_min, sigma_max: 0 < sigma_min < sigma_max (EDM defaults 0.002, 80).
        rho: > 0, the Karras schedule exponent (7).
    """

    num_steps: int
    churn: float = 0.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    name = "edm_churn"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_num_steps(owner, self.num_steps)
        for field in ("churn", "sigma_min", "sigma_max", "rho"):
            check_positive(owner, field, getattr(self, field))
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"{owner}: need sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        self._init_tables()

    @property
    def sigmas(self) -> torch.Tensor:
        """Karras sigmas sigma_0 = sigma_max > ... > sigma_K = sigma_min (float64, CPU), before churn."""
        i = torch.arange(self.num_steps + 1, dtype=torch.float64) / self.num_steps
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (hi + i * (lo - hi)) ** self.rho

    @property
    def initial_scale(self) -> float:
        return (1 + self.churn) * self.sigma_max

    def _schedule(self) -> Schedule:
        sigma = self.sigmas
        sigma_hat = (1 + self.churn) * sigma
        # D at the last level is the Euler step to sigma = 0: x_coef 0, out_coef 1.
        final = transitions.edm_churn(sigma_hat[-1], 0.0, self.churn)
        return Schedule(
            network_level=sigma_hat.log() / 4,
            step=transitions.edm_churn(sigma_hat[:-1], sigma[1:], self.churn),
            data_scale=torch.ones_like(sigma),
            noise_scale=sigma_hat,
            target_noise=torch.zeros_like(sigma),
            target_data=torch.ones_like(sigma),
            finish_x=final.x_coef,
            finish_out=final.out_coef,
        )
