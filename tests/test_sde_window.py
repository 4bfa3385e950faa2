"""SDE windows ([sampler] sde_window, Flow-GRPO-Fast / MixGRPO): outside the window the chain takes the
deterministic ODE step (Euler, x + (t' - t) v, exactly: no draw, log-prob 0), inside it the sampler's SDE
steps with log-probs equal to their float64 densities (derived here); only the window's steps are
trained (policy loss, KL, data loss, recomputed old log-probs); fixed / random / sliding windows run end
to end in the Trainer, resume exactly, report rollout_nfe and sde_window_first, and bad windows are
one clear error naming sampler.sde_window."""
import json
import math
from dataclasses import replace

import pytest
import torch

import ddrl_engine  # noqa: F401
from ddrl_engine.sampling import RolloutRunner, make_sampler, recompute_log_probs, rollout, transition
from tests.test_cps import SAMPLE_SHAPE, VelocityNet, conds, cps64, density64

K = 6
SAMPLERS = {
    "sde": ("rectified_flow_sde", dict(num_steps=K, noise_level=0.7, shift=2.0)),
    "cps": ("rectified_flow_cps", dict(num_steps=K, eta=0.7)),
}


def levels64(kw) -> list[float]:
    shift = kw.get("shift", 1.0)
    return [shift * u / (1 + (shift - 1) * u) for u in (1 - k / kw["num_steps"] for k in range(kw["num_steps"] + 1))]


def sde64(t, tn, a, t1):
    """(std, mu(x, v)) of the flow-matching SDE step (docs/method.md section 2), float64; t1 stands in
    for t in 1 - t at t = 1."""
    std_t = a * math.sqrt(t / (1 - (t1 if t >= 1 else t)))
    dt = tn - t

    def mu(x, v):
        return x * (1 + std_t**2 * dt / (2 * t)) + v * (1 + std_t**2 * (1 - t) / (2 * t)) * dt

    return std_t * math.sqrt(-dt), mu


def step64(case, k):
    name, kw = SAMPLERS[case]
    t = levels64(kw)
    return sde64(t[k], t[k + 1], kw["noise_level"], t[1]) if case == "sde" else cps64(t[k], t[k + 1], kw["eta"])


def make(case):
    name, kw = SAMPLERS[case]
    return make_sampler(name, **kw)


def run(sampler, policy, seed, window=None, dtype=torch.float32, gen=None):
    gen = torch.Generator().manual_seed(seed) if gen is None else gen
    return rollout(policy, sampler, conds(), generator=gen, sample_shape=SAMPLE_SHAPE, dtype=dtype, window=window)


# ---- the windowed chain --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case,window", [("sde", (0, 2)), ("sde", (2, 3)), ("sde", (5, 1)), ("cps", (1, 2)),
                                         ("cps", (0, 5)), ("cps", (3, 1))])
def test_windowed_chain(case, window, dtype, seed):
    sampler, policy = make(case), VelocityNet(5)
    t = levels64(SAMPLERS[case][1])
    gen = torch.Generator().manual_seed(seed)
    ro = run(sampler, policy, seed, window, dtype, gen)
    assert ro.window == window
    first, size = window
    B = ro.batch_size
    replay = torch.Generator().manual_seed(seed)  # the draws: initial noise, then one eps per window step
    noise = torch.randn((B, *SAMPLE_SHAPE), generator=replay)
    torch.testing.assert_close(ro.initial_noise.float(), noise.to(dtype).float(), atol=0, rtol=0)
    with torch.no_grad():
        for k in range(K):
            x, xn = ro.states[:, k], ro.states[:, k + 1]
            f = policy(x, sampler.network_level(k).expand(B), ro.cond)
            if first <= k < first + size:
                std, mu = step64(case, k)
                want_mu = mu(x.double(), f.double())
                eps = torch.randn((B, *SAMPLE_SHAPE), generator=replay).double()
                atol = 3e-6 if dtype == torch.float32 else 2 ** -7 * (want_mu.abs().max().item() + 3 * std)
                torch.testing.assert_close(xn.double(), want_mu + std * eps, atol=atol, rtol=0)
                torch.testing.assert_close(ro.log_probs[:, k].double(), density64(xn, want_mu, std, "mean"),
                                           atol=3e-4, rtol=1e-5)
            else:  # the ODE step, exactly: x + dt f with dt the float32 of the float64 level difference
                dt32 = torch.tensor(t[k + 1] - t[k], dtype=torch.float64).float()
                assert torch.equal(xn, (x.float() + dt32 * f.float()).to(dtype)), k
                assert torch.equal(ro.log_probs[:, k], torch.zeros(B)), k
    assert torch.equal(gen.get_state(), replay.get_state())  # no draw outside the window
    assert torch.equal(ro.samples, ro.states[:, K])
    # the stored log-probs recompute bitwise (zeros outside the window, without a forward)
    assert torch.equal(recompute_log_probs(policy, sampler, ro), ro.log_probs)
    inside = list(range(first, first + size))
    assert torch.equal(recompute_log_probs(policy, sampler, ro, steps=inside), ro.log_probs[:, inside])


@pytest.mark.parametrize("case,full", [("sde", (0, K)), ("cps", (0, K - 1))])
def test_a_window_over_every_stochastic_step_is_the_plain_chain(case, full, seed):
    """No ODE step left: bitwise the rollout without a window (the window path does not touch the SDE
    steps; CPS's deterministic last step is the Euler step itself)."""
    sampler, policy = make(case), VelocityNet(6)
    a, b = run(sampler, policy, seed), run(sampler, policy, seed, full)
    assert torch.equal(a.states, b.states) and torch.equal(a.log_probs, b.log_probs)
    assert torch.equal(a.samples, b.samples) and a.window is None


def test_transition_ode_flag(seed):
    sampler, policy = make("sde"), VelocityNet(7)
    cond = conds()
    x = torch.randn((cond.shape[0], *SAMPLE_SHAPE))
    g = torch.Generator().manual_seed(seed)
    before = g.get_state()
    res = transition(policy, sampler, x, 3, cond, generator=g, ode=True)
    t = levels64(SAMPLERS["sde"][1])
    f = policy(x, sampler.network_level(3).expand(cond.shape[0]), cond)
    assert torch.equal(res.x_next, x + torch.tensor(t[4] - t[3], dtype=torch.float64).float() * f)
    assert torch.equal(res.log_prob, torch.zeros(cond.shape[0])) and torch.equal(g.get_state(), before)
    with pytest.raises(TypeError, match="ode_coefs: the step index must be a Python int"):
        transition(policy, sampler, x, torch.full((cond.shape[0],), 3), cond, ode=True)
    with pytest.raises(ValueError, match=r"DDIM \('ddim'\) has no ODE step"):
        transition(policy, make_sampler("ddim", num_steps=4), x, 1, cond, ode=True)


# ---- the runner: the window is part of the plan key ---------------------------------------------------------

def test_runner_keys_and_results(seed):
    sampler, policy = make("cps"), VelocityNet(8)
    runner = RolloutRunner(policy, sampler, sample_shape=SAMPLE_SHAPE, reuse_buffers=True)
    cond = conds()
    out = {}
    for w in (None, (1, 2), (2, 2), (1, 2)):
        ro = runner(cond, generator=torch.Generator().manual_seed(seed), window=w)
        want = run(sampler, policy, seed, w)
        assert torch.equal(ro.states, want.states) and torch.equal(ro.log_probs, want.log_probs) and ro.window == w
        out[w] = ro.states.clone()
    keys = runner.keys
    assert len(keys) == 3  # None, (1, 2), (2, 2): the graph of one window never replays another's chain
    assert sum(1 for k in keys if ("sde_window", 1, 2) in k) == 1
    assert sum(1 for k in keys if ("sde_window", 2, 2) in k) == 1
    g = torch.Generator()
    assert len({runner.key(cond, g), runner.key(cond, g, window=(1, 2)), runner.key(cond, g, window=(2, 2)),
                runner.key(cond, g, shard=(0, 6)), runner.key(cond, g, shard=(0, 6), window=(0, 6))}) == 5
    assert not torch.equal(out[(1, 2)], out[(2, 2)])
    with pytest.raises(ValueError, match=r"sde_window: the SDE window \[4, 2\] holds deterministic step\(s\) \[5\]"):
        runner(cond, generator=torch.Generator(), window=(4, 2))


@pytest.mark.parametrize("name,kw,window,err,match", [
    ("ddim", dict(num_steps=4), (0, 2), ValueError, r"DDIM \('ddim'\) has no ODE step for the steps outside"),
    ("edm_churn", dict(num_steps=4), (0, 2), ValueError, r"EDMChurn \('edm_churn'\) has no ODE step"),
    ("rectified_flow_sde", dict(num_steps=4), (3, 2), ValueError, r"first \+ size <= num_steps = 4"),
    ("rectified_flow_sde", dict(num_steps=4), (0, 0), ValueError, r"size >= 1"),
    ("rectified_flow_sde", dict(num_steps=4), (-1, 2), ValueError, r"first >= 0"),
    ("rectified_flow_sde", dict(num_steps=4), (1,), TypeError, r"must be \[first, size\] \(two ints\)"),
    ("rectified_flow_sde", dict(num_steps=4), (1.0, 2), TypeError, r"must be \[first, size\] \(two ints\)"),
    ("rectified_flow_cps", dict(num_steps=4), (2, 2), ValueError, r"holds deterministic step\(s\) \[3\]"),
])
def test_bad_windows(name, kw, window, err, match):
    sampler = make_sampler(name, **kw)
    with pytest.raises(err, match=match):
        rollout(VelocityNet(), sampler, conds(), generator=None, sample_shape=SAMPLE_SHAPE, window=window)


# ---- configuration ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("keys", [dict(sde_window=[1, 2]), dict(sde_window="random", sde_window_size=3),
                                  dict(sde_window="sliding", sde_window_size=2, sde_window_every=3),
                                  dict(sde_window="sliding", sde_window_size=2)])
def test_config_round_trips(tmp_path, keys):
    from ddrl_engine.trainer.config import SamplerConfig, TrainConfig, config_from_dict, load_config

    sc = SamplerConfig(name="rectified_flow_cps", num_steps=K, **keys)
    assert {k: getattr(sc, k) for k in keys} == keys
    assert {k: v for k, v in sc.to_dict().items() if k.startswith("sde_window")} == keys
    back = config_from_dict(json.loads(json.dumps(TrainConfig(sampler=sc).to_dict()))).sampler
    assert back.to_dict() == sc.to_dict()
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    toml = tmp_path / "c.toml"
    toml.write_text(f'[sampler]\nname = "rectified_flow_cps"\nnum_steps = {K}\n{lines}')
    assert load_config(toml).sampler.to_dict() == sc.to_dict()
    # the default writes no window key (config.json of existing runs unchanged)
    assert not any(k.startswith("sde_window") for k in SamplerConfig().to_dict())


@pytest.mark.parametrize("keys,match", [
    (dict(sde_window="fast"), r"'sampler.sde_window' must be \[first, size\], 'random' or 'sliding'"),
    (dict(sde_window=3), r"'sampler.sde_window' must be \[first, size\]"),
    (dict(sde_window=[1, 2, 3]), r"'sampler.sde_window' must be \[first, size\]"),
    (dict(sde_window=[1, 2.5]), r"'sampler.sde_window\[1\]' must be an integer"),
    (dict(sde_window=[5, 1]), r"sampler.sde_window: the SDE window \[5, 1\] holds deterministic step"),
    (dict(sde_window="random"), r"sampler.sde_window = 'random' needs 'sampler.sde_window_size'"),
    (dict(sde_window="random", sde_window_size=6), r"sampler.sde_window_size: RectifiedFlowCPS .* has no window of 6"),
    (dict(sde_window="random", sde_window_size=0), r"sampler.sde_window_size: the window size must be an int >= 1"),
    (dict(sde_window=[0, 2], sde_window_size=2), r"'sampler.sde_window_size' is the size of a 'random' or 'sliding'"),
    (dict(sde_window_size=2), r"'sampler.sde_window_size' is the size of a 'random' or 'sliding'"),
    (dict(sde_window="random", sde_window_size=2, sde_window_every=2), r"'sampler.sde_window_every' needs .*'sliding'"),
    (dict(sde_window="sliding", sde_window_size=2, sde_window_every=0), r"'sampler.sde_window_every' must be >= 1"),
])
def test_config_errors_name_the_field(keys, match):
    from ddrl_engine.trainer.config import SamplerConfig

    with pytest.raises(ValueError, match=match):
        SamplerConfig(name="rectified_flow_cps", num_steps=K, **keys)


def test_config_refuses_a_window_without_an_ode_step():
    from ddrl_engine.trainer.config import SamplerConfig

    with pytest.raises(ValueError, match=r"config: sampler.sde_window: DDIM \('ddim'\) has no ODE step"):
        SamplerConfig(name="ddim", num_steps=4, sde_window=[0, 2])
    with pytest.raises(ValueError, match=r"config: sampler.sde_window_size: EDMChurn \('edm_churn'\) has no ODE step"):
        SamplerConfig(name="edm_churn", num_steps=4, sde_window="random", sde_window_size=2)


# ---- the trainer ---------------------------------------------------------------------------------------------

def window_config(tmp_path, method="ddrl", name="rectified_flow_cps", steps=3, **keys):
    from tests.trainer_helpers import tiny_config
    from ddrl_engine.trainer.config import SamplerConfig

    cfg = tiny_config(tmp_path, method, steps=steps)
    cfg = replace(cfg, sampler=SamplerConfig(name=name, num_steps=K, **keys))
    return replace(cfg, rollout=replace(cfg.rollout, recompute_old_logprobs=True))


class Spy:
    """Records, per training step, the steps of the trainer's grad-enabled transitions (the policy pass),
    of the KL's reference transitions, of the data loss levels and of the old-log-prob recomputation."""

    def __init__(self, monkeypatch, sampler):
        from ddrl_engine.algorithms import losses
        from ddrl_engine.trainer import loop

        self.policy, self.reference, self.data, self.recompute = [], [], [], []
        of_level = {sampler.network_level(k).item(): k for k in range(sampler.num_steps)}

        def transition_spy(policy, sampler, x, k, cond, **kw):
            (self.policy if torch.is_grad_enabled() else self.reference).append(k)
            return transition(policy, sampler, x, k, cond, **kw)

        def data_spy(policy, x0, y, eps, level, **kw):
            self.data.append(of_level[level.network_level.item()])
            return losses.policy_data_loss(policy, x0, y, eps, level, **kw)

        def recompute_spy(policy, sampler, roll, *, steps=None, **kw):
            self.recompute.append(list(steps))
            return recompute_log_probs(policy, sampler, roll, steps=steps, **kw)

        monkeypatch.setattr(loop, "transition", transition_spy)
        monkeypatch.setattr(loop, "policy_data_loss", data_spy)
        monkeypatch.setattr(loop, "recompute_log_probs", recompute_spy)

    def take(self):
        out = dict(policy=self.policy[:], reference=self.reference[:], data=self.data[:], recompute=self.recompute[:])
        for v in (self.policy, self.reference, self.data, self.recompute):
            v.clear()
        return out


@pytest.mark.parametrize("method", ["ddrl", "grpo_kl"])
@pytest.mark.parametrize("keys", [dict(sde_window=[1, 3]), dict(sde_window="random", sde_window_size=2),
                                  dict(sde_window="sliding", sde_window_size=2, sde_window_every=2)])
def test_windowed_trainer_trains_only_the_window(tmp_path, monkeypatch, method, keys):
    from tests.trainer_helpers import make_trainer

    tr = make_trainer(window_config(tmp_path, method, steps=4, **keys))
    size = keys.get("sde_window_size", 3)
    starts = list(range(K - size))  # CPS: step K-1 is deterministic, so a window ends by K-2
    spy = Spy(monkeypatch, tr.sampler)
    firsts = []
    for step in range(4):
        m = tr.train_step()
        first = m["sde_window_first"]
        firsts.append(first)
        window = list(range(first, first + size))
        seen = spy.take()
        assert seen["policy"] == window and seen["recompute"] == [window]
        assert seen["reference"] == (window if method == "grpo_kl" else [])
        assert seen["data"] == (window if method == "ddrl" else [])
        assert m["rollout_nfe"] == K and m["ratio_dev_first"] == 0.0
        assert all(math.isfinite(m[k]) for k in ("policy_loss", "data_loss", "kl", "grad_norm"))
        if method == "grpo_kl":
            assert m["kl"] >= 0
        if "sde_window_every" in keys:
            assert first == starts[(step // 2) % len(starts)]
    if keys["sde_window"] == [1, 3]:
        assert firsts == [1] * 4 and tr.trained_steps == [1, 2, 3]
    else:
        assert tr.trained_steps is None and all(f in starts for f in firsts)
    if keys["sde_window"] == "random":  # the draws come from run.seed: the same for the same seed
        again = make_trainer(window_config(tmp_path / "b", method, steps=4, **keys))
        assert [again.train_step()["sde_window_first"] for _ in range(4)] == firsts


def test_window_only_window_steps_carry_gradient(tmp_path):
    """The update's gradient (before clipping) is exactly that of the mean clipped policy loss over the
    window's steps, computed here from the stored transitions: steps outside the window add nothing."""
    from tests.trainer_helpers import make_trainer
    from ddrl_engine.algorithms import clipped_policy_loss

    cfg = window_config(tmp_path, "grpo", steps=1, sde_window=[2, 2])
    cfg = replace(cfg, optim=replace(cfg.optim, lr=1e-12, grad_clip=0.0))
    tr = make_trainer(cfg)
    batch = tr.collect()
    adv = tr.await_rewards(batch).advantages
    grads = {}
    real_step = tr._optimizer_step

    def capture():
        grads.update({n: p.grad.clone() for n, p in tr.policy.named_parameters() if p.grad is not None})
        return real_step()

    tr._optimizer_step = capture
    tr.update(batch)
    tr.policy.zero_grad(set_to_none=True)
    tr.policy.train()
    ro = batch.rollout
    total = 0
    for k in (2, 3):
        res = transition(tr.policy, tr.sampler, ro.states[:, k], k, ro.cond, x_next=ro.states[:, k + 1])
        total = total + clipped_policy_loss(res.log_prob, batch.old_log_probs[:, k], adv, cfg.algorithm.clip_eps)[0]
    (total / 2).backward()
    for n, p in tr.policy.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_random_window_resumes_exactly(tmp_path):
    from tests.trainer_helpers import make_trainer

    cfg = window_config(tmp_path, "ddrl", steps=4, sde_window="random", sde_window_size=2)
    a = make_trainer(cfg)
    a.train_step()
    a.train_step()
    assert "sde_window_gen" in a.state_dict()["trainer"]
    a.save()
    b = make_trainer(cfg)
    assert b.resume() and b.step == 2
    for _ in range(2):
        ma, mb = a.train_step(), b.train_step()
        assert ma["sde_window_first"] == mb["sde_window_first"]
        assert {k: v for k, v in ma.items() if not k.startswith("time_")} == \
            {k: v for k, v in mb.items() if not k.startswith("time_")}
    # a checkpoint of a run without a random window cannot feed one that draws them
    plain = make_trainer(window_config(tmp_path / "plain", "ddrl", steps=2))
    with pytest.raises(ValueError, match="has no 'sde_window_gen'"):
        make_trainer(cfg).load_state_dict(plain.state_dict())


def test_trainer_window_errors(tmp_path):
    from tests.trainer_helpers import make_trainer
    from ddrl_engine.trainer.builders import build_dataset, build_model, build_rewards
    from ddrl_engine.trainer.loop import Trainer

    cfg = window_config(tmp_path, "ddrl", sde_window=[0, 2])
    with pytest.raises(ValueError, match=r"algorithm.train_steps = \[0, 1\] cannot be combined with "
                                         r"sampler.sde_window = \[0, 2\]"):
        make_trainer(replace(cfg, algorithm=replace(cfg.algorithm, train_steps=[0, 1])))
    # the sampler the Trainer is given is the one checked (here one without an ODE step)
    with pytest.raises(ValueError, match=r"config: sampler.sde_window: DDIM \('ddim'\) has no ODE step"):
        Trainer(cfg, build_model(cfg), make_sampler("ddim", num_steps=K), build_rewards(cfg), build_dataset(cfg),
                log=lambda *a: None)


@pytest.mark.parametrize("guidance,want", [(1.0, K), (0.0, K), (2.5, 2 * K)])
def test_rollout_nfe_counts_the_network_rows(tmp_path, guidance, want):
    """rollout_nfe = network evaluations per sample of the rollout: K here (the chain ends at t = 0, no
    finish call), twice that under classifier-free guidance (both branches in one forward of 2B rows)."""
    from tests.trainer_helpers import make_trainer

    cfg = window_config(tmp_path, "ddrl", steps=1, sde_window=[1, 2])
    cfg = replace(cfg, rollout=replace(cfg.rollout, guidance_scale=guidance, recompute_old_logprobs=False))
    tr = make_trainer(cfg)
    rows = []
    hook = tr.policy.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    batch = tr.collect()
    hook.remove()
    assert batch.metrics["rollout_nfe"] == want == sum(rows) / tr.rollout_batch
    assert batch.metrics["sde_window_first"] == 1 and batch.trained_steps == [1, 2]


def test_no_window_keeps_the_defaults(tmp_path):
    from tests.trainer_helpers import make_trainer, tiny_config

    cfg = tiny_config(tmp_path, "ddrl", steps=1)
    tr = make_trainer(cfg)
    assert tr.trained_steps == cfg.algorithm.trained_steps(cfg.sampler.num_steps)
    m = tr.train_step()
    assert "sde_window_first" not in m and m["rollout_nfe"] == cfg.sampler.num_steps
    assert "sde_window_gen" not in tr.state_dict()["trainer"]
