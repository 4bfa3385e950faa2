"""Samplers and rollout against float64 references written here from the method (docs/method.md
section 2; not via ops.transitions): per-step log-probabilities, whole chains, determinism, bitwise recomputation of
old log-probs (the on-policy ratio == 1), gradients, the forward process, and errors."""
import math

import pytest
import torch
from torch import nn

import ddrl_engine  # noqa: F401
from ddrl_engine.sampling import (
    DDIM,
    SAMPLERS,
    EDMChurn,
    RectifiedFlowSDE,
    group_conditions,
    make_sampler,
    rollout,
    transition,
)

CHANNELS, SAMPLE_SHAPE, NUM_CLASSES = 3, (3, 5, 4), 5
CASES = {
    "rf": ("rectified_flow_sde", dict(num_steps=5, noise_level=0.7, shift=3.0)),
    "ddim": ("ddim", dict(num_steps=5, eta=0.8)),
    "ddim_sd": ("ddim", dict(num_steps=4, eta=1.0, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
    "edm": ("edm_churn", dict(num_steps=5, churn=0.3)),
}
# fp32 coefficients and fp32 accumulation vs float64: the log-prob error per element grows like
# |x_next - mu| / std^2 * eps32 * |mu|, which the tiny last-step stds of DDIM/EDM make ~1e-4.
LOGPROB_TOL = {torch.float32: dict(atol=1e-3, rtol=1e-4), torch.bfloat16: dict(atol=2e-3, rtol=2e-4)}


def make_case(case):
    name, kwargs = CASES[case]
    return make_sampler(name, **kwargs)


class TinyPolicy(nn.Module):
    """A fixed random per-pixel channel mix plus t- and class-dependent offsets. Computes in fp32
    (float64 for float64 inputs) and returns x's dtype; batch-invariant (no matmul blocking)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mix = nn.Parameter(0.5 * torch.eye(CHANNELS) + 0.2 * torch.randn(CHANNELS, CHANNELS, generator=g))
        self.t_dir = nn.Parameter(0.3 * torch.randn(CHANNELS, generator=g))
        self.cond_emb = nn.Parameter(0.3 * torch.randn(NUM_CLASSES, CHANNELS, generator=g))

    def forward(self, x, t, cond):
        dt = torch.promote_types(x.dtype, torch.float32)
        xf, spatial = x.to(dt), [1] * (x.dim() - 2)
        mixed = (self.mix.to(dt).view(1, CHANNELS, CHANNELS, *spatial) * xf.unsqueeze(1)).sum(2)
        offset = torch.sin(3 * t.to(dt))[:, None] * self.t_dir.to(dt) + self.cond_emb.to(dt)[cond]
        return (mixed + offset.view(x.shape[0], CHANNELS, *spatial)).to(x.dtype)


# ---- float64 references, from the method spec (docs/method.md section 2) -----------------------------------------------

class RefChain:
    """The chain of one sampler in float64: levels, per-step mean(x, f) and std, start and finish."""

    def __init__(self, sampler):
        K = sampler.num_steps
        self.K = K
        if isinstance(sampler, RectifiedFlowSDE):
            t = [1 - i / K for i in range(K + 1)]
            t = [sampler.shift * u / (1 + (sampler.shift - 1) * u) for u in t]
            self.levels, self.init_scale, self.finish_fn = t, 1.0, None
            self.std_t, self.std = [], []
            for k in range(K):
                den = 1 - t[k + 1] if t[k] >= 1 else 1 - t[k]
                self.std_t.append(sampler.noise_level * math.sqrt(t[k] / den))
                self.std.append(self.std_t[k] * math.sqrt(t[k] - t[k + 1]))

            def mean(k, x, f):
                tk, dt, s2 = t[k], t[k + 1] - t[k], self.std_t[k] ** 2
                return x * (1 + s2 * dt / (2 * tk)) + f * (1 + s2 * (1 - tk) / (2 * tk)) * dt

            self.fwd = lambda k: (1 - t[k], t[k])
        elif isinstance(sampler, DDIM):
            T = sampler.num_train_timesteps
            if sampler.beta_schedule == "linear":
                betas = torch.linspace(sampler.beta_start, sampler.beta_end, T, dtype=torch.float64)
            else:
                betas = torch.linspace(sampler.beta_start**0.5, sampler.beta_end**0.5, T, dtype=torch.float64) ** 2
            abar_all = torch.cumprod(1 - betas, 0).tolist()
            tau = [round((T - 1) * (K - k) / K) for k in range(K + 1)]
            ab = [abar_all[i] for i in tau]
            self.levels, self.init_scale, self.ab = [i / T for i in tau], 1.0, ab
            self.sig = [sampler.eta * math.sqrt((1 - ab[k + 1]) / (1 - ab[k])) * math.sqrt(1 - ab[k] / ab[k + 1])
                        for k in range(K)]
            self.std = self.sig

            def x0_hat(a, x, eps_hat):
                return (x - math.sqrt(1 - a) * eps_hat) / math.sqrt(a)

            def mean(k, x, f):
                an = ab[k + 1]
                return math.sqrt(an) * x0_hat(ab[k], x, f) + math.sqrt(1 - an - self.sig[k] ** 2) * f

            self.finish_fn = lambda x, f: x0_hat(ab[K], x, f)
            self.fwd = lambda k: (math.sqrt(ab[k]), math.sqrt(1 - ab[k]))
        elif isinstance(sampler, EDMChurn):
            lo, hi, rho = sampler.sigma_min ** (1 / sampler.rho), sampler.sigma_max ** (1 / sampler.rho), sampler.rho
            sig = [(hi + i / K * (lo - hi)) ** rho for i in range(K + 1)]
            sh = [(1 + sampler.churn) * s for s in sig]
            self.sig, self.sh = sig, sh
            self.levels, self.init_scale = [math.log(s) / 4 for s in sh], sh[0]
            self.std = [math.sqrt(sh[k + 1] ** 2 - sig[k + 1] ** 2) for k in range(K)]

            def mean(k, x, f):  # Euler step of dx/dsigma = (x - D) / sigma from sigma_hat_k to sigma_{k+1}
                return x + (sig[k + 1] - sh[k]) * (x - f) / sh[k]

            self.finish_fn = lambda x, f: f
            self.fwd = lambda k: (1.0, sh[k])
        else:
            raise AssertionError(type(sampler))
        self.mean = mean

    def level(self, k, batch):
        return torch.full((batch,), self.levels[k], dtype=torch.float64)


def gaussian_logprob64(x_next, mu, std, reduction):
    lp = -((x_next.double() - mu) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    lp = lp.reshape(lp.shape[0], -1)
    return lp.mean(1) if reduction == "mean" else lp.sum(1)


def conditions(groups=2, group_size=2):
    return group_conditions(torch.arange(groups) % NUM_CLASSES + 1, group_size)


def run(sampler, policy, seed=0, dtype=torch.float32, reduction="mean", cond=None):
    cond = conditions() if cond is None else cond
    g = torch.Generator().manual_seed(seed)
    return rollout(policy, sampler, cond, generator=g, sample_shape=SAMPLE_SHAPE, dtype=dtype, reduction=reduction)


# ---- (a) each step's log-prob is the float64 density of the transition it sampled -------------

@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_step_logprob_matches_float64_density(case, dtype, reduction):
    sampler, policy = make_case(case), TinyPolicy()
    ref = RefChain(sampler)
    ro = run(sampler, policy, seed=1, dtype=dtype, reduction=reduction)
    B = ro.batch_size
    torch.testing.assert_close(ro.levels.double(), torch.tensor(ref.levels[:-1], dtype=torch.float64), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        for k in range(ref.K):
            x = ro.states[:, k]
            f = policy(x, ro.levels[k].expand(B), ro.cond).double()
            want = gaussian_logprob64(ro.states[:, k + 1], ref.mean(k, x.double(), f), ref.std[k], reduction)
            tol = dict(LOGPROB_TOL[dtype])
            if reduction == "sum":
                tol["atol"] *= math.prod(SAMPLE_SHAPE)
            torch.testing.assert_close(ro.log_probs[:, k].double(), want, **tol)


# ---- (b) the whole chain vs a float64 reimplementation with the same draws ---------------------

@pytest.mark.parametrize("case", CASES)
def test_chain_matches_float64_reimplementation(case):
    sampler, policy = make_case(case), TinyPolicy()
    ref, seed = RefChain(sampler), 3
    ro = run(sampler, policy, seed=seed)
    cond, B = ro.cond, ro.batch_size

    g = torch.Generator().manual_seed(seed)  # same draw order: initial noise, then one eps per step
    noise = torch.randn((B, *SAMPLE_SHAPE), generator=g).double()
    x = ref.init_scale * noise
    states = [x]
    with torch.no_grad():
        for k in range(ref.K):
            f = policy(x, ref.level(k, B), cond)
            eps = torch.randn((B, *SAMPLE_SHAPE), generator=g).double()
            x = ref.mean(k, x, f) + ref.std[k] * eps
            states.append(x)
        samples = x if ref.finish_fn is None else ref.finish_fn(x, policy(x, ref.level(ref.K, B), cond))

    scale = max(1.0, ref.init_scale)
    torch.testing.assert_close(ro.initial_noise.double(), noise, atol=0, rtol=0)
    for k, want in enumerate(states):
        torch.testing.assert_close(ro.states[:, k].double(), want, atol=2e-5 * scale, rtol=1e-4)
    torch.testing.assert_close(ro.samples.double(), samples, atol=1e-4, rtol=1e-4)


# ---- (c) determinism ------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_rollout_is_deterministic_given_the_seed(case):
    sampler, policy = make_case(case), TinyPolicy()
    a, b, c = run(sampler, policy, seed=7), run(sampler, policy, seed=7), run(sampler, policy, seed=8)
    assert torch.equal(a.states, b.states) and torch.equal(a.log_probs, b.log_probs)
    assert torch.equal(a.samples, b.samples)
    assert not torch.equal(a.states[:, 0], c.states[:, 0])
    assert not torch.equal(a.states[:, -1], c.states[:, -1])


# ---- (d) recomputed log-probs of stored transitions equal the old ones bitwise -----------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_recomputed_logprobs_are_bitwise_equal(case, dtype):
    sampler, policy = make_case(case), TinyPolicy()
    ro = run(sampler, policy, seed=5, dtype=dtype)
    B, K = ro.batch_size, ro.num_steps
    for k in range(K):
        # the whole batch, and each sample alone
        got = transition(policy, sampler, ro.states[:, k], k, ro.cond, x_next=ro.states[:, k + 1]).log_prob
        assert torch.equal(got, ro.log_probs[:, k]), f"step {k}: batch recomputation differs"
        for i in range(B):
            one = transition(policy, sampler, ro.states[i:i + 1, k], k, ro.cond[i:i + 1],
                             x_next=ro.states[i:i + 1, k + 1]).log_prob
            assert torch.equal(one, ro.log_probs[i:i + 1, k]), f"step {k}, sample {i} alone differs"
    # all steps of all samples as one batch of rows with per-row step indices, with grad enabled
    rows = ro.step_rows([K - 1, 0, 2])
    res = transition(policy, sampler, rows.x, rows.k, rows.cond, x_next=rows.x_next)
    assert res.log_prob.requires_grad
    assert torch.equal(res.log_prob.detach(), rows.old_log_prob)
    assert torch.equal(torch.exp(res.log_prob - rows.old_log_prob).detach(), torch.ones(rows.k.shape[0]))


# ---- (e) the gradient reaches the policy, and matches float64 autograd -------------------------

@pytest.mark.parametrize("case", CASES)
def test_gradient_flows_to_policy_parameters(case):
    sampler, policy = make_case(case), TinyPolicy()
    ref = RefChain(sampler)
    ro = run(sampler, policy, seed=2)
    params = list(policy.parameters())
    B = ro.batch_size
    for k in (0, ro.num_steps - 1):
        x, x_next = ro.states[:, k], ro.states[:, k + 1]
        res = transition(policy, sampler, x, k, ro.cond, x_next=x_next)
        weights = torch.linspace(-1.0, 2.0, B)  # stands in for advantages
        grads = torch.autograd.grad((weights * res.log_prob).sum(), params, retain_graph=True)
        assert all(gr is not None and torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads)

        f = policy(x.double(), ref.level(k, B), ro.cond)
        lp64 = gaussian_logprob64(x_next, ref.mean(k, x.double(), f), ref.std[k], "mean")
        want = torch.autograd.grad((weights.double() * lp64).sum(), params)
        # d lp / d mu = (x_next - mu) / std^2 with mu in fp32: the cancellation costs about
        # eps32 * |x_next| / std of relative accuracy, large at the last steps' small stds.
        cancel = torch.finfo(torch.float32).eps * x_next.abs().max().item() / ref.std[k]
        for gr, w in zip(grads, want):
            scale = w.abs().max().item()
            assert (gr.double() - w.double()).abs().max().item() <= (1e-5 + 100 * cancel) * scale
        # the transition mean carries the gradient too (closed-form KL to a reference)
        mean_grads = torch.autograd.grad(res.mean.sum(), params)
        assert any(gr.abs().sum() > 0 for gr in mean_grads)


# ---- forward process: noised states, targets and the chain agree ------------------------------

@pytest.mark.parametrize("case", CASES)
def test_forward_process_and_targets_agree_with_the_chain(case):
    """With the oracle output for a point mass at x0 (target_noise eps + target_data x0), step k's
    mean from noised(x0, eps, k) is the process's own next state (plus RF's score term)."""
    sampler = make_case(case)
    ref = RefChain(sampler)
    B, g = 4, torch.Generator().manual_seed(11)
    x0 = torch.randn((B, *SAMPLE_SHAPE), generator=g)
    eps = torch.randn((B, *SAMPLE_SHAPE), generator=g)
    cond = torch.zeros(B, dtype=torch.long)

    def oracle(k):
        nc, dc = sampler.target_coefs(k)
        return lambda x, t, c: (nc * eps + dc * x0).to(x.dtype)

    for k in range(ref.K):
        a, b = ref.fwd(k)
        x = sampler.noised(x0, eps, k)
        torch.testing.assert_close(x.double(), a * x0.double() + b * eps.double(), atol=1e-5, rtol=1e-5)
        mean = transition(oracle(k), sampler, x, k, cond).mean.double()
        x0d, ed = x0.double(), eps.double()
        if isinstance(sampler, RectifiedFlowSDE):
            t, tn = ref.levels[k], ref.levels[k + 1]
            want = (1 - tn) * x0d + tn * ed + ref.std_t[k] ** 2 * (tn - t) / (2 * t) * ed
        elif isinstance(sampler, DDIM):
            an = ref.ab[k + 1]
            want = math.sqrt(an) * x0d + math.sqrt(1 - an - ref.sig[k] ** 2) * ed
        else:
            want = x0d + ref.sig[k + 1] * ed
        torch.testing.assert_close(mean, want, atol=1e-4 * max(1.0, ref.init_scale), rtol=1e-4)

    # per-row levels in one batch, and the final denoise recovering x0 from the last level
    ks = torch.tensor([0, ref.K - 1, 1, ref.K])
    rows = sampler.noised(x0, eps, ks)
    for i, k in enumerate(ks.tolist()):
        assert torch.equal(rows[i], sampler.noised(x0[i:i + 1], eps[i:i + 1], k)[0])
    nc, dc = sampler.target_coefs(ks)
    assert nc.shape == dc.shape == (B,)
    if ref.finish_fn is not None:
        xK = sampler.noised(x0, eps, ref.K)
        torch.testing.assert_close(sampler.finish(oracle(ref.K), xK, cond), x0, atol=1e-4, rtol=1e-4)


# ---- rollout structure and helpers ------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_rollout_fields(case):
    sampler = make_case(case)
    ro = run(sampler, TinyPolicy(), dtype=torch.bfloat16)
    B, K = 4, sampler.num_steps
    assert ro.states.shape == (B, K + 1, *SAMPLE_SHAPE) and ro.states.dtype == torch.bfloat16
    assert ro.log_probs.shape == (B, K) and ro.log_probs.dtype == torch.float32
    assert torch.isfinite(ro.log_probs).all()
    assert ro.levels.shape == (K,) and torch.equal(ro.levels, sampler.network_levels)
    assert ro.samples.shape == (B, *SAMPLE_SHAPE) and ro.samples.dtype == torch.bfloat16
    assert ro.samples.data_ptr() != ro.states[:, K].data_ptr()
    assert ro.initial_noise.shape == (B, *SAMPLE_SHAPE)
    torch.testing.assert_close(sampler.state_from_noise(ro.initial_noise.float(), torch.float32),
                               ro.states[:, 0].float(), atol=0, rtol=1e-2)
    assert ro.reduction == "mean"
    steps = sampler.sample_steps(64, generator=torch.Generator().manual_seed(0))
    assert steps.dtype == torch.long and 0 <= steps.min() and steps.max() < K


def test_group_conditions():
    assert group_conditions(torch.tensor([3, 1]), 3).tolist() == [3, 3, 3, 1, 1, 1]
    with pytest.raises(ValueError, match="group_size"):
        group_conditions(torch.tensor([1]), 0)


# ---- (f) errors -------------------------------------------------------------------------------

def test_unknown_sampler_name():
    with pytest.raises(ValueError, match="unknown sampler 'ddpm'.*ddim"):
        make_sampler("ddpm", num_steps=4)
    with pytest.raises(TypeError, match="unknown field"):
        make_sampler("ddim", num_steps=4, churn=0.1)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("bad", [0, -3])
def test_bad_num_steps_value(name, bad):
    with pytest.raises(ValueError, match="num_steps"):
        make_sampler(name, num_steps=bad)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("bad", [2.5, True, "4"])
def test_bad_num_steps_type(name, bad):
    with pytest.raises(TypeError, match="num_steps"):
        make_sampler(name, num_steps=bad)


@pytest.mark.parametrize("name, field", [("rectified_flow_sde", "noise_level"), ("rectified_flow_sde", "shift"),
                                         ("ddim", "eta"), ("edm_churn", "churn"), ("edm_churn", "sigma_min")])
@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_non_positive_parameters(name, field, bad):
    with pytest.raises(ValueError, match=field):
        make_sampler(name, num_steps=4, **{field: bad})


def test_other_bad_configs_and_indices():
    with pytest.raises(ValueError, match="eta"):
        DDIM(num_steps=4, eta=1.5)
    with pytest.raises(ValueError, match="num_train_timesteps - 1"):
        DDIM(num_steps=10, num_train_timesteps=10)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        DDIM(num_steps=1, num_train_timesteps=1)
    with pytest.raises(ValueError, match="beta_schedule"):
        DDIM(num_steps=4, beta_schedule="cosine")
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        EDMChurn(num_steps=4, sigma_min=1.0, sigma_max=0.5)
    sampler = RectifiedFlowSDE(num_steps=4)
    with pytest.raises(IndexError, match="out of range"):
        sampler.coefs(4)
    with pytest.raises(TypeError, match="int64/int32 tensor"):
        sampler.coefs(torch.tensor([0.0, 1.0]))
    x, cond = torch.zeros(2, *SAMPLE_SHAPE), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="cond"):
        transition(TinyPolicy(), sampler, x, 0, cond[:1])
    with pytest.raises(ValueError, match="returned shape"):
        transition(lambda x, t, c: x[:, :1], sampler, x, 0, cond)
