"""EDM multistep sampler: Cosmos's exponential-integrator Adams-Bashforth solver ("2ab") with churn as
a policy. The network is a denoiser D(x; sigma) ~ x0, as for `EDMChurn`.

What Cosmos (nvidia-cosmos/cosmos-rl, `cosmos_rl/policy/model/wfm/sampler/__init__.py`:
`differential_equation_solver`, `order2_fn`, `res_x0_rk2_step`, `reg_x0_euler_step`; the RL side in
`cosmos_rl/policy/trainer/wfm_trainer.py`: `get_rollout_samples`, `rl_training_step`) computes per
step i of N, on Karras sigmas:
  1. churn: sigma_hat_i = (1 + eta) sigma_i, x_hat_i = x_i + sqrt(sigma_hat_i^2 - sigma_i^2) S_noise eps,
     eta = min(S_churn / (N + 1), sqrt(1.2) - 1) (when S_min < sigma_i < S_max; Cosmos's RL config
     has S_min = 0, S_max = inf: every level);
  2. D_i = D(x_hat_i; sigma_hat_i); the step to sigma_{i+1} is Euler at i = 0 and otherwise the
     exponential-integrator AB2 step through D_i and the previous step's D_{i-1} at sigma_hat_{i-1}
     (`ops.transitions.edm_2ab` has the formula and its derivation);
  3. its RL density is N(x_hat_{i+1}; mu_i, (sigma_{i+1} sqrt(eta^2 + 2 eta) S_noise)^2 I), with the
     rollout's recorded D_{i-1} (detached) in mu_i when the trainer recomputes it.
Here each step k is that Gaussian transition, x_hat_k -> x_hat_{k+1}: mu_k = x_coef_k x_hat_k +
out_coef_k D_k + prev_coef_k D_{k-1}, the last term an `offset` for `ops.step_logprob` (the previous
step's model output, which the rollout records in `Rollout.prev_outs`).

Departures from Cosmos (each keeps every step a proper Gaussian transition):
  * the last level is churned too and `finish` returns D(x_hat_K; sigma_hat_K), as in `EDMChurn`
    (Cosmos takes no churn after its last step, returns D(x_K; sigma_min), and scores its last step
    against that denoised sample);
  * x_hat_0 is drawn in one go, N(0, sigma_max^2 (1 + ((1 + eta)^2 - 1) S_noise^2) I): the law of
    Cosmos's sigma_max-scaled start followed by its first churn;
  * no churn window (S_min/S_max): every level is churned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddrl_engine.ops import transitions
from ddrl_engine.sampling.base import Sampler, Schedule, check_positive
from ddrl_engine.sampling.edm import check_karras, denoiser_schedule, karras_sigmas
from ddrl_engine.sampling.factory import register_sampler

COSMOS_MAX_CHURN = math.sqrt(1.2) - 1
"""Cosmos's cap on its churn eta = min(S_churn / (N + 1), sqrt(1.2) - 1)."""


def cosmos_churn(s_churn: float, num_steps: int) -> float:
    """Cosmos's churn for S_churn over N = num_steps steps: eta = min(S_churn / (N + 1), sqrt(1.2) - 1)."""
    if isinstance(s_churn, bool) or not isinstance(s_churn, (int, float)):
        raise TypeError(f"cosmos_churn: 's_churn' must be a number, got {type(s_churn).__name__} {s_churn!r}")
    if not s_churn > 0 or not math.isfinite(s_churn):
        raise ValueError(f"cosmos_churn: 's_churn' must be a finite number > 0 (S_churn = 0 is Cosmos's "
                         f"deterministic sampler, which has no log-probability), got {s_churn}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"cosmos_churn: 'num_steps' must be an int >= 1, got {num_steps!r}")
    return min(s_churn / (num_steps + 1), COSMOS_MAX_CHURN)


@register_sampler
@dataclass(frozen=True)
class EDM2AB(Sampler):
    """K stochastic exponential-integrator Adams-Bashforth (order 2) steps with churn over Karras
    sigmas (Cosmos's "2ab" solver); the state is the churned x_hat, the network a denoiser D ~ x0.

    Sigmas sigma_i (i = 0..K, Karras, as `EDMChurn`) are churned to sigma_hat_i = (1 + churn) sigma_i.
    x_0 = x_hat_0 ~ N(0, sigma_max^2 (1 + ((1 + churn)^2 - 1) s_noise^2) I). Step k goes from x_hat_k
    at sigma_hat_k to sigma_{k+1} with h = ln(sigma_hat_k / sigma_{k+1}); step 0 is Euler, step k > 0
    also uses the previous step's output D_{k-1} (at sigma_hat_{k-1}):
        mu_k = (sigma_{k+1} / sigma_hat_k) x_hat_k + (1 - sigma_{k+1} / sigma_hat_k - p_k) D_k + p_k D_{k-1},
        p_k = h phi2(h) / c_k,  c_k = ln(sigma_hat_k / sigma_hat_{k-1}) / h,
        phi1(h) = (1 - e^-h) / h,  phi2(h) = (1 - phi1(h)) / h      (p_0 = 0)
    and then churns to sigma_hat_{k+1}: x_hat_{k+1} = mu_k + std_k eps, std_k = sigma_{k+1}
    sqrt((1 + churn)^2 - 1) s_noise (`ops.transitions.edm_2ab`; `prev_coef(k)` is p_k). `finish`
    returns D(x_hat_K; sigma_hat_K). Network level t = ln(sigma_hat) / 4 (Karras' c_noise); forward
    process x = x0 + sigma_hat eps, target x0 (as `EDMChurn`). See the module docstring for Cosmos's
    code and where this departs from it.

    Fields:
        num_steps: K >= 1.
        churn: Cosmos's eta > 0, sigma_hat = (1 + eta) sigma. Cosmos derives it from its S_churn as
            eta = min(S_churn / (N + 1), sqrt(1.2) - 1), N = num_steps (`cosmos_churn`,
            `EDM2AB.from_cosmos`; its RL default S_churn = 1 over N = 10 gives 1/11). Default: the cap,
            sqrt(1.2) - 1 ~ 0.0954.
        s_noise: > 0, Cosmos's S_noise: scales the churn noise (and so every step's std), default 1.
        sigma_min, sigma_max: 0 < sigma_min < sigma_max (defaults 0.002, 80: Cosmos's sampler defaults;
            its RL video config runs 0.01, 200).
        rho: > 0, the Karras schedule exponent (7).
    """

    num_steps: int
    churn: float = COSMOS_MAX_CHURN
    s_noise: float = 1.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    name = "edm_2ab"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_karras(owner, self)
        for field in ("churn", "s_noise"):
            check_positive(owner, field, getattr(self, field))
        self._init_tables()

    @classmethod
    def from_cosmos(cls, num_steps: int, s_churn: float, **fields) -> "EDM2AB":
        """The sampler Cosmos runs with S_churn = s_churn over num_steps steps (churn =
        `cosmos_churn(s_churn, num_steps)`); other fields (s_noise, sigma_min, ...) as keywords."""
        if "churn" in fields:
            raise TypeError("EDM2AB.from_cosmos: give s_churn (Cosmos's S_churn) or use EDM2AB(churn=...), not both")
        return cls(num_steps=num_steps, churn=cosmos_churn(s_churn, num_steps), **fields)

    @property
    def sigmas(self) -> torch.Tensor:
        """Karras sigmas sigma_0 = sigma_max > ... > sigma_K = sigma_min (float64, CPU), before churn."""
        return karras_sigmas(self.num_steps, self.sigma_min, self.sigma_max, self.rho)

    @property
    def initial_scale(self) -> float:
        return self.sigma_max * math.sqrt(1 + ((1 + self.churn) ** 2 - 1) * self.s_noise ** 2)

    def _schedule(self) -> Schedule:
        sigma = self.sigmas
        sigma_hat = (1 + self.churn) * sigma
        first, first_prev = transitions.edm_2ab(sigma_hat[:1], sigma[1:2], None, self.churn, self.s_noise)
        parts, prevs = [first], [first_prev]
        if self.num_steps > 1:
            rest, rest_prev = transitions.edm_2ab(sigma_hat[1:-1], sigma[2:], sigma_hat[:-2], self.churn, self.s_noise)
            parts.append(rest)
            prevs.append(rest_prev)
        step = transitions.StepCoefs(*(torch.cat([getattr(p, f) for p in parts])
                                       for f in ("x_coef", "out_coef", "std")))
        return denoiser_schedule(sigma_hat, step, torch.cat(prevs))
