"""Classifier-free guidance in rollouts (`sampling.Guided`, `[rollout] guidance_scale`): the guided output
against a float64 hand computation from two separate forwards, scale 1 as the plain policy (bitwise, one
call), the guided transition's log-prob against a float64 Gaussian density, exact on-policy ratios in the
Trainer under guidance, the data loss and the held-out loss unguided, config errors, and a tiny SD3 run."""
import json
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from ddrl_engine.sampling import Guided, RolloutRunner, make_sampler, recompute_log_probs, rollout, transition
from ddrl_engine.trainer.builders import build_model, build_rewards
from ddrl_engine.trainer.config import config_from_dict
from ddrl_engine.trainer.evaluate import Evaluator
from tests.trainer_helpers import make_trainer, tiny_config

CHANNELS, SAMPLE_SHAPE, NUM_CLASSES = 3, (3, 5, 4), 5


class TinyPolicy(nn.Module):
    """A fixed random per-pixel channel mix plus t- and class-dependent offsets (class NUM_CLASSES is the
    null class). Computes in fp32 (float64 for float64 inputs), returns x's dtype; batch-invariant."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.sample_shape, self.num_classes = SAMPLE_SHAPE, NUM_CLASSES
        self.mix = nn.Parameter(0.5 * torch.eye(CHANNELS) + 0.2 * torch.randn(CHANNELS, CHANNELS, generator=g))
        self.t_dir = nn.Parameter(0.3 * torch.randn(CHANNELS, generator=g))
        self.cond_emb = nn.Parameter(0.3 * torch.randn(NUM_CLASSES + 1, CHANNELS, generator=g))
        self.calls = []

    @property
    def null_class(self):
        return self.num_classes

    def forward(self, x, t, cond):
        self.calls.append((x, t, cond))
        dt = torch.promote_types(x.dtype, torch.float32)
        xf, spatial = x.to(dt), [1] * (x.dim() - 2)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        mixed = (self.mix.to(dt).view(1, CHANNELS, CHANNELS, *spatial) * xf.unsqueeze(1)).sum(2)
        offset = torch.sin(3 * t.to(dt))[:, None] * self.t_dir.to(dt) + self.cond_emb.to(dt)[cond]
        return (mixed + offset.view(x.shape[0], CHANNELS, *spatial)).to(x.dtype)


def _inputs(batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *SAMPLE_SHAPE, generator=g)
    t = torch.rand(batch, generator=g)
    cond = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    return x, t, cond


def _guided64(policy, x, t, cond, scale):
    """uncond + s (cond - uncond) in float64, from two separate forwards."""
    with torch.no_grad():
        c = policy(x.double(), t.double(), cond)
        u = policy(x.double(), t.double(), torch.full_like(cond, policy.null_class))
    return u + scale * (c - u)


# ---- the wrapper ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [4.5, 2.0, 0.5])
def test_guided_output_matches_float64_hand_computation(scale):
    policy = TinyPolicy()
    x, t, cond = _inputs()
    with torch.no_grad():
        out = Guided(policy, scale)(x, t, cond)
    assert out.dtype == x.dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), _guided64(policy, x, t, cond, scale), atol=1e-5, rtol=1e-5)


def test_guided_runs_both_branches_in_one_batched_forward():
    policy = TinyPolicy()
    x, t, cond = _inputs()
    policy.calls.clear()
    Guided(policy, 3.0)(x, t, cond)
    (cx, ct, cc), = policy.calls
    assert torch.equal(cx, torch.cat([x, x])) and torch.equal(ct, torch.cat([t, t]))
    assert torch.equal(cc, torch.cat([cond, torch.full_like(cond, NUM_CLASSES)]))
    # a 0-dim level is broadcast to both halves
    policy.calls.clear()
    out = Guided(policy, 3.0)(x, torch.tensor(0.4), cond)
    assert policy.calls[0][1].shape == (2 * x.shape[0],)
    torch.testing.assert_close(out.double(), _guided64(policy, x, torch.full((4,), 0.4), cond, 3.0), atol=1e-5, rtol=1e-5)


def test_scale_one_is_the_plain_policy_bitwise():
    policy = TinyPolicy()
    x, t, cond = _inputs()
    with torch.no_grad():
        plain = policy(x, t, cond)
        policy.calls.clear()
        out = Guided(policy, 1.0)(x, t, cond)
    (cx, ct, cc), = policy.calls  # one forward, on the original batch
    assert cx is x and ct is t and cc is cond
    assert torch.equal(out, plain)


def test_scale_zero_is_the_unconditional_model():
    policy = TinyPolicy()
    x, t, cond = _inputs()
    with torch.no_grad():
        uncond = policy(x, t, torch.full_like(cond, NUM_CLASSES))
        policy.calls.clear()
        out = Guided(policy, 0.0)(x, t, cond)
    assert len(policy.calls) == 1 and torch.equal(out, uncond)


def test_guided_exposes_the_inner_policy():
    policy = TinyPolicy()
    g = Guided(policy, 2.0)
    assert g.inner is policy and g.sample_shape == SAMPLE_SHAPE and g.num_classes == NUM_CLASSES
    assert g.null_class == NUM_CLASSES and Guided(policy, 2.0, null_cond=0).null_class == 0
    assert list(g.parameters()) == list(policy.parameters()) and list(g.modules()) == list(policy.modules())
    g.eval()
    assert not policy.training and not g.training
    g.train()
    assert policy.training and g.training


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf"), True, "2"])
def test_bad_scale_is_an_error(bad):
    with pytest.raises((ValueError, TypeError), match="scale"):
        Guided(TinyPolicy(), bad)


def test_guidance_needs_a_null_condition():
    def bare(x, t, cond):
        return x

    assert Guided(bare, 1.0)(torch.ones(1, 1), torch.ones(1), torch.zeros(1, dtype=torch.long)).sum() == 1
    with pytest.raises(ValueError, match="null"):
        Guided(bare, 2.0)
    Guided(bare, 2.0, null_cond=7)  # given explicitly: fine


# ---- the guided transition -----------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_guided_transition_logprob_is_the_float64_density_of_the_guided_step(reduction):
    policy, scale = TinyPolicy(), 4.5
    sampler = make_sampler("rectified_flow_sde", num_steps=5, noise_level=0.7, shift=3.0)
    x, _, cond = _inputs()
    gen = torch.Generator().manual_seed(5)
    for k in range(sampler.num_steps):
        with torch.no_grad():
            res = transition(Guided(policy, scale), sampler, x, k, cond, generator=gen, reduction=reduction)
        c = sampler.coefs(k)
        level = sampler.network_level(k).double().expand(x.shape[0])
        f = _guided64(policy, x, level, cond, scale)
        mean = c.x_coef.double() * x.double() + c.out_coef.double() * f
        std = c.std.double()
        lp = (-(res.x_next.double() - mean) ** 2 / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi))
        lp = lp.flatten(1).mean(1) if reduction == "mean" else lp.flatten(1).sum(1)
        tol = dict(atol=1e-3, rtol=1e-4) if reduction == "mean" else dict(atol=1e-1, rtol=1e-4)
        torch.testing.assert_close(res.log_prob.double(), lp, **tol)
        torch.testing.assert_close(res.mean.double(), mean, atol=1e-5, rtol=1e-5)
        x = res.x_next


def test_guided_rollout_recomputes_bitwise_and_the_runner_matches():
    policy, sampler = TinyPolicy(), make_sampler("rectified_flow_sde", num_steps=4, noise_level=0.7, shift=3.0)
    g = Guided(policy, 4.5)
    cond = torch.tensor([0, 1, 2, 3])
    ro = rollout(g, sampler, cond, generator=torch.Generator().manual_seed(0), sample_shape=SAMPLE_SHAPE)
    assert torch.equal(recompute_log_probs(g, sampler, ro), ro.log_probs)  # ratio exactly 1
    plain = rollout(policy, sampler, cond, generator=torch.Generator().manual_seed(0), sample_shape=SAMPLE_SHAPE)
    assert not torch.equal(plain.samples, ro.samples)  # the guidance acts
    runner = RolloutRunner(g, sampler, sample_shape=SAMPLE_SHAPE, reuse_buffers=True)
    again = runner(cond, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.states, ro.states) and torch.equal(again.log_probs, ro.log_probs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_guided_rollout_in_a_cuda_graph_matches_eager():
    policy = TinyPolicy().cuda()
    sampler = make_sampler("rectified_flow_sde", num_steps=4, noise_level=0.7, shift=3.0)
    g = Guided(policy, 4.5)
    cond = torch.tensor([0, 1, 2, 3], device="cuda")
    eager = RolloutRunner(g, sampler, sample_shape=SAMPLE_SHAPE)(cond, generator=torch.Generator("cuda").manual_seed(0))
    runner = RolloutRunner(g, sampler, sample_shape=SAMPLE_SHAPE, cuda_graph=True)
    for _ in range(2):  # the capture, then a replay
        graphed = runner(cond, generator=torch.Generator("cuda").manual_seed(0))
        assert torch.equal(graphed.states, eager.states) and torch.equal(graphed.log_probs, eager.log_probs)
    assert runner.captures == 1


# ---- the Trainer ---------------------------------------------------------------------------------

def _guided_config(tmp_path, scale, method="ddrl", **rollout):
    cfg = tiny_config(tmp_path, method)
    return replace(cfg, rollout=replace(cfg.rollout, guidance_scale=scale, **rollout))


def _dit(cfg):
    """The tiny DiT with every weight perturbed: a fresh DiT's zero-initialised output layer would make
    the conditional and the unconditional outputs equal (guidance a no-op)."""
    torch.manual_seed(0)
    policy = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return policy


@pytest.mark.parametrize("method,recompute", [("ddrl", False), ("grpo_kl", True)])
def test_trainer_with_guidance_is_exactly_on_policy(tmp_path, method, recompute):
    cfg = _guided_config(tmp_path, 4.5, method, recompute_old_logprobs=recompute)
    tr = make_trainer(cfg, policy=_dit(cfg))
    assert isinstance(tr.runner.policy, Guided) and tr.runner.policy.scale == 4.5
    assert tr.runner.policy.null_cond == tr.policy.null_class == tr.policy.num_classes
    for _ in range(2):
        m = tr.train_step()
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float)), m
        assert m["ratio_dev_first"] == 0.0  # the guided rollout's log-probs recomputed bitwise on CPU
    if method == "grpo_kl":
        assert m["kl"] > 0


def test_trainer_without_guidance_calls_the_plain_policy(tmp_path):
    tr = make_trainer(tiny_config(tmp_path, "grpo_kl"))
    assert tr.cfg.rollout.guidance_scale == 1.0
    assert tr.runner.policy is tr.policy and tr._rollout_policy is tr.policy
    assert tr._rollout_reference is tr.reference


def test_data_loss_and_heldout_loss_are_unguided(tmp_path):
    runs = {}
    for scale in (1.0, 4.5):
        cfg = _guided_config(tmp_path / str(scale), scale)
        tr = make_trainer(cfg, policy=_dit(cfg))
        ds = tr.dataset
        tr.evaluator = Evaluator(rewards=build_rewards(cfg), heldout_x=ds.heldout_x[:16], heldout_y=ds.heldout_y[:16],
                                 num_classes=tr.policy.num_classes, samples_per_class=2, seed=0, heldout_levels=2)
        e = tr.evaluate()
        tr.last_eval_samples = tr.last_eval_samples.clone()
        batch = tr.collect()
        runs[scale] = (e, tr.last_eval_samples, batch.rollout.samples.clone(), tr.update(batch))
    (e1, s1, r1, m1), (e45, s45, r45, m45) = runs[1.0], runs[4.5]
    assert not torch.equal(r1, r45) and not torch.equal(s1, s45)  # rollouts and eval samples are guided
    assert m45["data_loss"] == m1["data_loss"]  # same data, noise and weights: the unguided model
    assert e45["heldout_data_loss"] == e1["heldout_data_loss"]


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_guidance_scale_is_a_config_error(tmp_path, bad):
    with pytest.raises(ValueError, match=r"rollout\.guidance_scale"):
        config_from_dict({"rollout": {"guidance_scale": bad}})
    with pytest.raises(ValueError, match=r"rollout\.guidance_scale"):
        make_trainer(_guided_config(tmp_path, bad))


# ---- a pipeline run (tiny SD3) -------------------------------------------------------------------

def test_sd3_run_with_guidance_trains(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from PIL import Image

    from ddrl_engine.trainer.config import load_config
    from ddrl_engine.trainer.loop import Trainer
    from ddrl_engine.trainer.pipeline_run import build_pipeline_run
    from tests.tiny_pipelines import make_sd3_pipeline

    folder = make_sd3_pipeline(tmp_path / "models")
    (tmp_path / "train.txt").write_text("a red car\na blue bird\n")
    images = tmp_path / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    with open(images / "metadata.jsonl", "w") as f:
        for i in range(4):
            Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()).save(images / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": ["a red car", "a cat"][i % 2]}) + "\n")
    toml = f"""
[run]
out_dir = "{tmp_path / 'run'}"
steps = 1
eval_every = 1
ckpt_every = 0
progress = false
[model]
kind = "sd3"
path = "{folder}"
lora_rank = 4
dtype = "fp32"
resolution = [16, 16]
[sampler]
num_steps = 3
shift = 3.0
[algorithm]
group_size = 2
[rollout]
conditions_per_step = 2
guidance_scale = 2.0
[data]
prompts = "{tmp_path / 'train.txt'}"
dataset = "captioned"
path = "{images}"
[eval]
samples_per_class = 2
heldout_loss_levels = 1
[rewards]
brightness = 1.0
"""
    (tmp_path / "run.toml").write_text(toml)
    cfg = load_config(tmp_path / "run.toml")
    assert cfg.rollout.guidance_scale == 2.0
    run = build_pipeline_run(cfg, log=lambda *a: None, progress=False)
    policy = run.policy
    # the null prompt is the bank's last id: the empty prompt, id num_classes
    assert policy.null_class == policy.num_classes == len(run.texts)
    assert policy._bank.texts[policy.null_class] == ""
    tr = Trainer(cfg, policy, run.sampler, run.rewards, run.dataset, None, conditions=run.conditions,
                 decode=run.decode, log=lambda *a: None)
    assert isinstance(tr.runner.policy, Guided) and tr.runner.policy.null_cond == policy.num_classes
    m = tr.train_step()
    for key in ("reward", "policy_loss", "data_loss", "grad_norm"):
        assert math.isfinite(m[key]), (key, m)
    assert m["ratio_dev_first"] == 0.0


def test_eval_command_samples_with_the_runs_guidance(tmp_path, capsys):
    from ddrl_engine.cli import main
    from tests.trainer_helpers import TINY_TOML

    out = {}
    for scale in (1.0, 3.0):
        toml = tmp_path / f"tiny_{scale}.toml"
        toml.write_text(TINY_TOML.replace("conditions_per_step = 2", f"conditions_per_step = 2\nguidance_scale = {scale}"))
        capsys.readouterr()
        assert main(["eval", "--config", str(toml)]) == 0
        out[scale] = json.loads(capsys.readouterr().out)
    assert out[3.0]["heldout_data_loss"] == out[1.0]["heldout_data_loss"]  # unguided
    assert out[3.0]["reward"] != out[1.0]["reward"]  # guided samples
