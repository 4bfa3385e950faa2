"""examples/flow_grpo_loop.py: the engine's pieces inside a user's own Flow-GRPO-style loop around a tiny
random-weight diffusers SD3 transformer (CPU)."""
import math

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is an optional dependency (pip install ddrl-engine[diffusers])")

from ddrl_engine import ops  # noqa: E402
from ddrl_engine.algorithms import clipped_policy_loss, combine, group_advantages  # noqa: E402
from tests.example_loader import load_example  # noqa: E402



@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are tiny: one thread is much faster than two (and than two on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ex():
    return load_example("flow_grpo_loop")


def tiny(ex, seed=0):
    return ex.build_transformer(ex.parse(["--tiny", "--seed", str(seed)]))


def conds(ex, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 6, ex.TINY["joint_attention_dim"], generator=g),
            torch.randn(batch, ex.TINY["pooled_projection_dim"], generator=g))


@pytest.fixture(scope="module")
def run(ex):
    return ex.main(["--tiny", "--steps", "2", "--ppo-epochs", "2"])


def test_loop_metrics_finite_and_on_policy_ratio(run):
    hist = run["history"]
    assert [m["step"] for m in hist] == [1, 2]
    for m in hist:
        for key in ("reward", "policy_loss", "data_loss", "grad_norm", "ratio_dev_first"):
            assert math.isfinite(m[key]), (key, m)
        assert m["data_loss"] > 0 and m["grad_norm"] > 0
        # The training forward reproduces the rollout bit for bit: the first ratio is exactly 1.
        assert m["ratio_dev_first"] == 0.0
        # After the first optimiser step of the batch (second PPO epoch) the weights differ: ratio != 1.
        n = len(m["ratio_dev"]) // 2
        assert max(m["ratio_dev"][:n]) == 0.0 and m["ratio_dev"][n] > 0, m["ratio_dev"]
    assert run["seconds"] > 0


def test_data_term_changes_the_gradient(ex):
    # Same seeds, so the same rollout and policy loss; only the data term's weight differs.
    off = ex.main(["--tiny", "--steps", "1", "--beta-data", "0"])
    on = ex.main(["--tiny", "--steps", "1", "--beta-data", "1"])
    assert off["policy_loss"] == on["policy_loss"] and off["reward"] == on["reward"]
    assert off["grad_norm"] > 0  # the policy loss alone reaches the weights
    assert abs(on["grad_norm"] - off["grad_norm"]) > 1e-3 * off["grad_norm"], (on["grad_norm"], off["grad_norm"])


def test_policy_loss_gradient_reaches_every_block(ex):
    model = tiny(ex)
    cond = conds(ex, 4)
    ts = ex.sigmas(4, 3.0)
    states, old_lp = ex.rollout(model, cond, ts, (4, 4, 8, 8), 0.7, torch.Generator().manual_seed(3), "cpu")
    adv = group_advantages(ex.reward(states[:, -1]), 2)
    assert adv.abs().sum() > 0
    v = ex.velocity(model, states[:, 0], ts[0], cond)
    _, lp, _, _ = ex.sde_step(v, states[:, 0], ts[0], ts[1], 0.7, x_next=states[:, 1])
    pol, stats = clipped_policy_loss(lp, old_lp[:, 0], adv, 1e-4)
    assert stats.ratio_max_dev.item() == 0.0
    combine(pol, None, None, beta_data=0.0, beta_kl=0.0, num_trained_steps=2).backward()
    for i, block in enumerate(model.transformer_blocks):
        grads = [p.grad.abs().sum() for p in block.attn.parameters() if p.grad is not None]
        assert grads and sum(grads) > 0, f"no policy gradient in transformer block {i}"
    assert model.proj_out.weight.grad.abs().sum() > 0


def test_data_loss_alone_trains_on_fixed_data(ex):
    model = tiny(ex)
    g = torch.Generator().manual_seed(4)
    x0, eps = 0.5 * torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    cond, ts = conds(ex, 4), ex.sigmas(4, 3.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        total = 0.0
        for k in (0, 2):
            dat = ex.data_term(model, x0, eps, ts[k], cond)
            combine(None, dat, None, beta_data=1.0, beta_kl=0.0, num_trained_steps=2).backward()
            total += dat.item() / 2
        opt.step()
        losses.append(total)
    assert losses[0] > 0
    assert losses[-1] < 0.9 * losses[0], losses
    # The fused loss is the flow-matching MSE to eps - x0 (float64 reference by hand).
    with torch.no_grad():
        x_t = (1 - ts[1]) * x0 + ts[1] * eps
        pred = ex.velocity(model, x_t.float(), ts[1], cond)
        ref = ((pred.double() - (eps.double() - x0.double())) ** 2).mean()
        torch.testing.assert_close(ex.data_term(model, x0, eps, ts[1], cond).double(), ref, rtol=1e-5, atol=0)


def test_step_logprob_matches_float64_gaussian(ex):
    model = tiny(ex)
    cond, ts = conds(ex, 3), ex.sigmas(4, 3.0)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    for k in range(4):  # every step, the first (t = 1) and the last (t_next = 0) included
        with torch.no_grad():
            v = ex.velocity(model, x, ts[k], cond)
            x_next, lp, mean, std = ex.sde_step(v, x, ts[k], ts[k + 1], 0.7, generator=torch.Generator().manual_seed(k))
        c = ops.transitions.rectified_flow_sde(ts[k], ts[k + 1], 0.7)
        mu = c.x_coef.double() * x.double() + c.out_coef.double() * v.double()
        s = c.std.double()
        dens = -(x_next.double() - mu) ** 2 / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
        ref = dens.flatten(1).mean(1)  # mean reduction over each row's elements
        assert lp.dtype == torch.float32 and lp.shape == (3,)
        torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mean.double(), mu, rtol=1e-5, atol=1e-6)
        assert torch.equal(std, c.std)
        # The same transition scored again (no sampling) gives the same log-prob, bitwise.
        assert torch.equal(ex.sde_step(v, x, ts[k], ts[k + 1], 0.7, x_next=x_next)[1], lp)
        x = x_next
