"""build_optimizer: the optimiser and the per-training-step learning-rate schedule from [optim].

The lr of training step s is read before that step's optimizer.step(); the scheduler steps once
after it (as the Trainer does)."""
import io
import math

import pytest
import torch

from ddrl_engine.trainer.config import OptimConfig, config_from_dict
from ddrl_engine.trainer.optim import build_optimizer, lr_factor

LR = 3e-4  # not a power of two: "exactly lr" is a real check


def params(seed=0):
    return [torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(seed))),
            torch.nn.Parameter(torch.randn(3, generator=torch.Generator().manual_seed(seed + 1)))]


def train(opt, sched, ps, steps, start=0):
    """`steps` training steps with fixed pseudo-gradients; the lr each step used."""
    lrs = []
    for s in range(start, start + steps):
        lrs.append(opt.param_groups[0]["lr"])
        g = torch.Generator().manual_seed(100 + s)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        sched.step()
    return lrs


def lr_sequence(total, **optim):
    ps = params()
    opt, sched = build_optimizer(ps, OptimConfig(lr=LR, **optim), device="cpu", total_steps=total)
    return train(opt, sched, ps, total)


def test_constant_is_exactly_lr_every_step():
    assert lr_sequence(20) == [LR] * 20
    assert lr_sequence(5, name="sgd") == [LR] * 5


def test_linear_warmup():
    lrs = lr_sequence(10, schedule="linear_warmup", warmup_steps=4)
    assert lrs[:4] == pytest.approx([LR * (s + 1) / 5 for s in range(4)], rel=1e-12)
    assert 0 < lrs[0] < lrs[1] < lrs[2] < lrs[3] < LR
    assert lrs[4:] == [LR] * 6


@pytest.mark.parametrize("warmup", [0, 3])
def test_cosine_warms_up_then_decays_to_min_lr(warmup):
    total, min_lr = 12, 1e-5
    lrs = lr_sequence(total, schedule="cosine", warmup_steps=warmup, min_lr=min_lr)
    assert lrs[:warmup] == pytest.approx([LR * (s + 1) / (warmup + 1) for s in range(warmup)], rel=1e-12)
    assert lrs[warmup] == LR  # the decay starts at the peak
    assert lrs[-1] == pytest.approx(min_lr, rel=1e-12)  # and ends at min_lr on the last training step
    decay = lrs[warmup:]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing
    mid = warmup + (total - 1 - warmup) / 2
    if mid == int(mid):
        assert lrs[int(mid)] == pytest.approx((LR + min_lr) / 2, rel=1e-12)
    assert min(lrs) >= min_lr * (1 - 1e-12) and max(lrs) == LR


def test_cosine_edge_cases():
    # A decay of one step is at the peak (after a warm-up, or a one-step run); past the run: min_lr.
    assert lr_sequence(3, schedule="cosine", warmup_steps=2, min_lr=1e-6)[2] == LR
    assert lr_sequence(1, schedule="cosine", min_lr=1e-6) == [LR]
    f = lr_factor(OptimConfig(lr=LR, schedule="cosine", min_lr=0.0), total_steps=5)
    assert [f(s) for s in (0, 4, 5, 50)] == pytest.approx([1.0, 0.0, 0.0, 0.0], abs=1e-15)
    g = lr_factor(OptimConfig(lr=LR, schedule="cosine", min_lr=1e-6, warmup_steps=2), total_steps=3)
    assert g(3) == pytest.approx(1e-6 / LR)


def test_default_is_todays_adamw_bitwise():
    cfg = OptimConfig(lr=LR, weight_decay=0.01, beta1=0.8, beta2=0.95)
    ps, ref_ps = params(), params()
    opt, sched = build_optimizer(ps, cfg, device="cpu", total_steps=6)
    assert type(opt) is torch.optim.AdamW
    g = opt.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["betas"], g["fused"]) == (LR, 0.01, (0.8, 0.95), False)
    ref = torch.optim.AdamW(ref_ps, lr=LR, weight_decay=0.01, betas=(0.8, 0.95), fused=False)
    train(opt, sched, ps, 6)
    train(ref, torch.optim.lr_scheduler.LambdaLR(ref, lambda s: 1.0), ref_ps, 6)
    assert all(torch.equal(a, b) for a, b in zip(ps, ref_ps))
    # On CUDA the AdamW is fused (fused AdamW also runs on CPU tensors, so this needs no GPU).
    cuda_opt, _ = build_optimizer(params(), cfg, device="cuda:0", total_steps=6)
    assert cuda_opt.param_groups[0]["fused"] is True


def test_adam_and_sgd():
    opt, _ = build_optimizer(params(), OptimConfig(name="adam", lr=LR, weight_decay=0.1, beta1=0.5, beta2=0.9),
                             device="cpu", total_steps=3)
    g = opt.param_groups[0]
    assert type(opt) is torch.optim.Adam and (g["betas"], g["weight_decay"]) == ((0.5, 0.9), 0.1)
    assert not g["decoupled_weight_decay"]
    opt, _ = build_optimizer(params(), OptimConfig(name="sgd", lr=LR, weight_decay=0.1, beta1=0.7),
                             device="cpu", total_steps=3)
    g = opt.param_groups[0]
    assert type(opt) is torch.optim.SGD
    assert (g["momentum"], g["weight_decay"], g["dampening"], g["nesterov"]) == (0.7, 0.1, 0, False)


@pytest.mark.parametrize("optim", [dict(schedule="cosine", warmup_steps=3, min_lr=1e-6),
                                   dict(name="sgd", schedule="linear_warmup", warmup_steps=4),
                                   dict()])
def test_state_dict_round_trip_resumes_the_same_lr_sequence(optim):
    cfg, total, cut = OptimConfig(lr=LR, **optim), 10, 4
    ps = params()
    opt, sched = build_optimizer(ps, cfg, device="cpu", total_steps=total)
    straight = train(opt, sched, ps, total)

    ps = params()
    opt, sched = build_optimizer(ps, cfg, device="cpu", total_steps=total)
    first = train(opt, sched, ps, cut)
    buf = io.BytesIO()  # through bytes, as a checkpoint (state_dict() shares the live state tensors)
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "params": [p.detach() for p in ps]}, buf)
    buf.seek(0)
    saved = torch.load(buf)

    resumed_ps = [torch.nn.Parameter(p) for p in saved["params"]]
    opt2, sched2 = build_optimizer(resumed_ps, cfg, device="cpu", total_steps=total)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    rest = train(opt2, sched2, resumed_ps, total - cut, start=cut)
    assert first + rest == straight
    train(opt, sched, ps, total - cut, start=cut)  # the uninterrupted second half: same weights
    assert all(torch.equal(a, b) for a, b in zip(ps, resumed_ps))


@pytest.mark.parametrize("optim,match", [
    ({"name": "lion"}, r"'optim.name' must be one of \('adamw', 'adam', 'sgd'\), got 'lion'"),
    ({"schedule": "step"}, r"'optim.schedule' must be one of \('constant', 'linear_warmup', 'cosine'\)"),
    ({"warmup_steps": 1.5}, "'optim.warmup_steps' must be an integer"),
    ({"warmup_steps": -1, "schedule": "cosine"}, "'optim.warmup_steps' must be >= 0"),
    ({"min_lr": -1e-6, "schedule": "cosine"}, "'optim.min_lr' must be >= 0"),
    ({"warmup_steps": 5}, "optim.warmup_steps needs optim.schedule = 'linear_warmup' or 'cosine'"),
    ({"min_lr": 1e-6}, "optim.min_lr needs optim.schedule = 'cosine'"),
    ({"min_lr": 1e-3, "lr": 1e-4, "schedule": "cosine"}, "optim.min_lr = 0.001 must be <= optim.lr = 0.0001"),
    ({"warmup_steps": 10, "schedule": "linear_warmup"}, "optim.warmup_steps = 10 must be < run.steps = 10"),
    ({"beta1": 1.0}, r"'optim.beta1' must be in \[0, 1\)"),
    ({"lr": 0.0}, "'optim.lr' must be > 0"),
])
def test_bad_values_are_config_errors(optim, match):
    with pytest.raises(ValueError, match=f"^config: .*{match}"):
        config_from_dict({"run": {"steps": 10}, "optim": optim})


def test_build_optimizer_checks_configs_built_in_code():
    with pytest.raises(ValueError, match="'optim.name' must be one of"):
        build_optimizer(params(), OptimConfig(name="lion"), device="cpu", total_steps=5)
    with pytest.raises(ValueError, match="optim.warmup_steps = 5 must be < run.steps = 5"):
        build_optimizer(params(), OptimConfig(schedule="cosine", warmup_steps=5), device="cpu", total_steps=5)
    with pytest.raises(ValueError, match="total_steps must be an int >= 1"):
        build_optimizer(params(), OptimConfig(), device="cpu", total_steps=0)


def test_fields_load_from_toml_values():
    cfg = config_from_dict({"optim": {"name": "adam", "schedule": "cosine", "warmup_steps": 3, "min_lr": 0}})
    o = cfg.optim
    assert (o.name, o.schedule, o.warmup_steps, o.min_lr) == ("adam", "cosine", 3, 0.0)
    assert isinstance(o.min_lr, float) and math.isfinite(o.min_lr)
