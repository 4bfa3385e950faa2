"""Per-row coefficients of the stochastic samplers' Gaussian transitions (docs/method.md section 2).

Every sampler we support has x_next ~ N(mu, std^2 I) with mu = x_coef * x + out_coef * f(x), f the
network output, so one call here per step gives everything `step_logprob` needs (a multistep solver,
`edm_2ab`, also returns prev_coef: mu gains prev_coef * the previous step's output, step_logprob's
`offset`). Arguments are floats or [B] tensors (several noise levels in one batch is fine); the math
runs in float64 and the result is float32 on the arguments' device, with no host synchronisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

Level = Union[float, Tensor]


@dataclass(frozen=True)
class StepCoefs:
    """mu = x_coef * x + out_coef * model_out; x_next = mu + std * eps."""

    x_coef: Tensor
    out_coef: Tensor
    std: Tensor


def _f64(v: Level, device=None) -> Tensor:
    if isinstance(v, Tensor):
        return v.detach().to(torch.float64)
    return torch.tensor(float(v), dtype=torch.float64, device=device)


def _device(*vals: Level):
    for v in vals:
        if isinstance(v, Tensor):
            return v.device
    return None


def _out(x_coef: Tensor, out_coef: Tensor, std: Tensor) -> StepCoefs:
    x_coef, out_coef, std = torch.broadcast_tensors(x_coef, out_coef, std)
    return StepCoefs(x_coef.float(), out_coef.float(), std.float())


def rectified_flow_sde(t: Level, t_next: Level, noise_level: float, t_for_first_std: Level | None = None) -> StepCoefs:
    """Flow-matching SDE step from t to t_next < t (x_t = (1-t) x0 + t eps, f = velocity).

    std_t = a sqrt(t / (1 - t)), with 1 - t replaced by 1 - t_for_first_std at t = 1 (default:
    t_next, the next-largest level of the schedule) so the first step is finite;
    mu = x (1 + std_t^2 dt / (2t)) + f (1 + std_t^2 (1 - t) / (2t)) dt;  std = std_t sqrt(-dt).
    """
    if noise_level <= 0:
        raise ValueError(f"rectified_flow_sde: 'noise_level' must be > 0 for a stochastic step, got {noise_level}")
    dev = _device(t, t_next, t_for_first_std)
    t, tn = _f64(t, dev), _f64(t_next, dev)
    first = tn if t_for_first_std is None else _f64(t_for_first_std, dev)
    den = torch.where(t >= 1, 1 - first, 1 - t)
    std_t = noise_level * torch.sqrt(t / den)
    dt = tn - t
    x_coef = 1 + std_t**2 * dt / (2 * t)
    out_coef = (1 + std_t**2 * (1 - t) / (2 * t)) * dt
    return _out(x_coef, out_coef, std_t * torch.sqrt(-dt))


def ddim(alpha_bar: Level, alpha_bar_next: Level, eta: float) -> StepCoefs:
    """DDIM step with eta (f = epsilon prediction), from cumulative alpha a to a' > a.

    mu = sqrt(a') x0_hat + sqrt(1 - a' - sig^2) eps_hat with x0_hat = (x - sqrt(1 - a) eps_hat) / sqrt(a),
    sig = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a'); affine in (x, eps_hat).
    """
    if eta <= 0:
        raise ValueError(f"ddim: 'eta' must be > 0 for a stochastic (log-probability) step, got {eta}")
    dev = _device(alpha_bar, alpha_bar_next)
    a, an = _f64(alpha_bar, dev), _f64(alpha_bar_next, dev)
    sig = eta * torch.sqrt((1 - an) / (1 - a)) * torch.sqrt(1 - a / an)
    direction = torch.sqrt(torch.clamp(1 - an - sig**2, min=0))
    x_coef = torch.sqrt(an / a)
    out_coef = direction - torch.sqrt(an * (1 - a) / a)
    return _out(x_coef, out_coef, sig)


def edm_churn(sigma_hat: Level, sigma_next: Level, churn: float) -> StepCoefs:
    """EDM Euler step with churn (f = denoised x0 prediction D(x_hat; sigma_hat)).

    The state is the churned x_hat at sigma_hat = (1 + churn) sigma. The Euler step to sigma_next
    gives mu = x_hat sigma_next / sigma_hat + D (1 - sigma_next / sigma_hat), and churning to the
    next sigma_hat' = (1 + churn) sigma_next adds std = sigma_next sqrt((1 + churn)^2 - 1).
    """
    if churn <= 0:
        raise ValueError(f"edm_churn: 'churn' must be > 0 for a stochastic step, got {churn}")
    dev = _device(sigma_hat, sigma_next)
    sh, sn = _f64(sigma_hat, dev), _f64(sigma_next, dev)
    ratio = sn / sh
    std = sn * ((1 + churn) ** 2 - 1) ** 0.5
    return _out(ratio, 1 - ratio, std)


def rectified_flow_cps(t: Level, t_next: Level, eta: float) -> StepCoefs:
    """Coefficients-Preserving Sampling step from t to t_next < t (x_t = (1-t) x0 + t eps, f = velocity).

    With x0_hat = x - t f and eps_hat = x + (1 - t) f, std = t_next sin(eta pi / 2) and
    mu = (1 - t_next) x0_hat + sqrt(t_next^2 - std^2) eps_hat: the next state keeps the forward
    process's coefficients (1 - t_next on the data, t_next in total on the noise). Affine in (x, f):
    x_coef = 1 - t_next + c, out_coef = c (1 - t) - t (1 - t_next), c = sqrt(t_next^2 - std^2).
    eta in (0, 1]; at t_next = 0 the step is deterministic (std 0, mu = x0_hat).
    """
    if not 0 < eta <= 1:
        raise ValueError(f"rectified_flow_cps: 'eta' must be in (0, 1], got {eta}")
    dev = _device(t, t_next)
    t, tn = _f64(t, dev), _f64(t_next, dev)
    std = tn * math.sin(eta * math.pi / 2)
    c = torch.sqrt(torch.clamp(tn**2 - std**2, min=0))
    x_coef = (1 - tn) + c
    out_coef = c * (1 - t) - t * (1 - tn)
    return _out(x_coef, out_coef, std)


def edm_2ab(sigma_hat: Level, sigma_next: Level, sigma_hat_prev: Level | None, churn: float,
            s_noise: float = 1.0) -> tuple[StepCoefs, Tensor]:
    """EDM exponential-integrator Adams-Bashforth step (order 2) with churn, f = denoised x0 prediction D.

    The probability-flow ODE dx/dsigma = (x - D) / sigma, in lambda = -ln sigma, solves exactly to
    x(t) = (t/s) x(s) + t * int_{lambda_s}^{lambda_t} e^lambda D dlambda. With D taken linear in lambda
    through the current output D (at s = sigma_hat) and the previous step's output D_prev (at
    s1 = sigma_hat_prev > s), h = ln(s / t) > 0 and c = ln(s / s1) / h < 0:
        phi1 = (1 - e^-h) / h,   phi2 = (1 - phi1) / h,   prev_coef = h phi2 / c,
        mu = (t / s) x_hat + (1 - t/s - prev_coef) D + prev_coef D_prev.
    sigma_hat_prev None is the first step, Euler: prev_coef = 0 and mu is `edm_churn`'s. Churning the
    result to (1 + churn) t adds std = t sqrt((1 + churn)^2 - 1) s_noise (s_noise scales the churn noise).
    Returns (StepCoefs(x_coef, out_coef, std), prev_coef): mu = x_coef x_hat + out_coef D + prev_coef D_prev.
    """
    if churn <= 0:
        raise ValueError(f"edm_2ab: 'churn' must be > 0 for a stochastic step, got {churn}")
    if s_noise <= 0:
        raise ValueError(f"edm_2ab: 's_noise' must be > 0 for a stochastic step, got {s_noise}")
    dev = _device(sigma_hat, sigma_next, sigma_hat_prev)
    sh, sn = _f64(sigma_hat, dev), _f64(sigma_next, dev)
    ratio = sn / sh
    if sigma_hat_prev is None:
        prev = torch.zeros_like(ratio)
    else:
        h = torch.log(sh / sn)
        phi1 = -torch.expm1(-h) / h
        phi2 = (1 - phi1) / h
        prev = h * phi2 / (torch.log(sh / _f64(sigma_hat_prev, dev)) / h)
    std = sn * ((1 + churn) ** 2 - 1) ** 0.5 * s_noise
    coefs = _out(ratio, 1 - ratio - prev, std)
    return coefs, torch.broadcast_to(prev, coefs.x_coef.shape).float()
