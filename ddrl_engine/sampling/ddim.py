"""DDIM sampler with eta > 0 (DDPO style), epsilon prediction: x = sqrt(abar) x0 + sqrt(1 - abar) eps."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ddrl_engine.ops import transitions
from ddrl_engine.sampling.base import Sampler, Schedule, check_int, check_num_steps, check_positive
from ddrl_engine.sampling.factory import register_sampler

BETA_SCHEDULES = ("linear", "scaled_linear")


@register_sampler
@dataclass(frozen=True)
class DDIM(Sampler):
    """K stochastic DDIM steps over a discrete-time DDPM schedule, then a deterministic x0 prediction.

    Schedule: T = num_train_timesteps betas, "linear" (DDPM: beta linear from beta_start to beta_end)
    or "scaled_linear" (Stable Diffusion: sqrt(beta) linear; use beta_start=0.00085, beta_end=0.012);
    abar_n = prod_{i<=n} (1 - beta_i). The K + 1 levels are the timesteps
    tau_k = round((T - 1)(K - k) / K), k = 0..K: from T - 1 (abar ~ 4e-5 for the DDPM defaults, so
    x_0 ~ N(0, I)) down to 0 (abar = 1 - beta_start, a small noise level); step k goes
    tau_k -> tau_{k+1} with `ops.transitions.ddim`, and `finish` predicts x0 deterministically at
    tau_K: x0 = (x - sqrt(1 - abar) eps_hat) / sqrt(abar).
    Network level: t = tau / T in [0, 1). Training target: eps.

    Fields:
        num_steps: K, 1 <= K <= T - 1.
        eta: in (0, 1]; 1 is DDPM-like ancestral noise, smaller is closer to deterministic DDIM.
        num_train_timesteps: T >= 2.
        beta_schedule, beta_start, beta_end: see above (0 < beta_start <= beta_end < 1).
    """

    num_steps: int
    eta: float = 1.0
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02

    name = "ddim"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_num_steps(owner, self.num_steps)
        check_positive(owner, "eta", self.eta)
        if self.eta > 1:
            raise ValueError(f"{owner}: 'eta' must be in (0, 1], got {self.eta}")
        check_int(owner, "num_train_timesteps", self.num_train_timesteps, 2)
        if self.num_steps > self.num_train_timesteps - 1:
            raise ValueError(f"{owner}: 'num_steps' must be <= num_train_timesteps - 1 = {self.num_train_timesteps - 1}, "
                             f"got {self.num_steps}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"{owner}: 'beta_schedule' must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        check_positive(owner, "beta_start", self.beta_start)
        check_positive(owner, "beta_end", self.beta_end)
        if not self.beta_start <= self.beta_end < 1:
            raise ValueError(f"{owner}: need beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")
        self._init_tables()

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """abar over all T training timesteps (float64, CPU)."""
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float64)
        else:
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float64) ** 2
        return torch.cumprod(1 - betas, dim=0)

    @property
    def timesteps(self) -> torch.Tensor:
        """The K + 1 training timesteps tau_0 > ... > tau_K = 0 of the chain's levels (long, CPU)."""
        k = torch.arange(self.num_steps + 1, dtype=torch.float64)
        return torch.round((self.num_train_timesteps - 1) * (self.num_steps - k) / self.num_steps).long()

    def _schedule(self) -> Schedule:
        tau = self.timesteps
        abar = self.alphas_cumprod[tau]
        # The deterministic x0 prediction is the DDIM step to abar' = 1 (its std is 0).
        final = transitions.ddim(abar[-1], 1.0, self.eta)
        return Schedule(
            network_level=tau.double() / self.num_train_timesteps,
            step=transitions.ddim(abar[:-1], abar[1:], self.eta),
            data_scale=abar.sqrt(),
            noise_scale=(1 - abar).sqrt(),
            target_noise=torch.ones_like(abar),
            target_data=torch.zeros_like(abar),
            finish_x=final.x_coef,
            finish_out=final.out_coef,
        )
