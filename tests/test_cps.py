"""Coefficients-Preserving Sampling (`rectified_flow_cps`) against a float64 derivation written here from
its definition (x0_hat = x - t v, eps_hat = x + (1 - t) v, std = t' sin(eta pi / 2),
mu = (1 - t') x0_hat + sqrt(t'^2 - std^2) eps_hat; never via ops.transitions): the coefficients, every
step and whole chains, the true Gaussian log-density of every sampled transition (with its 1/(2 std^2)
scale), the deterministic last step (no draw, log-prob 0, never trained), and the errors."""
import json
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

import ddrl_engine  # noqa: F401
from ddrl_engine.ops import transitions
from ddrl_engine.sampling import (RectifiedFlowCPS, RectifiedFlowSDE, group_conditions, make_sampler,
                                  recompute_log_probs, rollout, transition)

CHANNELS, SAMPLE_SHAPE, NUM_CLASSES = 2, (2, 3, 5), 4
D = math.prod(SAMPLE_SHAPE)
CASES = {
    "uniform": dict(num_steps=5, eta=0.8),
    "shifted": dict(num_steps=6, eta=0.35, shift=3.0),
    "eta1": dict(num_steps=4, eta=1.0),
    "sigmas": dict(num_steps=4, eta=0.6, sigmas=(0.97, 0.7, 0.41, 0.13, 0.0)),
}
# fp32 coefficients and fp32 accumulation vs float64 (the log-prob error per element ~ |x'-mu| |mu| eps32 / std^2).
LOGPROB_TOL = {torch.float32: dict(atol=2e-4, rtol=1e-5), torch.bfloat16: dict(atol=5e-4, rtol=1e-5)}


class VelocityNet(nn.Module):
    """v(x, t, c): a fixed per-pixel channel mix of x plus t- and class-dependent offsets; computes in
    x's dtype promoted to fp32 (float64 for float64 inputs), returns x's dtype; each row's output does
    not depend on the other rows of the batch."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mix = nn.Parameter(0.6 * torch.eye(CHANNELS) + 0.25 * torch.randn(CHANNELS, CHANNELS, generator=g))
        self.t_dir = nn.Parameter(0.4 * torch.randn(CHANNELS, generator=g))
        self.emb = nn.Parameter(0.3 * torch.randn(NUM_CLASSES, CHANNELS, generator=g))

    def forward(self, x, t, cond):
        dt = torch.promote_types(x.dtype, torch.float32)
        xf, spatial = x.to(dt), [1] * (x.dim() - 2)
        mix = self.mix.to(dt)
        # elementwise products summed over input channels: batch-invariant (no matmul blocking)
        mixed = torch.stack([sum(mix[i, j] * xf[:, j] for j in range(CHANNELS)) for i in range(CHANNELS)], 1)
        off = torch.cos(2 * t.to(dt))[:, None] * self.t_dir.to(dt) + self.emb.to(dt)[cond]
        return (mixed + off.view(x.shape[0], CHANNELS, *spatial)).to(x.dtype)


# ---- the float64 derivation ------------------------------------------------------------------------

def levels64(case) -> list[float]:
    kw = CASES[case]
    if kw.get("sigmas") is not None:
        return [float(s) for s in kw["sigmas"]]
    K, shift = kw["num_steps"], kw.get("shift", 1.0)
    return [shift * u / (1 + (shift - 1) * u) for u in (1 - k / K for k in range(K + 1))]


def cps64(t, tn, eta):
    """(std, mu(x, v)) of one CPS step, float64."""
    std = tn * math.sin(eta * math.pi / 2)

    def mu(x, v):
        x0_hat, eps_hat = x - t * v, x + (1 - t) * v
        return (1 - tn) * x0_hat + math.sqrt(max(tn * tn - std * std, 0.0)) * eps_hat

    return std, mu


def density64(x_next, mu, std, reduction):
    lp = -((x_next.double() - mu) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    lp = lp.reshape(lp.shape[0], -1)
    return lp.mean(1) if reduction == "mean" else lp.sum(1)


def make(case):
    return make_sampler("rectified_flow_cps", **CASES[case])


def conds(groups=2, group_size=3):
    return group_conditions(torch.arange(groups) % NUM_CLASSES, group_size)


def run(sampler, policy, seed, dtype=torch.float32, reduction="mean", **kw):
    g = torch.Generator().manual_seed(seed)
    return rollout(policy, sampler, conds(), generator=g, sample_shape=SAMPLE_SHAPE, dtype=dtype, reduction=reduction,
                   **kw)


# ---- the coefficient function -------------------------------------------------------------------------

@pytest.mark.parametrize("eta", [0.05, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_coefficients_are_the_cps_step(eta, as_tensor, seed):
    """x_coef x + out_coef v equals (1 - t') x0_hat + sqrt(t'^2 - std^2) eps_hat, std = t' sin(eta pi/2)."""
    pairs = [(1.0, 0.8), (0.9, 0.3), (0.5, 0.49), (0.2, 0.0), (0.05, 0.0)]
    x, v = torch.randn(len(pairs), dtype=torch.float64), torch.randn(len(pairs), dtype=torch.float64)
    if as_tensor:
        t = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
        tn = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
        c = transitions.rectified_flow_cps(t, tn, eta)
    else:
        cs = [transitions.rectified_flow_cps(a, b, eta) for a, b in pairs]
        c = transitions.StepCoefs(*(torch.stack([getattr(ci, f) for ci in cs]) for f in ("x_coef", "out_coef", "std")))
    assert c.x_coef.dtype == c.out_coef.dtype == c.std.dtype == torch.float32
    for i, (t_, tn_) in enumerate(pairs):
        std, mu = cps64(t_, tn_, eta)
        assert c.std[i].item() == pytest.approx(std, rel=1e-6, abs=1e-12)
        got = c.x_coef[i].double() * x[i] + c.out_coef[i].double() * v[i]
        assert got.item() == pytest.approx(mu(x[i], v[i]).item(), rel=1e-6, abs=1e-6)
        # the next state keeps the forward process's coefficients: for x = (1-t) x0 + t e and the exact
        # velocity v = e - x0, mu + std * z = (1 - t') x0 + t' (mixed unit noise)
        x0, e = torch.randn(2, dtype=torch.float64)
        xt, vel = (1 - t_) * x0 + t_ * e, e - x0
        m = c.x_coef[i].double() * xt + c.out_coef[i].double() * vel
        noise_coef = math.sqrt(max(tn_**2 - std**2, 0.0))
        assert m.item() == pytest.approx(((1 - tn_) * x0 + noise_coef * e).item(), rel=1e-5, abs=1e-6)
        assert noise_coef**2 + std**2 == pytest.approx(tn_**2, rel=1e-12, abs=1e-15)
    # the last step (t' = 0) is x0_hat exactly, with std 0
    last = transitions.rectified_flow_cps(0.3, 0.0, eta)
    assert last.std.item() == 0 and last.x_coef.item() == 1 and last.out_coef.item() == pytest.approx(-0.3, rel=1e-7)


@pytest.mark.parametrize("bad", [0.0, -0.2, 1.5])
def test_coefficient_function_rejects_bad_eta(bad):
    with pytest.raises(ValueError, match=r"rectified_flow_cps: 'eta' must be in \(0, 1\]"):
        transitions.rectified_flow_cps(0.5, 0.25, bad)


# ---- the sampler: levels, tables, each step ---------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_tables_and_deterministic_last_step(case):
    s = make(case)
    t = levels64(case)
    K = s.num_steps
    assert s.name == "rectified_flow_cps" and isinstance(s, RectifiedFlowCPS)
    torch.testing.assert_close(s.network_level(torch.arange(K + 1)).double(), torch.tensor(t, dtype=torch.float64),
                               atol=1e-7, rtol=1e-6)
    assert s.stochastic_steps == (True,) * (K - 1) + (False,)
    assert s.has_ode_step and s.nfe == K
    for k in range(K):
        std, _ = cps64(t[k], t[k + 1], CASES[case]["eta"])
        assert s.coefs(k).std.item() == pytest.approx(std, rel=1e-6, abs=0)
        ode = s.ode_coefs(k)
        assert ode.x_coef.item() == 1 and ode.std.item() == 0
        assert ode.out_coef.item() == torch.tensor(t[k + 1] - t[k], dtype=torch.float64).float().item()
    # forward process of the flow: x = (1 - t) x0 + t eps, target the velocity eps - x0
    lv = s.level(2)
    assert lv.data_scale.item() == pytest.approx(1 - t[2], abs=1e-7)
    assert lv.noise_scale.item() == pytest.approx(t[2], abs=1e-7)
    assert (lv.target_noise.item(), lv.target_data.item()) == (1.0, -1.0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_each_step_against_float64(case, dtype, reduction, seed):
    """transition() at every step from a random state: x_next = mu + std eps with mu, std from the
    float64 derivation and eps the generator's draw; log_prob the float64 Gaussian density of that x_next."""
    sampler, policy = make(case), VelocityNet(seed % 1000)
    t, eta, cond = levels64(case), CASES[case]["eta"], conds()
    B = cond.shape[0]
    with torch.no_grad():
        for k in range(sampler.num_steps - 1):
            x = torch.randn((B, *SAMPLE_SHAPE)).to(dtype)
            g = torch.Generator().manual_seed(seed + k)
            res = transition(policy, sampler, x, k, cond, generator=g, reduction=reduction)
            eps = torch.randn((B, *SAMPLE_SHAPE), generator=torch.Generator().manual_seed(seed + k)).double()
            std, mu = cps64(t[k], t[k + 1], eta)
            f = policy(x, sampler.network_level(k).expand(B), cond).double()
            want_mu = mu(x.double(), f)
            torch.testing.assert_close(res.mean.double(), want_mu, atol=2e-6, rtol=2e-6)
            want_next = (want_mu + std * eps)
            atol = 2e-6 if dtype == torch.float32 else 2 ** -7 * want_next.abs().max().item()
            torch.testing.assert_close(res.x_next.double(), want_next, atol=atol, rtol=0)
            tol = dict(LOGPROB_TOL[dtype])
            if reduction == "sum":
                tol["atol"] *= D
            torch.testing.assert_close(res.log_prob.double(), density64(res.x_next, want_mu, std, reduction), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_last_step_is_deterministic(case, dtype, seed):
    """Step K-1 lands on t = 0: x_next = x0_hat = x - t v exactly (the fp32 mean), log_prob 0, and no
    draw from the generator (its state is unchanged)."""
    sampler, policy = make(case), VelocityNet(1)
    K, cond = sampler.num_steps, conds()
    t = levels64(case)
    x = torch.randn((cond.shape[0], *SAMPLE_SHAPE)).to(dtype)
    g = torch.Generator().manual_seed(seed)
    before = g.get_state()
    res = transition(policy, sampler, x, K - 1, cond, generator=g)
    assert torch.equal(g.get_state(), before)
    assert torch.equal(res.log_prob, torch.zeros(cond.shape[0]))
    assert torch.equal(res.x_next, res.mean.detach().to(dtype))
    f = policy(x, sampler.network_level(K - 1).expand(cond.shape[0]), cond).double()
    torch.testing.assert_close(res.x_next.double(), x.double() - t[K - 1] * f,
                               atol=1e-6 if dtype == torch.float32 else 2e-2, rtol=0)
    # scoring a given x_next at a deterministic step is not a density either
    assert torch.equal(transition(policy, sampler, x, K - 1, cond, x_next=res.x_next).log_prob, res.log_prob)


# ---- whole chains ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_chain_matches_float64_reimplementation(case, seed):
    """The rollout follows the float64 chain with the same draws: the initial noise, then one eps per
    stochastic step (K - 1 of them; the deterministic last step draws none)."""
    sampler, policy = make(case), VelocityNet(2)
    t, eta, K = levels64(case), CASES[case]["eta"], CASES[case]["num_steps"]
    g_roll = torch.Generator().manual_seed(seed)
    ro = rollout(policy, sampler, conds(), generator=g_roll, sample_shape=SAMPLE_SHAPE)
    B, cond = ro.batch_size, ro.cond
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B, *SAMPLE_SHAPE), generator=g).double()
    states = [x]
    with torch.no_grad():
        for k in range(K):
            std, mu = cps64(t[k], t[k + 1], eta)
            f = policy(x, torch.full((B,), t[k], dtype=torch.float64), cond)
            x = mu(x, f) + (std * torch.randn((B, *SAMPLE_SHAPE), generator=g).double() if std > 0 else 0)
            states.append(x)
    for k, want in enumerate(states):
        torch.testing.assert_close(ro.states[:, k].double(), want, atol=3e-5, rtol=1e-4)
    torch.testing.assert_close(ro.samples.double(), states[-1], atol=3e-5, rtol=1e-4)  # finish is the identity
    # the rollout drew exactly K - 1 eps after the initial noise
    g2 = torch.Generator().manual_seed(seed)
    for _ in range(K):
        torch.randn((B, *SAMPLE_SHAPE), generator=g2)
    assert torch.equal(g_roll.get_state(), g2.get_state())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", CASES)
def test_every_sampled_logprob_is_its_float64_density(case, reduction, seed):
    """log_probs[:, k] of a rollout is the float64 density of states[:, k+1] given states[:, k] for every
    stochastic step (the true density, 1/(2 std^2) included; not Flow-GRPO's -(x' - mu)^2), and 0 at
    the deterministic last step."""
    sampler, policy = make(case), VelocityNet(3)
    t, eta, K = levels64(case), CASES[case]["eta"], CASES[case]["num_steps"]
    ro = run(sampler, policy, seed, reduction=reduction)
    B = ro.batch_size
    tol = dict(LOGPROB_TOL[torch.float32])
    if reduction == "sum":
        tol["atol"] *= D
    with torch.no_grad():
        for k in range(K - 1):
            x = ro.states[:, k]
            f = policy(x, ro.levels[k].expand(B), ro.cond).double()
            std, mu = cps64(t[k], t[k + 1], eta)
            want = density64(ro.states[:, k + 1], mu(x.double(), f), std, reduction)
            torch.testing.assert_close(ro.log_probs[:, k].double(), want, **tol)
            # the scale matters: Flow-GRPO's constant-free surrogate is a different number
            surrogate = -((ro.states[:, k + 1].double() - mu(x.double(), f)) ** 2).reshape(B, -1).mean(1)
            assert not torch.allclose(ro.log_probs[:, k].double(), surrogate, atol=1e-2)
    assert torch.equal(ro.log_probs[:, K - 1], torch.zeros(B))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputation_is_bitwise_and_gradient_is_the_densitys(dtype, seed):
    """Old log-probs recompute bitwise (ratio exactly 1), per step, per row and via recompute_log_probs;
    the gradient of a stochastic step's log-prob w.r.t. the network output is the float64 density's."""
    case = "shifted"
    sampler, policy = make(case), VelocityNet(4)
    ro = run(sampler, policy, seed, dtype=dtype)
    K, B = ro.num_steps, ro.batch_size
    for k in range(K):
        got = transition(policy, sampler, ro.states[:, k], k, ro.cond, x_next=ro.states[:, k + 1]).log_prob
        assert torch.equal(got, ro.log_probs[:, k]), k
    assert torch.equal(recompute_log_probs(policy, sampler, ro), ro.log_probs)
    rows = ro.step_rows(list(range(K - 1)))  # per-row step indices: the stochastic steps only
    res = transition(policy, sampler, rows.x, rows.k, rows.cond, x_next=rows.x_next)
    assert torch.equal(res.log_prob.detach(), rows.old_log_prob)

    # d lp / d v for a policy output v that is a leaf: (x' - mu) / std^2 * out_coef / D (reduction mean)
    t, eta = levels64(case), CASES[case]["eta"]
    k = 1
    x, xn = ro.states[:, k], ro.states[:, k + 1]
    v = policy(x, ro.levels[k].expand(B), ro.cond).detach().requires_grad_(True)
    res = transition(lambda *_: v, sampler, x, k, ro.cond, x_next=xn)
    (grad,) = torch.autograd.grad(res.log_prob.sum(), v)
    v64 = v.detach().double().requires_grad_(True)
    std, mu = cps64(t[k], t[k + 1], eta)
    (want,) = torch.autograd.grad(density64(xn, mu(x.double(), v64), std, "mean").sum(), v64)
    # the gradient is stored in v's dtype: bf16 rounds it (2^-8 relative)
    rel = 1e-5 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(grad.double(), want, atol=rel * want.abs().max().item(), rtol=rel)


# ---- configuration and errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("field,bad,match", [
    ("eta", 0.0, r"'eta' must be a finite number > 0"),
    ("eta", -1.0, r"'eta' must be a finite number > 0"),
    ("eta", 1.2, r"'eta' must be in \(0, 1\]"),
    ("eta", True, r"'eta' must be a number"),
    ("shift", 0.0, r"'shift' must be a finite number > 0"),
    ("sigmas", (1.0, 0.5, 0.1), r"'sigmas' must have num_steps \+ 1 = 4 values"),
    ("sigmas", (1.0, 0.5, 0.6, 0.0), r"'sigmas' must be strictly decreasing"),
    ("sigmas", (1.0, 0.5, 0.2, 0.1), r"'sigmas' must end at 0"),
])
def test_bad_fields_name_the_field(field, bad, match):
    with pytest.raises((ValueError, TypeError), match=r"RectifiedFlowCPS: " + match):
        RectifiedFlowCPS(num_steps=3, **{field: bad})


def test_defaults_and_shared_level_validation():
    s = RectifiedFlowCPS(num_steps=4)
    assert (s.eta, s.shift, s.sigmas) == (0.8, 1.0, None)  # 0.8: Flow-GRPO's CPS noise_level
    with pytest.raises(ValueError, match="give either 'sigmas' or 'shift'"):
        RectifiedFlowCPS(num_steps=2, shift=2.0, sigmas=(1.0, 0.5, 0.0))
    # the same levels as the SDE sampler with the same shift / sigmas
    for kw in (dict(shift=3.0), dict(sigmas=(0.9, 0.6, 0.2, 0.0))):
        a, b = RectifiedFlowCPS(num_steps=3, **kw), RectifiedFlowSDE(num_steps=3, **kw)
        assert torch.equal(a.network_level(torch.arange(4)), b.network_level(torch.arange(4)))


def test_config_round_trip_and_toml(tmp_path):
    from ddrl_engine.trainer.config import SamplerConfig, TrainConfig, config_from_dict, load_config

    sc = SamplerConfig(name="rectified_flow_cps", num_steps=6, eta=0.5, shift=2.0)
    assert sc.build() == RectifiedFlowCPS(num_steps=6, eta=0.5, shift=2.0)
    data = json.loads(json.dumps(TrainConfig(sampler=sc).to_dict()))
    assert config_from_dict(data).sampler.to_dict() == sc.to_dict()
    toml = tmp_path / "c.toml"
    toml.write_text('[sampler]\nname = "rectified_flow_cps"\nnum_steps = 5\neta = 1.0\n')
    assert load_config(toml).sampler.build() == RectifiedFlowCPS(num_steps=5, eta=1.0)
    with pytest.raises(ValueError, match=r"config: \[sampler\] RectifiedFlowCPS: 'eta' must be in \(0, 1\]"):
        SamplerConfig(name="rectified_flow_cps", num_steps=4, eta=2.0)
    with pytest.raises(ValueError, match=r"unknown field 'sampler.noise_level' for sampler 'rectified_flow_cps'"):
        SamplerConfig(name="rectified_flow_cps", num_steps=4, noise_level=0.7)


# ---- the trainer never trains the deterministic step ------------------------------------------------------

def _cps_config(tmp_path, num_steps, **algo):
    from tests.trainer_helpers import tiny_config
    from ddrl_engine.trainer.config import SamplerConfig

    cfg = tiny_config(tmp_path, "ddrl", steps=1, **algo)
    return replace(cfg, sampler=SamplerConfig(name="rectified_flow_cps", num_steps=num_steps))


@pytest.mark.parametrize("train_steps,num_steps,want", [("all", 4, [0, 1, 2]), ("every_other", 5, [0, 2]),
                                                        ("every_other", 4, [0, 2]), ([0, 2], 4, [0, 2])])
def test_trainer_leaves_out_the_deterministic_step(tmp_path, monkeypatch, train_steps, num_steps, want):
    """"all" / "every_other" skip the deterministic last step; the policy pass and the data loss run at
    exactly the remaining steps, every one with a finite loss."""
    from tests.trainer_helpers import make_trainer

    tr = make_trainer(_cps_config(tmp_path, num_steps, train_steps=train_steps))
    assert tr.trained_steps == want
    seen = []
    real = transition

    def spy(policy, sampler, x, k, cond, **kw):
        if torch.is_grad_enabled():
            seen.append(k)
        return real(policy, sampler, x, k, cond, **kw)

    monkeypatch.setattr("ddrl_engine.trainer.loop.transition", spy)
    m = tr.train_step()
    assert seen == want
    assert all(math.isfinite(m[k]) for k in ("policy_loss", "data_loss", "grad_norm"))
    assert m["ratio_dev_first"] == 0.0


@pytest.mark.parametrize("train_steps,num_steps,match", [
    ([1, 3], 4, r"algorithm.train_steps names deterministic step\(s\) \[3\] of RectifiedFlowCPS"),
    ("all", 1, r"algorithm.train_steps = 'all' leaves no stochastic step of RectifiedFlowCPS"),
])
def test_trainer_refuses_deterministic_training_steps(tmp_path, train_steps, num_steps, match):
    from tests.trainer_helpers import make_trainer

    with pytest.raises(ValueError, match=match):
        make_trainer(_cps_config(tmp_path, num_steps, train_steps=train_steps))
