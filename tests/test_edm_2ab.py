"""EDM2AB ("edm_2ab": Cosmos's exponential-integrator Adams-Bashforth solver with churn) against a
float64 derivation written here, not via ops.transitions: the coefficient tables, one step, the
log-prob of every sampled transition, the whole chain, bitwise recomputation with the recorded
previous outputs (eager, per-row, guided, graphed on a GPU), a Trainer run, and the config errors.

The derivation. The probability-flow ODE of x = x0 + sigma eps with a denoiser D is
dx/dsigma = (x - D) / sigma, i.e. d(x / sigma)/dsigma = -D / sigma^2, so from s to t < s
    x(t) = (t / s) x(s) + t * int_t^s D(sigma) / sigma^2 dsigma.
Take D linear in ln sigma through the current output D_k (at s) and the previous step's D_{k-1} (at
s1 > s): D = D_k + w(sigma) (D_{k-1} - D_k), w = ln(sigma / s) / ln(s1 / s). By parts,
t int_t^s ln(sigma / s) / sigma^2 dsigma = ln(t / s) + 1 - t / s, hence
    prev_coef = (ln(t / s) + 1 - t / s) / ln(s1 / s),   out_coef = 1 - t / s - prev_coef,   x_coef = t / s
(the first step has no D_{k-1}: Euler, prev_coef = 0). A quadrature of the integral checks the
closed form below.
"""
import math
from dataclasses import replace

import pytest
import torch

import ddrl_engine  # noqa: F401
from ddrl_engine.sampling import (EDM2AB, EDMChurn, Guided, RolloutRunner, make_sampler, recompute_log_probs,
                                  rollout, transition)
from ddrl_engine.sampling.edm_2ab import COSMOS_MAX_CHURN, cosmos_churn
from ddrl_engine.trainer.config import SamplerConfig, config_from_dict
from tests.test_sampling import NUM_CLASSES, SAMPLE_SHAPE, TinyPolicy

CONFIGS = {
    "default": dict(num_steps=5),
    "cosmos_rl": dict(num_steps=10, churn=1 / 11, sigma_min=0.01, sigma_max=200.0),
    "noise": dict(num_steps=4, churn=0.05, s_noise=1.3, rho=5.0, sigma_min=0.02, sigma_max=20.0),
    "one_step": dict(num_steps=1, churn=0.08),
    "two_steps": dict(num_steps=2),
}
# fp32 coefficients and accumulation vs float64: the error per element grows like
# |x_next - mu| / std^2 * eps32 * |mu|, large at the smallest stds (sigma_min = 0.002).
LOGPROB_TOL = {torch.float32: dict(atol=2e-3, rtol=1e-4), torch.bfloat16: dict(atol=4e-3, rtol=2e-4)}


class Ref:
    """The sampler in float64, from the docstring's derivation and Cosmos's conventions."""

    def __init__(self, s: EDM2AB):
        K, self.K = s.num_steps, s.num_steps
        lo, hi = s.sigma_min ** (1 / s.rho), s.sigma_max ** (1 / s.rho)
        self.sig = [(hi + i / K * (lo - hi)) ** s.rho for i in range(K + 1)]  # Karras
        self.sh = [(1 + s.churn) * v for v in self.sig]  # churned levels
        # Cosmos: x = sigma_max n1, then the churn at level 0 adds sqrt(sh0^2 - sig0^2) S_noise n2.
        self.init_scale = math.sqrt(self.sig[0] ** 2 + (self.sh[0] ** 2 - self.sig[0] ** 2) * s.s_noise ** 2)
        self.levels = [math.log(v) / 4 for v in self.sh]
        self.x_coef, self.out_coef, self.prev_coef, self.std = [], [], [], []
        for k in range(K):
            sc, t = self.sh[k], self.sig[k + 1]
            prev = 0.0 if k == 0 else (math.log(t / sc) + 1 - t / sc) / math.log(self.sh[k - 1] / sc)
            self.x_coef.append(t / sc)
            self.prev_coef.append(prev)
            self.out_coef.append(1 - t / sc - prev)
            # the churn to the next level: sh_{k+1}^2 - sig_{k+1}^2 = sig_{k+1}^2 ((1 + churn)^2 - 1)
            self.std.append(math.sqrt(self.sh[k + 1] ** 2 - t ** 2) * s.s_noise)

    def mean(self, k, x, f, f_prev):
        out = self.x_coef[k] * x + self.out_coef[k] * f
        return out if k == 0 else out + self.prev_coef[k] * f_prev


def density64(x_next, mu, std, reduction):
    z = (x_next.double() - mu) / std
    lp = (-0.5 * z ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)).reshape(x_next.shape[0], -1)
    return lp.mean(1) if reduction == "mean" else lp.sum(1)


def conds(batch=4):
    return torch.arange(batch) % NUM_CLASSES


def run(sampler, policy, seed=0, dtype=torch.float32, reduction="mean", batch=4):
    return rollout(policy, sampler, conds(batch), generator=torch.Generator().manual_seed(seed),
                   sample_shape=SAMPLE_SHAPE, dtype=dtype, reduction=reduction)


def scalar(v):
    return float(v.double())


# ---- the tables --------------------------------------------------------------------------------

def test_closed_form_is_the_integral():
    """The closed form above vs a Simpson quadrature of t int_t^s w(sigma) / sigma^2 dsigma (in
    u = ln sigma: dsigma / sigma^2 = e^-u du), and the AB2 step is exact for D linear in ln sigma."""
    s1, s, t = 3.1, 1.7, 0.45
    u = torch.linspace(math.log(t), math.log(s), 20001, dtype=torch.float64)
    w = (u - math.log(s)) / (math.log(s1) - math.log(s))
    h = (u[1] - u[0]).item()
    simpson = torch.ones_like(u)
    simpson[1:-1:2], simpson[2:-1:2] = 4, 2
    integral = t * (simpson * w * torch.exp(-u)).sum().item() * h / 3
    assert integral == pytest.approx((math.log(t / s) + 1 - t / s) / math.log(s1 / s), rel=1e-10)


@pytest.mark.parametrize("config", CONFIGS)
def test_tables_match_float64_derivation(config):
    s = EDM2AB(**CONFIGS[config])
    ref, K = Ref(s), s.num_steps
    assert s.name == "edm_2ab" and s.multistep and s.num_steps == K
    assert s.initial_scale == pytest.approx(ref.init_scale, rel=1e-12)
    for k in range(K):
        c = s.coefs(k)
        for got, want in ((c.x_coef, ref.x_coef[k]), (c.out_coef, ref.out_coef[k]),
                          (s.prev_coef(k), ref.prev_coef[k]), (c.std, ref.std[k])):
            assert got.dtype == torch.float32 and got.dim() == 0
            assert scalar(got) == pytest.approx(want, rel=1e-6, abs=1e-7)
        assert scalar(s.network_level(k)) == pytest.approx(ref.levels[k], rel=1e-6, abs=1e-7)
    assert s.prev_coef(0).item() == 0.0  # the first step is Euler
    if K > 1:
        assert all(s.prev_coef(k).item() < 0 for k in range(1, K))  # AB2 extrapolates
    # per-row indices, and the first step equals EDMChurn's Euler step with the same levels
    ks = torch.tensor([K - 1, 0, K - 1])
    assert torch.equal(s.prev_coef(ks), torch.stack([s.prev_coef(K - 1), s.prev_coef(0), s.prev_coef(K - 1)]))
    euler = EDMChurn(num_steps=K, churn=s.churn, sigma_min=s.sigma_min, sigma_max=s.sigma_max, rho=s.rho)
    assert torch.equal(s.coefs(0).x_coef, euler.coefs(0).x_coef)
    assert torch.equal(s.coefs(0).out_coef, euler.coefs(0).out_coef)
    with pytest.raises(IndexError, match="prev_coef"):
        s.prev_coef(K)
    assert EDMChurn(num_steps=3).prev_coef(1) is None and not EDMChurn(num_steps=3).multistep


@pytest.mark.parametrize("config", ["default", "noise"])
def test_forward_process_and_oracle_steps(config):
    """The data loss's levels are the churned ones, and with a point-mass oracle (D = x0 at every
    level, so also D_{k-1} = x0) step k's mean from the noised state is x0 + sigma_{k+1} eps."""
    s = EDM2AB(**CONFIGS[config])
    ref, g = Ref(s), torch.Generator().manual_seed(4)
    x0, eps = torch.randn((3, *SAMPLE_SHAPE), generator=g), torch.randn((3, *SAMPLE_SHAPE), generator=g)
    cond = torch.zeros(3, dtype=torch.long)
    oracle = lambda x, t, c: x0.to(x.dtype)  # noqa: E731
    for k in range(s.num_steps):
        x = s.noised(x0, eps, k)
        torch.testing.assert_close(x.double(), x0.double() + ref.sh[k] * eps.double(), atol=1e-4, rtol=1e-5)
        mean = transition(oracle, s, x, k, cond, prev_out=x0).mean.double()
        torch.testing.assert_close(mean, x0.double() + ref.sig[k + 1] * eps.double(),
                                   atol=2e-5 * ref.sh[k], rtol=1e-5)
        assert s.target_coefs(k)[0].item() == 0.0 and s.target_coefs(k)[1].item() == 1.0
    xK = s.noised(x0, eps, s.num_steps)
    torch.testing.assert_close(s.finish(oracle, xK, cond), x0)


# ---- one step ----------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("step", ["first", "middle", "last", "per_row"])
def test_step_matches_float64_derivation(seed, step, dtype, reduction):
    s, policy = EDM2AB(num_steps=5, churn=0.07), TinyPolicy()
    ref, K, B = Ref(s), 5, 4
    k = {"first": 0, "middle": 2, "last": K - 1, "per_row": torch.tensor([3, 0, K - 1, 1])}[step]
    ks = k.tolist() if isinstance(k, torch.Tensor) else [k] * B
    g = torch.Generator().manual_seed(seed)
    x = torch.stack([ref.sh[j] * torch.randn(SAMPLE_SHAPE, generator=g) for j in ks]).to(dtype)
    prev = torch.randn((B, *SAMPLE_SHAPE), generator=g).to(dtype)
    cond = conds(B)
    res = transition(policy, s, x, k, cond, generator=torch.Generator().manual_seed(seed + 1), prev_out=prev,
                     reduction=reduction)
    eps = torch.randn((B, *SAMPLE_SHAPE), generator=torch.Generator().manual_seed(seed + 1)).double()
    with torch.no_grad():
        ks_t = k if isinstance(k, torch.Tensor) else torch.full((B,), k, dtype=torch.long)
        f = policy(x, s.network_level(ks_t), cond).double()
    for i, j in enumerate(ks):
        mu = ref.mean(j, x[i].double(), f[i], prev[i].double())
        torch.testing.assert_close(res.mean[i].double(), mu, atol=1e-5 * ref.sh[j], rtol=1e-5)
        x_next = mu + ref.std[j] * eps[i]
        atol = 2e-5 * ref.sh[j] if dtype == torch.float32 else 1e-2 * x_next.abs().max().item()
        rtol = 1e-5 if dtype == torch.float32 else 0.0
        torch.testing.assert_close(res.x_next[i].double(), x_next, atol=atol, rtol=rtol)
        want = density64(res.x_next[i:i + 1], mu.unsqueeze(0), ref.std[j], reduction)
        tol = dict(LOGPROB_TOL[dtype])
        if reduction == "sum":
            tol["atol"] *= math.prod(SAMPLE_SHAPE)
        torch.testing.assert_close(res.log_prob[i:i + 1].double(), want, **tol)
    # the previous output is a constant of the step (detached), and the gradient reaches the policy
    prev.requires_grad_(True)
    res = transition(policy, s, x, k, cond, x_next=res.x_next, prev_out=prev)
    g_mix, g_prev = torch.autograd.grad(res.log_prob.sum(), [policy.mix, prev], allow_unused=True)
    assert g_mix is not None and g_mix.abs().sum() > 0 and g_prev is None
    assert res.mean.requires_grad


# ---- the rollout ---------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS)
def test_every_sampled_transition_logprob_is_its_float64_density(seed, config, dtype, reduction):
    s, policy = EDM2AB(**CONFIGS[config]), TinyPolicy()
    ref = Ref(s)
    ro = run(s, policy, seed=seed, dtype=dtype, reduction=reduction)
    B, K = ro.batch_size, ro.num_steps
    assert ro.prev_outs.shape == (B, K, *SAMPLE_SHAPE) and ro.prev_outs.dtype == torch.float32
    assert torch.equal(ro.prev_outs[:, 0], torch.zeros_like(ro.prev_outs[:, 0]))
    torch.testing.assert_close(ro.levels.double(), torch.tensor(ref.levels[:-1], dtype=torch.float64),
                               atol=1e-6, rtol=1e-6)
    f_prev = None
    with torch.no_grad():
        for k in range(K):
            x = ro.states[:, k]
            f = policy(x, ro.levels[k].expand(B), ro.cond)
            if k > 0:  # the rollout recorded exactly the previous step's output
                assert torch.equal(ro.prev_outs[:, k], f_prev.float())
            mu = ref.mean(k, x.double(), f.double(), None if f_prev is None else f_prev.double())
            want = density64(ro.states[:, k + 1], mu, ref.std[k], reduction)
            tol = dict(LOGPROB_TOL[dtype])
            if reduction == "sum":
                tol["atol"] *= math.prod(SAMPLE_SHAPE)
            torch.testing.assert_close(ro.log_probs[:, k].double(), want, **tol)
            f_prev = f


@pytest.mark.parametrize("config", ["default", "noise", "one_step"])
def test_chain_matches_float64_reimplementation(config):
    s, policy = EDM2AB(**CONFIGS[config]), TinyPolicy()
    ref, seed = Ref(s), 3
    ro = run(s, policy, seed=seed)
    B, cond = ro.batch_size, ro.cond
    g = torch.Generator().manual_seed(seed)  # the draw order: the initial noise, then one eps per step
    noise = torch.randn((B, *SAMPLE_SHAPE), generator=g).double()
    x, f_prev, states = ref.init_scale * noise, None, []
    with torch.no_grad():
        states.append(x)
        for k in range(ref.K):
            f = policy(x, torch.full((B,), ref.levels[k], dtype=torch.float64), cond)
            x = ref.mean(k, x, f, f_prev) + ref.std[k] * torch.randn((B, *SAMPLE_SHAPE), generator=g).double()
            states.append(x)
            f_prev = f
        samples = policy(x, torch.full((B,), ref.levels[ref.K], dtype=torch.float64), cond)  # D(x_hat_K)
    torch.testing.assert_close(ro.initial_noise.double(), noise, atol=0, rtol=0)
    for k, want in enumerate(states):
        torch.testing.assert_close(ro.states[:, k].double(), want, atol=2e-5 * ref.init_scale, rtol=1e-4)
    torch.testing.assert_close(ro.samples.double(), samples, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("guided", [False, True])
def test_recomputed_logprobs_are_bitwise_equal(guided, dtype):
    """At the rollout's weights every recomputation (per step, per sample, per-row steps with grad,
    recompute_log_probs) scores the stored transition with the recorded offset: ratio exactly 1.
    Under guidance the recorded previous output is the guided one."""
    s, base = EDM2AB(num_steps=5, churn=0.06), TinyPolicy()
    policy = Guided(base, 1.7, null_cond=0) if guided else base
    ro = run(s, policy, seed=5, dtype=dtype)
    B, K = ro.batch_size, ro.num_steps
    for k in range(K):
        got = transition(policy, s, ro.states[:, k], k, ro.cond, x_next=ro.states[:, k + 1],
                         prev_out=ro.prev_outs[:, k]).log_prob
        assert torch.equal(got, ro.log_probs[:, k]), f"step {k}"
        for i in range(B):
            one = transition(policy, s, ro.states[i:i + 1, k], k, ro.cond[i:i + 1], x_next=ro.states[i:i + 1, k + 1],
                             prev_out=ro.prev_outs[i:i + 1, k]).log_prob
            assert torch.equal(one, ro.log_probs[i:i + 1, k]), f"step {k}, sample {i}"
        if k > 0:
            with torch.no_grad():
                prev = policy(ro.states[:, k - 1], ro.levels[k - 1].expand(B), ro.cond)
            assert torch.equal(ro.prev_outs[:, k], prev.float())
    rows = ro.step_rows([K - 1, 0, 2])
    res = transition(policy, s, rows.x, rows.k, rows.cond, x_next=rows.x_next, prev_out=rows.prev_out)
    assert res.log_prob.requires_grad
    assert torch.equal(res.log_prob.detach(), rows.old_log_prob)
    assert torch.equal(torch.exp(res.log_prob - rows.old_log_prob).detach(), torch.ones(rows.k.shape[0]))
    assert torch.equal(recompute_log_probs(policy, s, ro), ro.log_probs)
    assert torch.equal(recompute_log_probs(policy, s, ro, steps=[3, 1], chunk=3), ro.log_probs[:, [3, 1]])
    # the offset matters: scoring without the recorded outputs (zeros) changes every later step
    wrong = transition(policy, s, ro.states[:, 2], 2, ro.cond, x_next=ro.states[:, 3],
                       prev_out=torch.zeros_like(ro.prev_outs[:, 2])).log_prob
    assert not torch.allclose(wrong, ro.log_probs[:, 2])


def test_runner_eager_equals_rollout_and_reuses_its_buffers():
    s, policy = EDM2AB(num_steps=4), TinyPolicy()
    runner = RolloutRunner(policy, s, sample_shape=SAMPLE_SHAPE, reuse_buffers=True)
    g_ref, g_run = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for _ in range(2):
        want = rollout(policy, s, conds(), generator=g_ref, sample_shape=SAMPLE_SHAPE)
        got = runner(conds(), generator=g_run)
        for name in ("states", "log_probs", "samples", "prev_outs"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert len(runner.keys) == 1 and torch.equal(got.prev_outs[:, 0], torch.zeros_like(got.prev_outs[:, 0]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replay_equals_eager_with_the_prev_outs_buffer():
    dev = torch.device("cuda")
    s, policy = EDM2AB(num_steps=5), TinyPolicy().to(dev)
    cond = conds(6).to(dev)
    graphed = RolloutRunner(policy, s, sample_shape=SAMPLE_SHAPE, cuda_graph=True)
    eager = RolloutRunner(policy, s, sample_shape=SAMPLE_SHAPE)
    g_graph, g_eager = torch.Generator(device=dev).manual_seed(9), torch.Generator(device=dev).manual_seed(9)
    for _ in range(2):  # capture, then a replay with fresh noise
        a = graphed(cond, generator=g_graph)
        b = eager(cond, generator=g_eager)
        for name in ("states", "log_probs", "samples", "prev_outs"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(recompute_log_probs(policy, s, a), a.log_probs)
    assert graphed.captures == 1


# ---- the Trainer --------------------------------------------------------------------------------

@pytest.mark.parametrize("method, recompute", [("ddrl", False), ("grpo_kl", True)])
def test_trainer_runs_exactly_on_policy(tmp_path, method, recompute):
    from ddrl_engine.trainer.builders import build_model
    from tests.trainer_helpers import make_trainer, tiny_config

    cfg = tiny_config(tmp_path, method, train_steps="all")  # steps k > 0 use the recorded offset
    cfg = replace(cfg, sampler=SamplerConfig(name="edm_2ab", num_steps=4, churn=0.08),
                  rollout=replace(cfg.rollout, recompute_old_logprobs=recompute))
    torch.manual_seed(0)
    policy = build_model(cfg)
    with torch.no_grad():  # the DiT's zero-initialised output would make every sample (and reward) equal
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tr = make_trainer(cfg, policy=policy)
    assert isinstance(tr.sampler, EDM2AB)
    batch = tr.collect()
    assert batch.rollout.prev_outs is not None
    if recompute:  # the recomputed old log-probs equal the rollout's
        assert torch.equal(batch.old_log_probs, batch.rollout.log_probs)
    m = tr.update(batch)
    assert all(math.isfinite(v) for v in m.values() if isinstance(v, float))
    assert m["adv_abs"] > 0 and m["grad_norm"] > 0  # a real update
    assert m["ratio_dev_first"] == 0.0  # ratio exactly 1 at the first inner step on CPU ...
    assert m["ratio_dev"] == 0.0  # ... at every trained step (one epoch: all at the rollout's weights)
    if method == "grpo_kl":
        assert m["kl"] == 0.0  # the reference scores the same recorded offset
        assert tr.train_step()["kl"] > 0


# ---- configuration and errors ---------------------------------------------------------------------

def test_cosmos_churn_mapping_and_config():
    assert cosmos_churn(1.0, 10) == 1 / 11  # Cosmos's RL default: S_churn = 1 over 10 steps
    assert cosmos_churn(50.0, 10) == COSMOS_MAX_CHURN == math.sqrt(1.2) - 1  # the cap
    s = EDM2AB.from_cosmos(20, 0.5, sigma_min=0.01, sigma_max=200.0)
    assert s.churn == 0.5 / 21 and s.sigma_max == 200.0 and s.num_steps == 20
    assert EDM2AB(num_steps=3).churn == COSMOS_MAX_CHURN and EDM2AB(num_steps=3).s_noise == 1.0
    assert make_sampler("edm_2ab", num_steps=3, churn=0.05) == EDM2AB(num_steps=3, churn=0.05)
    cfg = config_from_dict({"sampler": {"name": "edm_2ab", "num_steps": 6, "s_noise": 1.1}})
    built = cfg.sampler.build()
    assert isinstance(built, EDM2AB) and built.s_noise == 1.1 and built.num_steps == 6


@pytest.mark.parametrize("kwargs, match", [
    (dict(churn=0.0), "churn"), (dict(churn=-0.1), "churn"), (dict(s_noise=0.0), "s_noise"),
    (dict(sigma_min=1.0, sigma_max=0.5), "sigma_min < sigma_max"), (dict(rho=0.0), "rho"),
    (dict(sigma_min=-1.0), "sigma_min"), (dict(num_steps=0), "num_steps"),
])
def test_bad_fields(kwargs, match):
    kwargs = {"num_steps": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        EDM2AB(**kwargs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="s_churn"):
        cosmos_churn(0.0, 10)
    with pytest.raises(TypeError, match="s_churn"):
        cosmos_churn("1", 10)
    with pytest.raises(ValueError, match="num_steps"):
        cosmos_churn(1.0, 0)
    with pytest.raises(TypeError, match="not both"):
        EDM2AB.from_cosmos(10, 1.0, churn=0.1)
    with pytest.raises(ValueError, match=r"\[sampler\] EDM2AB: .churn. must be"):
        config_from_dict({"sampler": {"name": "edm_2ab", "num_steps": 4, "churn": -1.0}})

    s, policy, cond = EDM2AB(num_steps=3), TinyPolicy(), conds(2)
    x = torch.randn((2, *SAMPLE_SHAPE))
    calls = []
    counting = lambda *a: calls.append(1) or policy(*a)  # noqa: E731
    with pytest.raises(ValueError, match="multistep sampler: step 1 needs 'prev_out'"):
        transition(counting, s, x, 1, cond)
    with pytest.raises(ValueError, match="needs 'prev_out'"):
        transition(counting, s, x, torch.tensor([0, 2]), cond)
    with pytest.raises(ValueError, match="'prev_out' must be a tensor of x's shape"):
        transition(counting, s, x, 1, cond, prev_out=x[:1])
    with pytest.raises(ValueError, match="single-step sampler"):
        transition(counting, EDMChurn(num_steps=3), x, 1, cond, prev_out=x)
    assert calls == []  # every error comes before the network call
    # step 0 needs no previous output (prev_coef 0): the same result as zeros
    a = transition(policy, s, x, 0, cond, generator=torch.Generator().manual_seed(1))
    b = transition(policy, s, x, 0, cond, generator=torch.Generator().manual_seed(1), prev_out=torch.zeros_like(x))
    assert torch.equal(a.x_next, b.x_next) and torch.equal(a.log_prob, b.log_prob)
    # buffers without the prev_outs slot
    from ddrl_engine.sampling.rollout import RolloutBuffers, run_chain

    buffers = RolloutBuffers.allocate(2, 3, SAMPLE_SHAPE, torch.float32, "cpu")
    with pytest.raises(ValueError, match="prev_outs"):
        run_chain(policy, s, cond, buffers, generator=None, reduction="mean")
