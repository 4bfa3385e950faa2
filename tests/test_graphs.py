"""The rollout runner (eager and CUDA-graph modes share `run_chain`): on CPU the eager mode and the
buffer plan, and that a graph request fails clearly; on a GPU (marked) replay == eager for the same
generator state, weights updated in place are seen without recapture, fresh noise per replay."""
from dataclasses import replace

import pytest
import torch

from ddrl_engine.models.dit import DiT, DiTConfig
from ddrl_engine.sampling import RolloutRunner, graph_unavailable_reason, make_sampler, rollout
from ddrl_engine.trainer.config import config_from_dict
from tests.test_sampling import CASES, NUM_CLASSES, SAMPLE_SHAPE, TinyPolicy, make_case
from tests.trainer_helpers import make_trainer, tiny_config

BATCH = 6


def conditions(device="cpu", batch=BATCH):
    return torch.arange(batch, device=device) % NUM_CLASSES


def assert_same_rollout(a, b):
    for name in ("states", "log_probs", "samples", "initial_noise", "levels", "cond"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.reduction == b.reduction


# ---- CPU: eager mode, the buffer plan, errors ---------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", CASES)
def test_eager_runner_equals_rollout_bitwise(case, reduction):
    sampler, policy = make_case(case), TinyPolicy()
    runner = RolloutRunner(policy, sampler, sample_shape=SAMPLE_SHAPE, reduction=reduction)
    g_ref, g_run = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(2):  # the second call reuses the buffers and continues the generator the same way
        ref = rollout(policy, sampler, conditions(), generator=g_ref, sample_shape=SAMPLE_SHAPE, reduction=reduction)
        assert_same_rollout(runner(conditions(), generator=g_run), ref)
    assert torch.equal(g_ref.get_state(), g_run.get_state())
    assert runner.captures == 0


def test_eager_rollouts_are_owned_by_the_caller_by_default():
    sampler, policy = make_case("edm"), TinyPolicy()
    runner = RolloutRunner(policy, sampler, sample_shape=SAMPLE_SHAPE)
    gen = torch.Generator().manual_seed(0)
    cond = conditions()
    a = runner(cond, generator=gen)
    first = (a.states.clone(), a.log_probs.clone(), a.samples.clone())
    b = runner(conditions(), generator=gen)
    cond.fill_(0)
    assert not torch.equal(first[0], b.states)  # fresh noise ...
    for kept, now in zip(first, (a.states, a.log_probs, a.samples)):  # ... and a is untouched by b
        assert torch.equal(kept, now)
    assert not torch.equal(a.cond, cond) and runner.keys == []


def test_buffer_plan_is_reused_per_key_and_outputs_alias_it():
    sampler, policy = make_case("edm"), TinyPolicy()  # edm: initial_scale != 1, a separate noise buffer
    runner = RolloutRunner(policy, sampler, sample_shape=SAMPLE_SHAPE, reuse_buffers=True)
    gen = torch.Generator().manual_seed(0)
    a = runner(conditions(), generator=gen)
    first = a.states.clone()
    ptrs = (a.states.data_ptr(), a.log_probs.data_ptr(), a.samples.data_ptr(), a.cond.data_ptr())
    b = runner(conditions(), generator=gen)
    assert (b.states.data_ptr(), b.log_probs.data_ptr(), b.samples.data_ptr(), b.cond.data_ptr()) == ptrs
    assert torch.equal(a.states, b.states) and not torch.equal(first, b.states)  # a is overwritten by b
    assert len(runner.keys) == 1
    c = runner(conditions(batch=BATCH + 2), generator=gen)  # another batch size: another plan
    assert c.states.shape[0] == BATCH + 2 and c.states.data_ptr() != ptrs[0] and len(runner.keys) == 2
    # The static condition input is a copy: changing the caller's tensor later changes nothing.
    cond = conditions()
    d = runner(cond, generator=gen)
    cond.fill_(0)
    assert not torch.equal(d.cond, cond)
    runner.clear()
    assert runner.keys == []


def test_eager_runner_on_a_dit_bf16_states():
    cfg = DiTConfig(hidden=32, depth=1, heads=2)
    policy, sampler = DiT(cfg), make_sampler("rectified_flow_sde", num_steps=3)
    for p in policy.parameters():
        torch.nn.init.normal_(p, std=0.05)
    runner = RolloutRunner(policy, sampler, sample_shape=cfg.sample_shape, dtype=torch.bfloat16)
    ref = rollout(policy, sampler, conditions(batch=4), generator=torch.Generator().manual_seed(1),
                  sample_shape=cfg.sample_shape, dtype=torch.bfloat16)
    assert_same_rollout(runner(conditions(batch=4), generator=torch.Generator().manual_seed(1)), ref)


def test_train_eval_mode_is_part_of_the_plan_key():
    """A graph replays the kernels it captured: a policy switched between train() and eval() (dropout,
    norms) must not replay the other mode's plan."""
    sampler, policy = make_case("rf"), TinyPolicy()
    runner = RolloutRunner(policy, sampler, sample_shape=SAMPLE_SHAPE, reuse_buffers=True)
    gen = torch.Generator().manual_seed(0)
    policy.eval()
    runner(conditions(), generator=gen)
    policy.train()
    runner(conditions(), generator=gen)
    assert len(runner.keys) == 2


def test_graph_request_on_cpu_fails_with_the_reason():
    sampler, policy = make_case("rf"), TinyPolicy()
    assert "cpu" in graph_unavailable_reason("cpu")
    with pytest.raises(RuntimeError, match="cuda_graph = true cannot be honoured.*'cpu'"):
        RolloutRunner(policy, sampler, sample_shape=SAMPLE_SHAPE, cuda_graph=True)
    with pytest.raises(ValueError, match="'rollout.cuda_graph' = true needs a CUDA device"):
        config_from_dict({"rollout": {"cuda_graph": True}})
    with pytest.raises(ValueError, match="'rollout.cuda_graph' must be true or false"):
        config_from_dict({"rollout": {"cuda_graph": 1}})


def test_trainer_graph_request_on_cpu_fails(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg = replace(cfg, rollout=replace(cfg.rollout, cuda_graph=True))
    with pytest.raises(ValueError, match="rollout.cuda_graph"):
        make_trainer(cfg)


def test_bad_runner_arguments():
    sampler, policy = make_case("rf"), TinyPolicy()
    with pytest.raises(ValueError, match="reduction"):
        RolloutRunner(policy, sampler, sample_shape=SAMPLE_SHAPE, reduction="max")
    with pytest.raises(TypeError, match="cuda_graph"):
        RolloutRunner(policy, sampler, sample_shape=SAMPLE_SHAPE, cuda_graph="yes")
    runner = RolloutRunner(policy, sampler, sample_shape=SAMPLE_SHAPE)
    with pytest.raises(ValueError, match="1-D tensor"):
        runner(torch.zeros(2, 2, dtype=torch.long), generator=None)


# ---- GPU: graph replay ----------------------------------------------------------------------------

def _dit(device):
    cfg = DiTConfig(hidden=64, depth=2, heads=4)
    policy = DiT(cfg)
    torch.manual_seed(0)
    for p in policy.parameters():  # a fresh DiT outputs exactly 0: give every branch weight
        torch.nn.init.normal_(p, std=0.05)
    return cfg, policy.to(device).eval()


def _graphed(num_steps: int, batch: int):
    """A CUDA DiT, a sampler of num_steps, conditions of `batch` rows and a graph-mode runner."""
    dev = torch.device("cuda")
    cfg, policy = _dit(dev)
    sampler = make_sampler("rectified_flow_sde", num_steps=num_steps)
    cond = conditions(dev, batch=batch) % cfg.num_classes
    runner = RolloutRunner(policy, sampler, sample_shape=cfg.sample_shape, cuda_graph=True)
    return dev, cfg, policy, sampler, cond, runner


# Graph and eager launch the same kernels with the same Philox seed/offset, so results agree to the
# last bit on one stream; the tolerance only guards against a library picking another algorithm
# for the same shapes inside the capture.
GRAPH_TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sampler_name", ["rectified_flow_sde", "ddim", "edm_churn"])
def test_graph_replay_equals_eager_for_the_same_seed(sampler_name):
    dev = torch.device("cuda")
    cfg, policy = _dit(dev)
    sampler = make_sampler(sampler_name, num_steps=4)
    cond = conditions(dev, batch=8) % cfg.num_classes
    graphed = RolloutRunner(policy, sampler, sample_shape=cfg.sample_shape, cuda_graph=True)
    eager = RolloutRunner(policy, sampler, sample_shape=cfg.sample_shape)
    g_graph, g_eager = torch.Generator(dev).manual_seed(11), torch.Generator(dev).manual_seed(11)
    for _ in range(3):  # capture + replay, then plain replays
        a, b = graphed(cond, generator=g_graph), eager(cond, generator=g_eager)
        torch.cuda.synchronize()
        assert torch.equal(a.states[:, 0], b.states[:, 0])  # the initial noise: same Philox draws
        torch.testing.assert_close(a.states, b.states, **GRAPH_TOL)
        torch.testing.assert_close(a.log_probs, b.log_probs, **GRAPH_TOL)
        torch.testing.assert_close(a.samples, b.samples, **GRAPH_TOL)
        # The generator advances by the whole graph's draws, exactly as the eager loop advances it.
        assert g_graph.get_offset() == g_eager.get_offset()
    assert graphed.captures == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_replay_sees_in_place_weight_updates_without_recapture():
    dev, cfg, policy, sampler, cond, runner = _graphed(4, 8)
    gen = torch.Generator(dev)
    before = runner(cond, generator=gen.manual_seed(5)).states.clone()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2, fused=True)
    policy(torch.randn(8, *cfg.sample_shape, device=dev), torch.rand(8, device=dev), cond).square().mean().backward()
    opt.step()  # in place, as in training
    after = runner(cond, generator=gen.manual_seed(5)).states.clone()
    expected = rollout(policy, sampler, cond, generator=torch.Generator(dev).manual_seed(5),
                       sample_shape=cfg.sample_shape)
    torch.testing.assert_close(after, expected.states, **GRAPH_TOL)
    assert not torch.allclose(after[:, 1:], before[:, 1:])
    assert runner.captures == 1
    # A parameter replaced by new storage would leave the graph reading freed memory: recapture.
    with torch.no_grad():
        policy.final.linear.weight = torch.nn.Parameter(policy.final.linear.weight.clone())
    runner(cond, generator=gen.manual_seed(5))
    assert runner.captures == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_replays_draw_fresh_noise():
    dev, cfg, policy, sampler, cond, runner = _graphed(3, 4)
    gen = torch.Generator(dev).manual_seed(0)
    a = runner(cond, generator=gen).states.clone()
    b = runner(cond, generator=gen).states.clone()
    assert not torch.equal(a[:, 0], b[:, 0]) and not torch.equal(a[:, -1], b[:, -1])
    with pytest.raises(RuntimeError, match="explicit CUDA torch.Generator"):
        runner(cond, generator=None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_policy_with_a_host_sync_fails_to_capture_clearly():
    dev = torch.device("cuda")
    cfg, policy = _dit(dev)

    class Syncing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = policy

        def forward(self, x, t, cond):
            if x.abs().max().item() > 1e9:  # a host sync: not capturable
                raise AssertionError
            return self.inner(x, t, cond)

    runner = RolloutRunner(Syncing(), make_sampler("rectified_flow_sde", num_steps=2), sample_shape=cfg.sample_shape,
                           cuda_graph=True)
    gen = torch.Generator(dev).manual_seed(0)
    caller_stream = torch.cuda.current_stream(dev)
    with pytest.raises(RuntimeError, match="capturing the rollout into a CUDA graph failed"):
        runner(conditions(dev, batch=2), generator=gen)
    # The failed capture leaves nothing behind: the caller's stream is current again, the generator
    # and the device's default generator draw eagerly, and a good policy still captures and replays.
    assert torch.cuda.current_stream(dev) == caller_stream
    torch.randn(4, device=dev, generator=gen)
    torch.randn(4, device=dev)
    good = RolloutRunner(policy, make_sampler("rectified_flow_sde", num_steps=2), sample_shape=cfg.sample_shape,
                         cuda_graph=True)
    good(conditions(dev, batch=2), generator=gen)
    torch.cuda.synchronize()
    assert good.captures == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_under_autocast_sees_weight_updates():
    """Under an enclosing autocast the capture must cast the weights inside the graph (no autocast
    weight cache): a replay after an in-place optimiser step uses the new weights."""
    dev, cfg, policy, sampler, cond, runner = _graphed(3, 4)
    gen = torch.Generator(dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        runner(cond, generator=gen.manual_seed(3))
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = runner(cond, generator=gen.manual_seed(3)).states.clone()
        want = rollout(policy, sampler, cond, generator=torch.Generator(dev).manual_seed(3),
                       sample_shape=cfg.sample_shape).states
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    assert runner.captures == 1
    runner(cond, generator=gen)  # outside autocast: another plan, not the bf16 graph
    assert runner.captures == 2 and len(runner.keys) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trainer_with_graphs_matches_eager_trainer(tmp_path):
    cfg = replace(tiny_config(tmp_path / "g", "ddrl"), run=replace(tiny_config(tmp_path).run, device="cuda",
                                                                     out_dir=str(tmp_path / "g")))
    graphed = make_trainer(replace(cfg, rollout=replace(cfg.rollout, cuda_graph=True)))
    eager = make_trainer(cfg)
    for _ in range(2):
        mg, me = graphed.train_step(), eager.train_step()
        assert mg["reward"] == pytest.approx(me["reward"], rel=1e-4, abs=1e-5)
        assert mg["data_loss"] == pytest.approx(me["data_loss"], rel=1e-4, abs=1e-6)
    assert graphed.runner.captures == 1
