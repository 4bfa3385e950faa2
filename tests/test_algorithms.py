"""The DDRL loss terms on hand-checked cases."""
import math

import pytest
import torch

from ddrl_engine.algorithms import (DDRLConfig, clipped_policy_loss, combine, data_loss, gaussian_kl,
                                    group_advantages, preset, with_method)


def test_group_advantages_hand_checked():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    adv = group_advantages(r, 4, eps=0.0)
    std = math.sqrt(1.25)  # population std of 1..4
    torch.testing.assert_close(adv[:4], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / std)
    assert torch.equal(adv[4:], torch.zeros(4))  # identical rewards: no preference


def test_group_advantages_several_rewards_are_averaged_after_normalising():
    r1 = torch.tensor([0.0, 1.0, 0.0, 1.0])
    r2 = torch.tensor([0.0, 100.0, 100.0, 0.0])  # another scale must not dominate
    adv = group_advantages(torch.stack([r1, r2]), 2, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    w = group_advantages(torch.stack([r1, r2]), 2, eps=0.0, weights=torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(w, torch.tensor([-1.0, 1.0, -0.5, 0.5]))


def test_group_advantages_lambda_clip_and_invalid():
    r = torch.tensor([0.0, 0.0, 0.0, 100.0])
    adv = group_advantages(r, 4, eps=0.0, clip=1.0)
    assert adv.max() == 1.0 and adv.min() >= -1.0
    lam = group_advantages(torch.tensor([1.0, 3.0]), 2, eps=0.0, lambda_transform=True)
    torch.testing.assert_close(lam, torch.tensor([-math.e, -math.exp(-1)]))
    valid = torch.tensor([True, True, False, True])
    adv = group_advantages(torch.tensor([1.0, 3.0, float("nan"), 0.0]), 4, eps=0.0, valid=valid)
    assert adv[2] == 0 and torch.isfinite(adv).all()
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.ones(6), 4)


def test_clipped_policy_loss_hand_checked():
    adv = torch.tensor([1.0, -1.0])
    old = torch.zeros(2)
    lp = torch.log(torch.tensor([1.5, 1.5]))  # ratio 1.5 both
    loss, stats = clipped_policy_loss(lp, old, adv, clip_eps=0.2)
    # A=+1: max(-1.5, -1.2) = -1.2 (clipped); A=-1: max(1.5, 1.2) = 1.5 (unclipped, pessimistic).
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 1.5) / 2))
    torch.testing.assert_close(stats.ratio_max_dev, torch.tensor(0.5))
    assert stats.clip_frac == 1.0


def test_policy_loss_gradient_sign():
    lp = torch.zeros(2, requires_grad=True)
    loss, _ = clipped_policy_loss(lp, torch.zeros(2), torch.tensor([2.0, -1.0]), clip_eps=0.2)
    loss.backward()
    # Descending the loss raises the log-prob of the positive-advantage sample, lowers the other.
    assert lp.grad[0] < 0 < lp.grad[1]


def test_gaussian_kl_closed_form():
    mu, ref = torch.zeros(2, 4), torch.ones(2, 4)
    std = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(gaussian_kl(mu, ref, std, "sum"), torch.tensor([4 / 2, 4 / 8]))
    torch.testing.assert_close(gaussian_kl(mu, ref, std, "mean"), torch.tensor([1 / 2, 1 / 8]))
    # Equal to the Monte-Carlo-free KL of two isotropic Gaussians with the same std.
    p = torch.distributions.Normal(mu[0], 1.0)
    q = torch.distributions.Normal(ref[0], 1.0)
    torch.testing.assert_close(gaussian_kl(mu[:1], ref[:1], 1.0, "sum"), torch.distributions.kl_divergence(p, q).sum().reshape(1))


def test_data_loss_is_velocity_mse():
    x0, eps, pred = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    got = data_loss(pred, x0, eps, torch.tensor(1.0), torch.tensor(-1.0))
    torch.testing.assert_close(got, ((pred - (eps - x0)) ** 2).mean())


def test_combine_scales_by_trained_steps():
    one = torch.tensor(1.0)
    assert combine(one, one * 2, one * 3, beta_data=0.5, beta_kl=0.0, num_trained_steps=4) == (1 + 1) / 4
    assert combine(None, one * 2, None, beta_data=1.0, beta_kl=0.0, num_trained_steps=2) == 1.0
    with pytest.raises(ValueError, match="no loss term"):
        combine(None, None, None, beta_data=0.0, beta_kl=0.0, num_trained_steps=1)


def test_presets_are_configurations_of_one_code():
    assert preset("grpo").beta_data == 0 and preset("grpo").beta_kl == 0
    assert preset("grpo_kl").beta_kl > 0 and preset("grpo_kl").beta_data == 0
    assert preset("ddrl").beta_data > 0
    assert preset("sft").use_reward is False
    moved = with_method(DDRLConfig(clip_eps=0.3, group_size=4), "grpo_kl")
    assert moved.clip_eps == 0.3 and moved.group_size == 4 and moved.method == "grpo_kl"


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="ppo"), "method"), (dict(group_size=1), "group_size"), (dict(clip_eps=0.0), "clip_eps"),
    (dict(beta_data=-1.0), "beta_data"), (dict(train_steps="odd"), "train_steps"), (dict(train_steps=[]), "train_steps"),
    (dict(data_noise="x"), "data_noise"), (dict(ppo_epochs=0), "ppo_epochs"), (dict(method="sft", use_reward=True), "use_reward"),
])
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DDRLConfig(**kwargs)


def test_trained_steps():
    assert DDRLConfig(train_steps="all").trained_steps(4) == [0, 1, 2, 3]
    assert DDRLConfig(train_steps="every_other").trained_steps(5) == [0, 2, 4]
    assert DDRLConfig(train_steps=[3, 1, 1]).trained_steps(4) == [1, 3]
    with pytest.raises(ValueError, match="out of range"):
        DDRLConfig(train_steps=[7]).trained_steps(4)


@pytest.mark.parametrize("value", [0.3, 0.1, 1e-3, -7.7, 1.0])
@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_a_group_of_equal_rewards_has_zero_advantage(value, eps):
    """The float32 mean of 8 x 0.3 is not 0.3: the residual must not be normalised into +-1."""
    r = torch.full((8,), value)
    assert torch.equal(group_advantages(r, 8, eps=eps), torch.zeros(8))
    # Next to an informative group, and with an invalid member that differs.
    two = torch.cat([r, torch.arange(8.0)])
    adv = group_advantages(two, 8, eps=eps)
    assert torch.equal(adv[:8], torch.zeros(8)) and adv[8:].abs().sum() > 0
    valid = torch.ones(16, dtype=torch.bool)
    two[3], valid[3] = 99.0, False
    assert torch.equal(group_advantages(two, 8, eps=eps, valid=valid)[:8], torch.zeros(8))


@pytest.mark.parametrize("scale", [1e30, 3e38])
@pytest.mark.parametrize("std", ["population", "unbiased"])
def test_huge_finite_rewards_give_finite_advantages(scale, std, seed):
    """Float32 statistics of rewards near 3e38 overflow (the sum, the squares); such a group is
    normalised in float64, to the float64 formula; a normal group beside it is untouched."""
    g = torch.Generator().manual_seed(seed)
    huge = (torch.rand(8, generator=g, dtype=torch.float64) * 2 - 1) * scale
    normal = torch.randn(8, generator=g, dtype=torch.float64)
    r = torch.cat([huge, normal]).float()
    got = group_advantages(r, 8, eps=1e-4, std=std)
    assert torch.isfinite(got).all()
    want = []
    for grp in r.double().reshape(2, 8):
        sd = grp.std(unbiased=(std == "unbiased"))
        want.append((grp - grp.mean()) / (sd + 1e-4))
    torch.testing.assert_close(got.double(), torch.cat(want).clamp(-5, 5), rtol=1e-5, atol=1e-5)
    alone = group_advantages(r[8:], 8, eps=1e-4, std=std)
    assert torch.equal(got[8:], alone)  # the float32 path of the normal group, bit for bit


@pytest.mark.parametrize("field", ["beta_data", "beta_kl", "adv_eps", "adv_clip", "clip_eps"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_algorithm_values_are_refused(field, value):
    from ddrl_engine.algorithms.config import DDRLConfig

    if field == "adv_clip" and value == float("inf"):
        pytest.skip("adv_clip = inf means no clamp")
    with pytest.raises(ValueError, match=f"algorithm.{field}"):
        DDRLConfig(**{field: value})
