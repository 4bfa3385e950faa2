"""EDM (Karras et al. 2022) Euler sampler with churn, the network a denoiser D(x; sigma) ~ x0."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ddrl_engine.ops import transitions
from ddrl_engine.sampling.base import Sampler, Schedule, check_num_steps, check_positive
from ddrl_engine.sampling.factory import register_sampler


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """Karras sigmas sigma_i = (sigma_max^(1/rho) + i/K (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i = 0..K: sigma_0 = sigma_max > ... > sigma_K = sigma_min (float64, CPU)."""
    i = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + i * (lo - hi)) ** rho


def check_karras(owner: str, sampler) -> None:
    """Validates an EDM sampler's num_steps, sigma_min, sigma_max and rho fields."""
    check_num_steps(owner, sampler.num_steps)
    for field in ("sigma_min", "sigma_max", "rho"):
        check_positive(owner, field, getattr(sampler, field))
    if not sampler.sigma_min < sampler.sigma_max:
        raise ValueError(f"{owner}: need sigma_min < sigma_max, got {sampler.sigma_min}, {sampler.sigma_max}")


def denoiser_schedule(sigma_hat: torch.Tensor, step: transitions.StepCoefs,
                      step_prev: torch.Tensor | None = None) -> Schedule:
    """The tables of a chain over churned levels sigma_hat [K+1] whose network is a denoiser D ~ x0:
    network level ln(sigma_hat) / 4 (Karras' c_noise), forward process x = x0 + sigma_hat eps with
    target x0, and `finish` = D at the last level (the Euler step to sigma = 0)."""
    return Schedule(
        network_level=sigma_hat.log() / 4,
        step=step,
        data_scale=torch.ones_like(sigma_hat),
        noise_scale=sigma_hat,
        target_noise=torch.zeros_like(sigma_hat),
        target_data=torch.ones_like(sigma_hat),
        finish_x=torch.zeros((), dtype=torch.float64),  # D(x_hat_K; sigma_hat_K): 0 x_K + 1 D
        finish_out=torch.ones((), dtype=torch.float64),
        step_prev=step_prev,
    )


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
        check_positive(owner, "churn", self.churn)
        check_karras(owner, self)
        self._init_tables()

    @property
    def sigmas(self) -> torch.Tensor:
        """Karras sigmas sigma_0 = sigma_max > ... > sigma_K = sigma_min (float64, CPU), before churn."""
        return karras_sigmas(self.num_steps, self.sigma_min, self.sigma_max, self.rho)

    @property
    def initial_scale(self) -> float:
        return (1 + self.churn) * self.sigma_max

    def _schedule(self) -> Schedule:
        sigma = self.sigmas
        sigma_hat = (1 + self.churn) * sigma
        return denoiser_schedule(sigma_hat, transitions.edm_churn(sigma_hat[:-1], sigma[1:], self.churn))
