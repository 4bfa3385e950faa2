"""The sampler interface: a K-step stochastic denoising chain seen as a policy (docs/method.md section 2).

A sampler owns the schedule of one chain x_0 -> x_1 -> ... -> x_K: for each stochastic step k the
Gaussian transition x_{k+1} ~ N(x_coef_k x_k + out_coef_k f(x_k), std_k^2 I) (coefficients from
`ddrl_engine.ops.transitions`, the one source of that math), the noise level the network sees, the
final deterministic denoise, and the forward (noising) process the data loss trains on.

Level index k runs over 0..K: 0..K-1 are the stochastic steps, K is the chain's last state (where
`finish` evaluates the network, if it does). Every per-level quantity is a table of K+1 (or K)
float32 values, built once in float64 on the CPU and moved by `to(device)`; per-step lookups are
indexing views of those tables, so the step loop does no host synchronisation and no Python float
math and can be captured in a CUDA graph. A step index is a Python int (a 0-dim result, on the
sampler's current device) or a long tensor [N] of per-row indices (an [N] result on the index's
device; not range-checked, since that would need a sync).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from ddrl_engine.ops.transitions import StepCoefs

StepIndex = Union[int, Tensor]


@dataclass(frozen=True)
class Schedule:
    """Per-level tables of one sampler (index k = level k); see the module docstring.

    network_level [K+1]: the t given to the policy at level k.
    step [K]: the Gaussian transition of step k (level k -> level k+1).
    data_scale, noise_scale [K+1]: the forward process x_k = data_scale_k x0 + noise_scale_k eps.
    target_noise, target_data [K+1]: the network's training target at level k is
        target_noise_k eps + target_data_k x0.
    finish_x, finish_out: 0-dim; finish(x_K) = finish_x x_K + finish_out f(x_K, level K), or None
        for the identity (a chain that already ends at zero noise).
    ode_x, ode_out [K]: the deterministic (ODE) step k, x_{k+1} = ode_x_k x_k + ode_out_k f(x_k), that
        an SDE window (`sampler.sde_window`) takes outside the window; None where the sampler has none
        (windows are then refused).
    step_prev [K]: multistep solvers only (else None): step k's mean also has step_prev_k times the
        previous step's model output (0 at step 0); see `Sampler.prev_coef`.
    """

    network_level: Tensor
    step: StepCoefs
    data_scale: Tensor
    noise_scale: Tensor
    target_noise: Tensor
    target_data: Tensor
    finish_x: Tensor | None
    finish_out: Tensor | None
    ode_x: Tensor | None = None
    ode_out: Tensor | None = None
    step_prev: Tensor | None = None

    def to(self, device: torch.device) -> "Schedule":
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=torch.float32)

        step = StepCoefs(mv(self.step.x_coef), mv(self.step.out_coef), mv(self.step.std))
        return Schedule(mv(self.network_level), step, mv(self.data_scale), mv(self.noise_scale),
                        mv(self.target_noise), mv(self.target_data), mv(self.finish_x), mv(self.finish_out),
                        mv(self.ode_x), mv(self.ode_out), step_prev=mv(self.step_prev))


def check_int(owner: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: '{name}' must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: '{name}' must be >= {minimum}, got {value}")


def check_num_steps(owner: str, num_steps) -> None:
    check_int(owner, "num_steps", num_steps, 1)


def check_positive(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: '{name}' must be a number, got {type(value).__name__} {value!r}")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{owner}: '{name}' must be a finite number > 0, got {value}")


class Sampler(ABC):
    """Base of all samplers. Subclasses are frozen config dataclasses that implement `_schedule`.

    Public interface (k: step/level index, int or long tensor [N]):
        num_steps: K, the number of stochastic steps.
        initial_scale: a Python float, x_0 = initial_scale * N(0, I).
        to(device) -> self: moves the tables (a no-op when already there).
        network_level(k), network_levels: the t the policy sees (see each sampler's docstring).
        coefs(k) -> StepCoefs of step k in [0, K).
        multistep, prev_coef(k): a multistep solver's coefficient of the previous step's model output
            in step k's mean (None for single-step samplers).
        initial_noise / state_from_noise / initial_state: the chain's start.
        finish(policy, x_K, cond): the samples the chain ends in.
        level(k) -> NoiseLevel; noised(x0, eps, k), target_coefs(k): the forward process for the
            data loss.
        sample_steps(n, generator, device): fresh step indices in [0, K) for the data loss.
        stochastic_steps: per step, whether it is a Gaussian transition (std > 0) or deterministic
            (std 0, e.g. rectified_flow_cps's last step: x_{k+1} = mean, no log-density, never trained).
        has_ode_step, ode_coefs(k): the deterministic ODE step an SDE window takes outside the window.
        check_window(window), window_starts(size): SDE windows (first, size) this sampler can run.
        nfe: network evaluations of one chain per sample (unguided).
    """

    name: str = ""
    num_steps: int

    # ---- subclass hooks ---------------------------------------------------------------------
    @abstractmethod
    def _schedule(self) -> Schedule:
        """The float64 CPU tables of this configuration."""

    @property
    def initial_scale(self) -> float:
        """Standard deviation of the chain's first state x_0 (1 unless overridden)."""
        return 1.0

    # ---- tables -----------------------------------------------------------------------------
    def _init_tables(self) -> None:
        # Called from the subclass's __post_init__ after validation (the dataclass is frozen).
        table = self._schedule().to(torch.device("cpu"))
        object.__setattr__(self, "_tables", table)
        # Python-level, once: the step loop branches on it without a host sync.
        object.__setattr__(self, "_stochastic", tuple(bool(s > 0) for s in table.step.std.tolist()))

    @property
    def device(self) -> torch.device:
        return self._tables.network_level.device

    def to(self, device: torch.device | str) -> "Sampler":
        """Moves the schedule tables to `device` (no-op if already there); returns self."""
        device = torch.device(device)
        current = self.device
        if device.type != current.type or (device.index is not None and device.index != current.index):
            object.__setattr__(self, "_tables", self._tables.to(device))
        return self

    def _index(self, k: StepIndex, upper: int, what: str):
        if isinstance(k, Tensor):
            if k.dtype not in (torch.int64, torch.int32) or k.dim() != 1:
                raise TypeError(f"{type(self).__name__}.{what}: a tensor step index must be a 1-D "
                                f"int64/int32 tensor, got {k.dtype} of shape {list(k.shape)}")
            self.to(k.device)
            return k
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"{type(self).__name__}.{what}: step index must be an int or a long tensor, got {type(k).__name__}")
        if not 0 <= k < upper:
            raise IndexError(f"{type(self).__name__}.{what}: step index {k} out of range [0, {upper})")
        return k

    # ---- per-step lookups -------------------------------------------------------------------
    def network_level(self, k: StepIndex) -> Tensor:
        """The t given to the policy at level k in [0, K] (0-dim for an int k, [N] for a tensor)."""
        return self._tables.network_level[self._index(k, self.num_steps + 1, "network_level")]

    @property
    def network_levels(self) -> Tensor:
        """[K] network levels of the stochastic steps 0..K-1."""
        return self._tables.network_level[: self.num_steps]

    def coefs(self, k: StepIndex) -> StepCoefs:
        """x_coef, out_coef, std of step k in [0, K) (0-dim for an int k, [N] for a tensor)."""
        i = self._index(k, self.num_steps, "coefs")
        s = self._tables.step
        return StepCoefs(s.x_coef[i], s.out_coef[i], s.std[i])

    @property
    def multistep(self) -> bool:
        """Whether step k's mean also uses the previous step's model output (a multistep solver)."""
        return self._tables.step_prev is not None

    def prev_coef(self, k: StepIndex) -> Tensor | None:
        """The coefficient of the previous step's model output in step k's mean: mu = x_coef x +
        out_coef f(x) + prev_coef f_prev (0 at step 0; 0-dim for an int k, [N] for a tensor), or None
        for a single-step sampler (nothing to add)."""
        if self._tables.step_prev is None:
            return None
        return self._tables.step_prev[self._index(k, self.num_steps, "prev_coef")]

    # ---- deterministic steps and SDE windows ------------------------------------------------
    @property
    def stochastic_steps(self) -> tuple[bool, ...]:
        """K Python bools: step k is a Gaussian transition (std_k > 0), or deterministic (std_k = 0:
        x_{k+1} = mean exactly, its log-prob is not a density and the step is never trained)."""
        flags = self.__dict__.get("_stochastic")
        if flags is None:  # tables set without _init_tables: read them once (a sync, outside the step loop)
            flags = tuple(bool(s > 0) for s in self._tables.step.std.tolist())
            object.__setattr__(self, "_stochastic", flags)
        return flags

    @property
    def has_ode_step(self) -> bool:
        """Whether the sampler has a deterministic ODE step table (needed by SDE windows)."""
        return self._tables.ode_x is not None

    def ode_coefs(self, k: int) -> StepCoefs:
        """The deterministic ODE step k in [0, K) (std 0; 0-dim entries): what an SDE window takes
        outside the window. A Python int k only."""
        if isinstance(k, Tensor):
            raise TypeError(f"{type(self).__name__}.ode_coefs: the step index must be a Python int")
        i = self._index(k, self.num_steps, "ode_coefs")
        t = self._tables
        if t.ode_x is None:
            raise ValueError(f"{type(self).__name__} ({self.name!r}) has no ODE step, so it cannot run an SDE "
                             "window (sampler.sde_window): use a sampler with one (rectified_flow_sde, "
                             "rectified_flow_cps)")
        return StepCoefs(t.ode_x[i], t.ode_out[i], torch.zeros_like(t.ode_x[i]))

    def check_window(self, window, owner: str = "sde_window") -> tuple[int, int]:
        """window = (first, size) as a tuple of ints, after checking that this sampler can run it:
        0 <= first, size >= 1, first + size <= K, an ODE step table for the steps outside, and only
        stochastic steps inside (a deterministic step has no log-probability to train)."""
        name = f"{type(self).__name__} ({self.name!r})"
        if (not isinstance(window, (tuple, list)) or len(window) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) for v in window)):
            raise TypeError(f"{owner}: an SDE window must be [first, size] (two ints), got {window!r}")
        first, size = int(window[0]), int(window[1])
        if first < 0 or size < 1 or first + size > self.num_steps:
            raise ValueError(f"{owner}: the SDE window [first, size] = [{first}, {size}] must have first >= 0, "
                             f"size >= 1 and first + size <= num_steps = {self.num_steps}")
        if not self.has_ode_step:
            raise ValueError(f"{owner}: {name} has no ODE step for the steps outside an SDE window; windows need "
                             "a sampler with one (rectified_flow_sde, rectified_flow_cps)")
        det = [k for k in range(first, first + size) if not self.stochastic_steps[k]]
        if det:
            raise ValueError(f"{owner}: the SDE window [{first}, {size}] holds deterministic step(s) {det} of "
                             f"{name} (std 0: no log-probability to train); move or shrink the window")
        return first, size

    def window_starts(self, size: int, owner: str = "sde_window") -> list[int]:
        """Every first step of a valid window of `size` steps (see check_window), ascending; raises when
        there is none."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{owner}: the window size must be an int >= 1, got {size!r}")
        if not self.has_ode_step:
            self.check_window((0, 1), owner)  # raises the no-ODE-step error
        starts = [s for s in range(self.num_steps - size + 1) if all(self.stochastic_steps[s:s + size])]
        if not starts:
            raise ValueError(f"{owner}: {type(self).__name__} ({self.name!r}) has no window of {size} stochastic "
                             f"steps among its {self.num_steps} (stochastic: {list(self.stochastic_steps)})")
        return starts

    @property
    def nfe(self) -> int:
        """Network evaluations of one chain per sample (unguided): one per step, plus one in `finish`
        where the chain does not end at zero noise."""
        return self.num_steps + (self._tables.finish_x is not None)

    # ---- start and end of the chain ---------------------------------------------------------
    def initial_noise(self, shape, *, generator: torch.Generator | None, device) -> Tensor:
        """The unit Gaussian draw the chain starts from: fp32, one randn call on `generator`."""
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)

    def state_from_noise(self, noise: Tensor, dtype: torch.dtype) -> Tensor:
        """x_0 = initial_scale * noise, in `dtype`."""
        scale = self.initial_scale
        return (noise if scale == 1.0 else noise * scale).to(dtype)

    def initial_state(self, shape, generator: torch.Generator | None, device, dtype: torch.dtype = torch.float32) -> Tensor:
        """A fresh x_0 of `shape` = [B, *sample_shape]."""
        return self.state_from_noise(self.initial_noise(shape, generator=generator, device=device), dtype)

    def finish(self, policy, x: Tensor, cond: Tensor) -> Tensor:
        """The samples a chain ending in x = x_K gives: a deterministic final denoise at level K
        (one network call) where the chain does not end at zero noise, else a copy of x."""
        t = self.to(x.device)._tables
        if t.finish_x is None:
            return x.clone()
        level = t.network_level[self.num_steps].expand(x.shape[0])
        out = policy(x, level, cond)
        return (t.finish_x * x.float() + t.finish_out * out.float()).to(x.dtype)

    # ---- forward process (data loss) --------------------------------------------------------
    def level(self, k: StepIndex) -> "NoiseLevel":
        """Level k of the forward process (the data loss's noise level): an int k gives 0-dim
        entries shared by the batch, a long tensor [B] per-row ones."""
        i = self._index(k, self.num_steps + 1, "level")
        t = self._tables
        return NoiseLevel(t.network_level[i], t.data_scale[i], t.noise_scale[i], t.target_noise[i], t.target_data[i])

    def noised(self, x0: Tensor, eps: Tensor, k: StepIndex) -> Tensor:
        """x at level k: data_scale_k x0 + noise_scale_k eps, computed in fp32, returned in x0's dtype.
        k: an int, or a long tensor [B] of per-sample levels (B = x0.shape[0])."""
        self.to(x0.device)
        return self.level(k).noised(x0, eps)

    def target_coefs(self, k: StepIndex) -> tuple[Tensor, Tensor]:
        """(noise_coef, data_coef) of level k: the network's target is noise_coef eps + data_coef x0
        for x = noised(x0, eps, k) (the coefficients `ops.diffusion_loss` takes)."""
        i = self._index(k, self.num_steps + 1, "target_coefs")
        return self._tables.target_noise[i], self._tables.target_data[i]

    def sample_steps(self, n: int, *, generator: torch.Generator | None = None, device=None) -> Tensor:
        """n step indices drawn uniformly from [0, K): fresh levels for the data loss (long [n])."""
        device = self.device if device is None else device
        return torch.randint(0, self.num_steps, (n,), generator=generator, device=device)


@dataclass(frozen=True)
class NoiseLevel:
    """One noise level of a forward process, shared by the batch (0-dim entries) or per row ([B]).

    The noised state is x = data_scale x0 + noise_scale eps; the policy sees `network_level`; its
    training target is target_noise eps + target_data x0. `Sampler.level(k)` gives a sampler's level k;
    a continuous-time process may build one directly (e.g. `RectifiedFlowSDE.continuous_level(t)`).
    """

    network_level: Tensor
    data_scale: Tensor
    noise_scale: Tensor
    target_noise: Tensor
    target_data: Tensor

    def noised(self, x0: Tensor, eps: Tensor) -> Tensor:
        """data_scale x0 + noise_scale eps in fp32, returned in x0's dtype."""
        if x0.shape != eps.shape:
            raise ValueError(f"noised: x0 {list(x0.shape)} and eps {list(eps.shape)} must have the same shape")
        a, b = self.data_scale, self.noise_scale
        if a.dim() == 1:
            a, b = row_view(a, x0), row_view(b, x0)
        return (a * x0.float() + b * eps.float()).to(x0.dtype)

    def network_levels(self, batch: int, device) -> Tensor:
        """The policy's t for `batch` rows on `device` ([B])."""
        t = self.network_level.to(device)
        return t.expand(batch) if t.dim() == 0 else t


def row_view(v: Tensor, like: Tensor) -> Tensor:
    """[N] -> [N, 1, ...] broadcastable against `like` ([N, ...])."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))
