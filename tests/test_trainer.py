"""The trainer: on-policy exactness, gradient sign, several PPO epochs, reward validation,
checkpoint resume equivalence, SIGTERM, and a short end-to-end run in which reward rises."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ddrl_engine.trainer.checkpoint import latest_checkpoint
from ddrl_engine.sampling import transition
from tests.trainer_helpers import make_trainer, tiny_config, with_run


def _train_lines(path):
    lines = [json.loads(ln) for ln in open(path)]
    return [{k: v for k, v in ln.items() if not k.startswith("time_")} for ln in lines]


@pytest.mark.parametrize("method", ["ddrl", "grpo", "grpo_kl", "sft"])
def test_each_method_trains_and_is_exactly_on_policy(tmp_path, method):
    tr = make_trainer(tiny_config(tmp_path, method))
    m = tr.train_step()
    assert all(math.isfinite(v) for v in m.values() if isinstance(v, float))
    if method != "sft":
        assert m["ratio_dev_first"] == 0.0  # bitwise-equal recomputation on CPU
    if method == "ddrl":
        assert m["data_loss"] > 0
    if method == "grpo_kl":
        # KL to the reference is 0 before the first update and positive after it.
        m2 = tr.train_step()
        assert m["kl"] == 0.0 and m2["kl"] > 0
    if method == "sft":
        assert "reward" not in m and m["data_loss"] > 0


def test_several_ppo_epochs_move_the_ratio(tmp_path):
    tr = make_trainer(tiny_config(tmp_path, "grpo", ppo_epochs=3))
    m = tr.train_step()
    assert m["ratio_dev_first"] == 0.0
    assert m["ratio_dev"] > 0  # averaged over epochs: later epochs see rho != 1


def test_gradient_sign_raises_likelihood_of_high_advantage_samples(tmp_path):
    tr = make_trainer(tiny_config(tmp_path, "grpo", train_steps="all"))
    batch = tr.collect()
    ro, adv = batch.rollout, tr.await_rewards(batch).advantages

    def logprobs():
        with torch.no_grad():
            return torch.stack([transition(tr.policy, tr.sampler, ro.states[:, k], k, ro.cond,
                                           x_next=ro.states[:, k + 1]).log_prob for k in range(ro.num_steps)], 1)

    before = logprobs()
    assert torch.equal(before, ro.log_probs)
    tr.update(batch)
    delta = (logprobs() - before).sum(1)
    best, worst = adv.argmax(), adv.argmin()
    assert delta[best] > delta[worst]
    assert torch.corrcoef(torch.stack([adv, delta]))[0, 1] > 0.3


@pytest.mark.parametrize("on_invalid", ["error", "drop"])
def test_invalid_rewards_error_or_drop(tmp_path, on_invalid):
    tr = make_trainer(with_run(tiny_config(tmp_path, "grpo"), on_invalid_reward=on_invalid))
    real = tr.rewards.rewards[0]

    class Flaky:
        name = real.name

        def __call__(self, samples, cond):
            r = real(samples, cond)
            r[0] = float("nan")
            return r

    tr.rewards.rewards[0] = Flaky()
    if on_invalid == "error":
        with pytest.raises(ValueError, match="brightness"):
            tr.train_step()
        return
    with pytest.warns(RuntimeWarning, match="dropping"):
        m = tr.train_step()
    assert m["invalid_rewards"] == 1 and tr.invalid_rewards == 1 and math.isfinite(m["policy_loss"])


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = make_trainer(tiny_config(tmp_path / "full", "ddrl", steps=4), evaluator=True)
    full.train()
    half = make_trainer(tiny_config(tmp_path / "resumed", "ddrl", steps=4), evaluator=True)
    half.train(steps=2)
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step_0000002"
    # Something logged after the checkpoint (a crash mid-step) must not survive the resume.
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "step": 3, "reward": 123.0}) + "\n")
    resumed = make_trainer(tiny_config(tmp_path / "resumed", "ddrl", steps=4), evaluator=True)
    assert resumed.resume()
    resumed.train()
    assert _train_lines(tmp_path / "full" / "metrics.jsonl") == _train_lines(tmp_path / "resumed" / "metrics.jsonl")
    for a, b in zip(full.policy.state_dict().values(), resumed.policy.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    tr = make_trainer(tiny_config(tmp_path, "grpo"))
    tr.train_step()
    first = tr.save()
    import ddrl_engine.trainer.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", boom)
    tr.train_step()
    with pytest.raises(OSError):
        tr.save()
    assert latest_checkpoint(tmp_path / "checkpoints") == first  # the previous one is intact
    fresh = make_trainer(tiny_config(tmp_path, "grpo"))
    assert fresh.resume() and fresh.step == 1


def test_end_to_end_reward_increases(tmp_path):
    cfg = tiny_config(tmp_path, "grpo", steps=30)
    cfg = with_run(cfg, eval_every=30)
    tr = make_trainer(cfg, evaluator=True)
    start = time.process_time()  # this process's CPU time: a budget that other jobs' load does not eat
    evals = tr.train()
    assert time.process_time() - start < 120
    assert evals[-1]["reward"] > evals[0]["reward"] + 0.02
    assert (tmp_path / "metrics.jsonl").exists() and latest_checkpoint(tmp_path / "checkpoints") is not None


SIGTERM_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from tests.trainer_helpers import make_trainer, tiny_config
tr = make_trainer(tiny_config({out!r}, "grpo", steps=10_000))
tr.cfg.run.ckpt_every = 0
print("ready", flush=True)
tr.train()
"""


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = SIGTERM_SCRIPT.format(root=root, out=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "ready"
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 60
    while (not metrics.exists() or metrics.stat().st_size == 0) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    ck = latest_checkpoint(tmp_path / "checkpoints")
    assert ck is not None and int(ck.name.split("_")[1]) >= 1


def test_synthetic_regularisation_data_from_the_base_model(tmp_path):
    from dataclasses import replace

    from ddrl_engine.trainer.builders import build_dataset, build_sampler, build_training_data

    cfg = tiny_config(tmp_path, "ddrl")
    cfg = replace(cfg, data=replace(cfg.data, synthetic=True, synthetic_count=24))
    real = build_dataset(cfg)
    tr = make_trainer(cfg)
    synth = build_training_data(cfg, tr.policy, build_sampler(cfg), real)
    assert synth.train_x.shape == (24, 1, 8, 8) and synth.train_y.shape == (24,)
    assert torch.equal(synth.heldout_x, real.heldout_x)  # evaluation stays on real data
    from ddrl_engine.trainer.loop import Trainer

    tr2 = Trainer(cfg, tr.policy, tr.sampler, tr.rewards, synth, None, log=lambda *a: None)
    m = tr2.train_step()
    assert m["data_loss"] > 0 and math.isfinite(m["data_loss"])


def test_fp8_rollouts_report_the_logprob_mismatch(tmp_path):
    from dataclasses import replace

    cfg = tiny_config(tmp_path, "grpo")
    # head dim 32 is not an fp8 size; 64 is.
    cfg = replace(cfg, model=replace(cfg.model, hidden=64, heads=1))
    import copy

    from ddrl_engine.trainer.builders import build_model

    policy = build_model(cfg)
    with torch.no_grad():  # a fresh DiT outputs zeros (adaLN-Zero): give attention a say
        for p in policy.parameters():
            p.normal_(std=0.05)
    exact = make_trainer(cfg, policy=copy.deepcopy(policy)).train_step()
    assert exact["logprob_mismatch"] == 0.0 and exact["ratio_dev_first"] == 0.0
    cfg8 = replace(cfg, rollout=replace(cfg.rollout, attention_backend="fp8"))
    m = make_trainer(cfg8, policy=copy.deepcopy(policy)).train_step()
    assert 0 < m["logprob_mismatch"] < 0.5 and m["ratio_dev_first"] > 0
    fixed_cfg = replace(cfg8, rollout=replace(cfg8.rollout, recompute_old_logprobs=True))
    fixed = make_trainer(fixed_cfg, policy=copy.deepcopy(policy)).train_step()
    assert fixed["logprob_mismatch"] > 0 and fixed["ratio_dev_first"] == 0.0  # exact ratios again


@pytest.mark.parametrize("method", ["ddrl", "grpo_kl"])
def test_micro_batches_give_the_same_update(tmp_path, method):
    """optim.micro_batch = 3 (8 rows: 3 + 3 + 2) accumulates the same gradient as one batch."""
    from dataclasses import replace

    def run(micro):
        cfg = tiny_config(tmp_path / f"m{micro}", method, steps=2)
        tr = make_trainer(replace(cfg, optim=replace(cfg.optim, micro_batch=micro)))
        metrics = [tr.train_step() for _ in range(2)]
        return metrics, torch.cat([p.detach().flatten() for p in tr.policy.parameters()])

    (want, w_params), (got, g_params) = run(0), run(3)
    for g, w in zip(got, want):
        for k in ("policy_loss", "data_loss", "kl", "clip_frac", "grad_norm", "ratio_dev", "logprob_mismatch"):
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-6), k
    torch.testing.assert_close(g_params, w_params, rtol=1e-5, atol=1e-6)


def test_data_loss_at_one_step_per_update(tmp_path, monkeypatch):
    """algorithm.data_loss_steps = "one": one data-loss forward/backward per update, at a trained step
    drawn from the data generator, weighted as the mean over trained steps (the same term as "all"
    in expectation); the logged data_loss is that one evaluation."""
    from ddrl_engine.algorithms import losses

    cfg = tiny_config(tmp_path, "ddrl", steps=2, data_loss_steps="one")
    tr = make_trainer(cfg)
    calls, levels = [], []
    step_of_level = {tr.sampler.network_level(k).item(): k for k in range(tr.sampler.num_steps)}

    def spy(policy, x0, y, eps, level):
        levels.append(step_of_level[level.network_level.item()])
        out = losses.policy_data_loss(policy, x0, y, eps, level)
        calls.append(out.item())
        return out

    monkeypatch.setattr("ddrl_engine.trainer.loop.policy_data_loss", spy)
    combined = []
    real_combine = losses.combine
    monkeypatch.setattr("ddrl_engine.trainer.loop.combine",
                        lambda p, d, k, **kw: combined.append((d is not None, kw["num_trained_steps"])) or real_combine(p, d, k, **kw))
    m = tr.train_step()
    assert len(calls) == 1 and levels[0] in tr.trained_steps
    assert m["data_loss"] == pytest.approx(calls[0])
    # The data term's weight: beta_data * L_data (a mean over 1 step), the policy terms / |trained|.
    assert [n for is_data, n in combined if is_data] == [1]
    assert {n for is_data, n in combined if not is_data} == {len(tr.trained_steps)}
    # Over updates the drawn step varies (uniform over the trained steps).
    for _ in range(7):
        tr.train_step()
    assert len(set(levels)) > 1


def test_synthetic_data_is_the_base_models_samples_unclamped(tmp_path):
    """data.synthetic = true regularises towards the base model's own samples, in its state space: a
    latent model's latents (std and range well beyond [-1, 1]) must not be clamped."""
    from dataclasses import replace

    from ddrl_engine.sampling import rollout
    from ddrl_engine.trainer.builders import build_dataset, build_sampler, synthetic_dataset

    class Wide(torch.nn.Module):  # a velocity field whose samples spread far beyond [-1, 1]
        sample_shape, num_classes = (1, 8, 8), 10

        def forward(self, x, t, cond):
            return -3.0 * x

    cfg = tiny_config(tmp_path, "ddrl")
    cfg = replace(cfg, data=replace(cfg.data, synthetic=True, synthetic_count=64))
    sampler = build_sampler(cfg)
    data = synthetic_dataset(cfg, Wide(), sampler, build_dataset(cfg))
    assert data.train_x.shape == (64, 1, 8, 8) and data.train_x.abs().max() > 2 and data.train_x.std() > 1.5
    labels = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(cfg.run.seed + 7))
    want = rollout(Wide(), sampler, labels, generator=torch.Generator().manual_seed(cfg.run.seed + 7),
                   sample_shape=(1, 8, 8)).samples
    assert torch.equal(data.train_x, want) and torch.equal(data.train_y, labels)


def test_evaluator_in_chunks_gives_the_same_metrics(tmp_path):
    """Evaluator.batch_size (real models: a rollout batch at a time) changes memory, not the result."""
    from dataclasses import replace

    from ddrl_engine.trainer.builders import build_dataset, build_evaluator, build_rewards

    cfg = tiny_config(tmp_path, "ddrl")
    tr = make_trainer(cfg)
    ev = build_evaluator(cfg, build_dataset(cfg), build_rewards(cfg))
    whole, s_whole = ev(tr.policy, tr.sampler, tr.sample_shape, "cpu")
    parts, s_parts = replace(ev, batch_size=6)(tr.policy, tr.sampler, tr.sample_shape, "cpu")
    assert s_parts.shape == s_whole.shape
    torch.testing.assert_close(s_parts, s_whole, rtol=1e-5, atol=1e-5)
    for k, v in whole.items():
        assert parts[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
