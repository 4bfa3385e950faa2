"""The faithful baseline forms (algorithm.kl_form, adv_std, data_weighting, logprob_form, loss_scale)
against float64 formulas written here from the peers' code as read (never their code):

- Flow-GRPO (scripts/train_sd3.py): kl = mean_{C,H,W} (mu - mu_ref)^2 / (2 std_dev_t^2), batch mean, with
  std_dev_t = a sqrt(sigma / (1 - sigma)) (1 - sigmas[1] at sigma = 1): the step std is std_dev_t sqrt(|dt|),
  so its "KL" is the exact one times |dt|.
- DanceGRPO / cosmos-rl: A = (r - mean) / (std + eps) with torch's unbiased std (n - 1).
- cosmos-rl: ratio = exp(mean_j (-(x_next - mu)^2 + (x_next - mu_old)^2)) (no 1/(2 s^2)), and the data
  loss mean_j (x0 - D)^2 (s^2 + sigma_data^2) / (s sigma_data)^2 with sigma_data = 1.
The defaults keep today's numerics bitwise; every new field is validated with an error naming it.
"""
import math

import pytest
import torch

from ddrl_engine import ops
from ddrl_engine.algorithms import (BaselineForms, DDRLConfig, clipped_policy_loss, combine, edm_weight, gaussian_kl,
                                    group_advantages, policy_data_loss, preset)
from ddrl_engine.sampling import DDIM, EDM2AB, EDMChurn, RectifiedFlowSDE
from ddrl_engine.trainer.config import config_from_dict

SHAPES = [(3, 4, 5), (2, 7), (16,)]


# ---- adv_std: unbiased group std ------------------------------------------------------------

def _f64_advantages(rewards: list[list[float]], eps: float, unbiased: bool) -> list[list[float]]:
    """Per group: (r - mean) / (std + eps), std with n or n - 1; 0 for a group of equal values."""
    out = []
    for g in rewards:
        n = len(g)
        mean = sum(g) / n
        ss = sum((r - mean) ** 2 for r in g)
        std = math.sqrt(ss / (n - 1 if unbiased else n))
        out.append([0.0] * n if max(g) == min(g) else [(r - mean) / (std + eps) for r in g])
    return out


def test_unbiased_advantages_on_a_hand_computed_group():
    # Group 1..4: mean 2.5, sum of squares 5: unbiased std sqrt(5/3), population sqrt(5/4).
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    adv = group_advantages(r, 4, eps=0.0, std="unbiased")
    want = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(5 / 3)
    torch.testing.assert_close(adv, want)
    pop = group_advantages(r, 4, eps=0.0)
    torch.testing.assert_close(adv / pop, torch.full((4,), math.sqrt(3 / 4)))  # the n / (n - 1) factor


@pytest.mark.parametrize("group_size", [2, 3, 8, 12])
@pytest.mark.parametrize("std", ["population", "unbiased"])
def test_advantages_match_float64(seed, group_size, std):
    r = torch.randn(3, group_size, dtype=torch.float64)
    r[1] = 0.3  # a group of equal rewards: A = 0 under both stds
    adv = group_advantages(r.float().reshape(-1), group_size, eps=1e-8, std=std, clip=100.0)
    want = torch.tensor(_f64_advantages(r.tolist(), 1e-8, std == "unbiased"), dtype=torch.float64).reshape(-1)
    torch.testing.assert_close(adv.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(adv[group_size:2 * group_size], torch.zeros(group_size))


def test_unbiased_std_counts_only_the_valid_members():
    r = torch.tensor([1.0, 5.0, 3.0, 100.0, 2.0, 2.0, 7.0, 7.0])
    valid = torch.tensor([True, True, True, False, True, False, True, True])
    adv = group_advantages(r, 4, eps=0.0, std="unbiased", valid=valid, clip=100.0)
    g1 = _f64_advantages([[1.0, 5.0, 3.0]], 0.0, True)[0]  # n - 1 = 2 over the three valid members
    torch.testing.assert_close(adv[:3], torch.tensor(g1))
    assert adv[3] == 0 and adv[5] == 0  # invalid: 0
    g2 = _f64_advantages([[2.0, 7.0, 7.0]], 0.0, True)[0]
    torch.testing.assert_close(adv[[4, 6, 7]], torch.tensor(g2))
    one = group_advantages(torch.tensor([1.0, 9.0]), 2, std="unbiased", valid=torch.tensor([True, False]))
    assert torch.equal(one, torch.zeros(2))  # one valid member: n - 1 = 0, and no preference


def test_default_advantages_are_bitwise_the_population_form(seed):
    r = torch.randn(2, 24)
    assert torch.equal(group_advantages(r, 8), group_advantages(r, 8, std="population"))
    # The population formula as it always was (sum of squares / n, then sqrt + eps).
    g = r.reshape(2, 3, 8)
    mean = g.sum(-1, keepdim=True) / 8
    var = ((g - mean) ** 2).sum(-1, keepdim=True) / 8
    want = ((g - mean) / (var.sqrt() + 1e-4)).mean(0).reshape(24).clamp(-5, 5)
    assert torch.equal(group_advantages(r, 8), want)


# ---- kl_form: Flow-GRPO's KL ----------------------------------------------------------------

def _flow_grpo_kl_f64(mean, ref, sigmas, k, a):
    """Flow-GRPO's kl_loss for step k: mean over all but the batch dim of (mu - mu_ref)^2 / (2 std_dev_t^2),
    std_dev_t = a sqrt(sigma / (1 - sigma)) with 1 - sigmas[1] when sigma == 1; then the batch mean."""
    sigma = sigmas[k]
    den = 1 - sigmas[1] if sigma == 1 else 1 - sigma
    std_dev_t = a * math.sqrt(sigma / den)
    d = (mean.double() - ref.double()).reshape(mean.shape[0], -1)
    return ((d ** 2).mean(1) / (2 * std_dev_t ** 2)).mean().item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flow_grpo_kl_equals_its_formula_at_every_step(seed, shape, dtype):
    sampler = RectifiedFlowSDE(**{k: v for k, v in preset_sampler("flow_grpo").items() if k != "name"})
    algo = preset("flow_grpo")
    forms = BaselineForms.make(algo, sampler)
    sigmas = [float(sampler.network_level(k)) for k in range(sampler.num_steps + 1)]
    for k in range(sampler.num_steps):
        mean = torch.randn(4, *shape).to(dtype)
        ref = (mean.float() + 0.1 * torch.randn(4, *shape)).to(dtype)
        std = sampler.coefs(k).std.expand(4)
        got = forms.kl(gaussian_kl(mean, ref, std, "mean"), k).mean().item()
        want = _flow_grpo_kl_f64(mean, ref, sigmas, k, a=0.7)
        assert got == pytest.approx(want, rel=2e-5), k
        exact = gaussian_kl(mean, ref, std, "mean").mean().item()
        assert got == pytest.approx(exact * (sigmas[k] - sigmas[k + 1]), rel=1e-6)


def test_flow_grpo_kl_is_4_to_112_times_weaker_than_the_exact_kl():
    """The issue's numbers: on Flow-GRPO's 10 SD3 levels, 1 / |dt_k| runs from ~3.7 to ~112."""
    sampler = RectifiedFlowSDE(**{k: v for k, v in preset_sampler("flow_grpo").items() if k != "name"})
    factors = [1 / s for s in BaselineForms.make(preset("flow_grpo"), sampler).kl_scale]
    assert min(factors) == pytest.approx(1 / (0.2780487835407257 - 0.008928571827709675), rel=1e-6)
    assert max(factors) == pytest.approx(1 / 0.008928571827709675, rel=1e-6)
    assert 3.5 < min(factors) < 4 and 111 < max(factors) < 113


def test_flow_grpo_kl_in_the_trainer_is_the_exact_kl_times_dt(tmp_path):
    """One trained step, two PPO epochs: epoch 1 is on-policy (KL 0, zero KL gradient), so both runs take
    the same first update and their epoch-2 KLs differ by exactly the factor |dt_k|."""
    from tests.trainer_helpers import make_trainer, tiny_config

    kls = {}
    for form in ("exact", "flow_grpo"):
        cfg = tiny_config(tmp_path / form, "grpo_kl", train_steps=[1], ppo_epochs=2, kl_form=form)
        trainer = make_trainer(cfg)
        kls[form] = trainer.train_step()["kl"]
    t = [float(trainer.sampler.network_level(k)) for k in (1, 2)]
    assert kls["exact"] > 0
    assert kls["flow_grpo"] == pytest.approx(kls["exact"] * (t[0] - t[1]), rel=1e-5)


@pytest.mark.parametrize("sampler", [DDIM(num_steps=4), EDMChurn(num_steps=4)])
def test_flow_grpo_kl_is_refused_without_a_flow_time(sampler, tmp_path):
    with pytest.raises(ValueError, match=r"algorithm\.kl_form = 'flow_grpo'.*rectified_flow_sde"):
        BaselineForms.make(DDRLConfig(kl_form="flow_grpo"), sampler)
    with pytest.raises(ValueError, match=r"config: algorithm\.kl_form"):
        config_from_dict({"algorithm": {"kl_form": "flow_grpo"}, "sampler": {"name": sampler.name, "num_steps": 4}})
    from tests.trainer_helpers import tiny_config
    from ddrl_engine.trainer.builders import build_model, build_rewards
    from ddrl_engine.trainer.loop import Trainer

    cfg = tiny_config(tmp_path, "grpo_kl", kl_form="flow_grpo")
    with pytest.raises(ValueError, match=r"algorithm\.kl_form"):
        Trainer(cfg, build_model(cfg), sampler, build_rewards(cfg), log=lambda *a: None)


# ---- logprob_form: cosmos-rl's ratio --------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("s", [0.05, 1.0, 7.5])
def test_cosmos_log_ratio_on_hand_computed_numbers(seed, shape, s):
    """rho = exp(2 s^2 (lp - lp_old)) with the fused mean-reduced log-density equals cosmos-rl's
    exp(mean_j ((x_next - mu_old)^2 - (x_next - mu)^2)), computed here in float64."""
    b = 4
    x, out_new, out_old = torch.randn(b, *shape), torch.randn(b, *shape), torch.randn(b, *shape)
    xc, oc = 0.9, -0.3
    out_old = out_new + 0.02 * out_old  # a nearby old policy
    mu_new, mu_old = xc * x.double() + oc * out_new.double(), xc * x.double() + oc * out_old.double()
    x_next = (mu_old + s * torch.randn(b, *shape, dtype=torch.float64)).float()
    lp = ops.step_logprob(x_next, x, out_new, x_coef=xc, out_coef=oc, std=s)
    lp_old = ops.step_logprob(x_next, x, out_old, x_coef=xc, out_coef=oc, std=s)
    d_new = (x_next.double() - mu_new).reshape(b, -1)
    d_old = (x_next.double() - mu_old).reshape(b, -1)
    ratio = torch.exp((d_old ** 2 - d_new ** 2).mean(1))
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0])
    loss, stats = clipped_policy_loss(lp, lp_old, adv, clip_eps=0.2, log_ratio_scale=2 * s * s)
    want = torch.maximum(-adv.double() * ratio, -adv.double() * ratio.clamp(0.8, 1.2)).mean()
    # fp32 log-densities: the scale 2 s^2 multiplies their rounding (|lp| ulp ~ 1e-7 |lp|).
    tol = 2e-5 * max(1.0, 2 * s * s)
    assert loss.item() == pytest.approx(want.item(), abs=tol)
    assert stats.ratio_mean.item() == pytest.approx(ratio.mean().item(), abs=tol)


def test_cosmos_scales_are_two_std_squared_of_the_edm_2ab_steps():
    """On the cosmos_ddrl recipe's sampler: 2 s_k^2 with s_k = sigma_{k+1} sqrt((1 + eta)^2 - 1), Karras sigmas
    from 200 to 0.01 (rho 7) and eta = 1 / 21, derived here in float64."""
    cfg = preset_sampler("cosmos_ddrl")
    sampler = EDM2AB(**{k: v for k, v in cfg.items() if k != "name"})
    forms = BaselineForms.make(preset("cosmos_ddrl"), sampler)
    k_steps, eta = 20, 1 / 21
    lo, hi = 0.01 ** (1 / 7), 200.0 ** (1 / 7)
    sig = [(hi + i / k_steps * (lo - hi)) ** 7 for i in range(k_steps + 1)]
    for k in range(k_steps):
        s = sig[k + 1] * math.sqrt((1 + eta) ** 2 - 1)
        assert forms.log_ratio(k) == pytest.approx(2 * s * s, rel=1e-6), k
    assert forms.kl_scale is None and forms.data_weighting == "edm"


def test_cosmos_form_needs_a_mean_reduction():
    with pytest.raises(ValueError, match=r"algorithm\.logprob_form = 'cosmos'.*logprob_reduction = 'mean'"):
        DDRLConfig(logprob_form="cosmos", logprob_reduction="sum")


# ---- data_weighting: cosmos-rl's EDM weighting ----------------------------------------------

class _Denoiser(torch.nn.Module):
    """A fixed denoiser D(x; t) = 0.5 x + 0.1 t (no parameters needed)."""

    def forward(self, x, t, cond):
        return 0.5 * x + 0.1 * t.reshape(-1, *([1] * (x.dim() - 1)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sampler", [EDMChurn(num_steps=5, churn=0.3), EDM2AB(num_steps=6, churn=1 / 7)],
                         ids=["edm_churn", "edm_2ab"])
def test_edm_weighting_on_hand_computed_numbers(seed, shape, sampler):
    policy = _Denoiser()
    x0, eps = torch.randn(4, *shape), torch.randn(4, *shape)
    cond = torch.zeros(4, dtype=torch.long)
    for k in range(sampler.num_steps):
        s = float(sampler.level(k).noise_scale)  # sigma_hat_k
        t = float(sampler.network_level(k))
        x = x0.double() + s * eps.double()
        d = 0.5 * x + 0.1 * t
        want = ((s * s + 1) / (s * s)) * ((d - x0.double()) ** 2).mean()
        got = policy_data_loss(policy, x0, cond, eps, sampler.level(k), weighting="edm")
        assert got.item() == pytest.approx(want.item(), rel=1e-5), k
        plain = policy_data_loss(policy, x0, cond, eps, sampler.level(k))
        assert got.item() == pytest.approx(plain.item() * (s * s + 1) / (s * s), rel=1e-6)
    # Per-row levels: each row weighted by its own level's (s^2 + 1) / s^2.
    ks = torch.tensor([0, 1, 2, 1])
    lv = sampler.level(ks)
    s = lv.noise_scale.double()
    t = lv.network_level.double()
    view = (-1,) + (1,) * len(shape)
    x = x0.double() + s.reshape(view) * eps.double()
    d = 0.5 * x + 0.1 * t.reshape(view)
    rows = ((d - x0.double()) ** 2).reshape(4, -1).mean(1) * (s * s + 1) / (s * s)
    got = policy_data_loss(policy, x0, cond, eps, lv, weighting="edm")
    assert got.item() == pytest.approx(rows.mean().item(), rel=1e-5)


def test_edm_weight_values():
    s = torch.tensor([0.01, 0.5, 1.0, 200.0])
    torch.testing.assert_close(edm_weight(s).double(), (s.double() ** 2 + 1) / s.double() ** 2)
    assert edm_weight(torch.tensor(1.0)).item() == 2.0


@pytest.mark.parametrize("sampler", [RectifiedFlowSDE(num_steps=4), DDIM(num_steps=4)])
def test_edm_weighting_is_refused_for_other_parametrisations(sampler):
    with pytest.raises(ValueError, match=r"algorithm\.data_weighting = 'edm'.*EDM sampler"):
        BaselineForms.make(DDRLConfig(data_weighting="edm"), sampler)
    with pytest.raises(ValueError, match=r"config: algorithm\.data_weighting"):
        config_from_dict({"algorithm": {"data_weighting": "edm"}, "sampler": {"name": sampler.name, "num_steps": 4}})


def test_edm_weighting_in_the_trainer_weights_the_logged_data_loss(tmp_path):
    """The same tiny EDM run with and without the weighting: one trained step, so the first update's
    data loss differs by exactly that step's (s^2 + 1) / s^2."""
    from tests.trainer_helpers import make_trainer, tiny_config
    from ddrl_engine.trainer.config import SamplerConfig
    from dataclasses import replace

    losses = {}
    for weighting in ("none", "edm"):
        cfg = tiny_config(tmp_path / weighting, "sft", train_steps=[2], data_weighting=weighting)
        cfg = replace(cfg, sampler=SamplerConfig(name="edm_churn", num_steps=4))
        trainer = make_trainer(cfg)
        losses[weighting] = trainer.train_step()["data_loss"]
    s = float(trainer.sampler.level(2).noise_scale)
    assert losses["edm"] == pytest.approx(losses["none"] * (s * s + 1) / (s * s), rel=1e-5)


# ---- loss_scale, defaults, validation -------------------------------------------------------

def test_loss_scale_multiplies_the_combined_loss(seed):
    pol, dat, kl = torch.randn(()), torch.rand(()), torch.rand(())
    base = combine(pol, dat, kl, beta_data=0.1, beta_kl=0.2, num_trained_steps=5)
    assert torch.equal(base, (pol + 0.1 * dat + 0.2 * kl) / 5)  # today's formula, bitwise
    assert torch.equal(combine(pol, dat, kl, beta_data=0.1, beta_kl=0.2, num_trained_steps=5, loss_scale=1.0), base)
    scaled = combine(pol, dat, kl, beta_data=0.1, beta_kl=0.2, num_trained_steps=5, loss_scale=10.0)
    torch.testing.assert_close(scaled, base * 10)


def test_default_forms_are_bitwise_todays_numerics(seed):
    lp, old, adv = torch.randn(6), torch.randn(6), torch.randn(6)
    loss, stats = clipped_policy_loss(lp, old, adv, 0.2)
    ratio = torch.exp(lp - old)
    assert torch.equal(loss, torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2)).mean())
    assert torch.equal(clipped_policy_loss(lp, old, adv, 0.2, log_ratio_scale=None)[0], loss)
    forms = BaselineForms.make(DDRLConfig(), DDIM(num_steps=3))  # the defaults fit any sampler
    assert forms == BaselineForms() and forms.log_ratio(1) is None
    kl = torch.rand(5)
    assert forms.kl(kl, 0) is kl


@pytest.mark.parametrize("kwargs,match", [
    (dict(kl_form="flowgrpo"), r"algorithm\.kl_form must be one of \('exact', 'flow_grpo'\)"),
    (dict(adv_std="bessel"), r"algorithm\.adv_std must be one of \('population', 'unbiased'\)"),
    (dict(data_weighting="sigma"), r"algorithm\.data_weighting must be one of \('none', 'edm'\)"),
    (dict(logprob_form="mse"), r"algorithm\.logprob_form must be one of \('density', 'cosmos'\)"),
    (dict(kl_form=1), r"algorithm\.kl_form"),
    (dict(loss_scale=0.0), r"algorithm\.loss_scale must be a finite number > 0"),
    (dict(loss_scale=-1.0), r"algorithm\.loss_scale"),
    (dict(loss_scale=float("inf")), r"algorithm\.loss_scale"),
    (dict(loss_scale=True), r"algorithm\.loss_scale"),
    (dict(recipe="flowgrpo"), r"algorithm\.recipe must be '' \(none\) or one of"),
    (dict(method="flow_grpo"), r"algorithm\.method 'flow_grpo' is a recipe.*preset\('flow_grpo'\)"),
])
def test_new_fields_are_validated_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DDRLConfig(**kwargs)


@pytest.mark.parametrize("field,value", [("kl_form", "x"), ("adv_std", "x"), ("data_weighting", "x"),
                                         ("logprob_form", "x"), ("loss_scale", 0.0), ("recipe", "x")])
def test_new_fields_are_validated_on_load(field, value):
    with pytest.raises(ValueError, match=rf"algorithm\.{field}"):
        config_from_dict({"algorithm": {field: value}})


def test_function_arguments_are_validated():
    with pytest.raises(ValueError, match="group_advantages: 'std' must be one of"):
        group_advantages(torch.ones(4), 2, std="sample")
    lv = EDMChurn(num_steps=2).level(0)
    with pytest.raises(ValueError, match="policy_data_loss: 'weighting' must be one of"):
        policy_data_loss(_Denoiser(), torch.ones(1, 2), torch.zeros(1, dtype=torch.long), torch.ones(1, 2), lv,
                         weighting="karras")


def preset_sampler(name: str) -> dict:
    from ddrl_engine.algorithms import RECIPES

    return RECIPES[name].resolve().sampler
