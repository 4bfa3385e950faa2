"""The Trainer as a backend: examples/custom_policy_trainer.py (a user's own module, reward, condition
set and data, configured in Python), the Trainer's state_dict round trip, checkpoints of both kinds
loaded through one manager (and by `ddrl-engine eval`), and bad inputs refused before any work."""
import copy
import json
import math
from dataclasses import replace

import pytest
import torch

from ddrl_engine.trainer import CheckpointManager, Trainer, load_weights
from tests.trainer_helpers import TINY_TOML, make_trainer, tiny_config
from tests.example_loader import load_example  # noqa: E402

TIMINGS = ("time_rollout", "time_reward_submit", "time_reward", "time_reward_wait", "time_train")


@pytest.fixture(scope="module")
def ex():
    return load_example("custom_policy_trainer")


def without_timings(lines):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in lines]


def test_custom_policy_example_trains_on_its_own_conditions(ex, tmp_path, monkeypatch):
    seen = []
    call = ex.CenterMass.__call__
    monkeypatch.setattr(ex.CenterMass, "__call__", lambda self, s, c: seen.append(c.clone()) or call(self, s, c))
    out = ex.main(["--out", str(tmp_path / "run"), "--steps", "4"])
    train = out["train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert all(math.isfinite(r[k]) for k in ("reward", "policy_loss", "data_loss", "grad_norm", "lr"))
        assert r["data_loss"] > 0 and r["grad_norm"] > 0
    assert train[0]["ratio_dev_first"] == 0.0  # on-policy: the training forward reproduces the rollout
    conds = torch.cat(seen).unique().tolist()
    assert set(conds) <= {1, 4, 7} and len(conds) > 1  # drawn from the user's condition set only
    assert [r["lr"] for r in train][:2] == pytest.approx([1.5e-4, 3e-4])  # the cosine schedule's warm-up
    assert out["evals"] and "reward" in out["evals"][-1]
    assert (tmp_path / "run" / "checkpoints" / "step_0000004").is_dir()


def test_custom_policy_example_resumes_exactly(ex, tmp_path):
    whole = ex.main(["--out", str(tmp_path / "whole"), "--steps", "6"])["train"]
    # The same 6-step run (same LR schedule), stopped after its step-3 checkpoint, then rerun.
    cfg = ex.config(str(tmp_path / "split"), 6)
    torch.manual_seed(0)
    first = Trainer(cfg, ex.TinyVelocityNet(), cfg.sampler.build(), ex.CenterMass(), ex.make_data(), ex.evaluate,
                    conditions=torch.tensor([1, 4, 7]), decode=lambda x: x, log=lambda *a: None)
    first.train(steps=3)
    split = ex.main(["--out", str(tmp_path / "split"), "--steps", "6"])["train"]  # resumes at step 3
    assert without_timings(split) == without_timings(whole)


def test_trainer_reads_no_model_section(ex, tmp_path):
    """The Trainer takes the sample shape and conditions from the policy: cfg.model may be anything."""
    cfg = replace(ex.config(str(tmp_path), 2), model=None)
    tr = Trainer(cfg, ex.TinyVelocityNet(), cfg.sampler.build(), ex.CenterMass(), ex.make_data(),
                 conditions=torch.tensor([1, 4, 7]), log=lambda *a: None)
    assert tr.sample_shape == ex.SHAPE and math.isfinite(tr.train_step()["reward"])


def test_state_dict_round_trip_continues_identically(tmp_path):
    cfg = tiny_config(tmp_path, "ddrl", steps=4)
    cfg = replace(cfg, optim=replace(cfg.optim, ema_decay=0.9, schedule="cosine", warmup_steps=1))
    a = make_trainer(cfg)
    a.train_step()
    b = make_trainer(cfg)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.step == 1
    ma, mb = a.train_step(), b.train_step()
    assert {k: v for k, v in ma.items() if k not in TIMINGS} == {k: v for k, v in mb.items() if k not in TIMINGS}
    for pa, pb in zip(a.ema.parameters(), b.ema.parameters()):
        assert torch.equal(pa, pb)


class _OneRank:
    """A stand-in Distributed context of one rank: CheckpointManager then writes a DCP checkpoint."""

    rank, world_size, mode = 0, 1, "fsdp"

    def barrier(self):
        pass


def test_both_checkpoint_kinds_load_the_ema_weights(tmp_path):
    cfg = tiny_config(tmp_path, "ddrl", steps=2)
    cfg = replace(cfg, optim=replace(cfg.optim, ema_decay=0.5))
    tr = make_trainer(cfg)
    tr.train_step()
    sd = tr.state_dict()
    one = CheckpointManager(tmp_path / "one").save(1, sd)
    dcp_ckpt = CheckpointManager(tmp_path / "dcp", dist=_OneRank()).save(1, sd)
    for path in (one, dcp_ckpt):
        fresh = make_trainer(cfg).policy
        assert load_weights(path, fresh) == "ema"
        for (name, p), q in zip(fresh.named_parameters(), tr.ema.parameters()):
            assert torch.equal(p, q), (path, name)
        assert load_weights(path, fresh, names=("model",)) == "model"
        assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), tr.policy.parameters()))
    # A whole trainer resumes from the DCP checkpoint in one process too.
    other = make_trainer(cfg)
    assert other.resume(dcp_ckpt) and other.step == 1


def test_checkpoint_of_another_model_is_one_clear_error(tmp_path):
    from ddrl_engine.models import DiT, DiTConfig

    cfg = tiny_config(tmp_path, "ddrl", steps=2)
    tr = make_trainer(cfg)
    tr.train_step()
    one = tr.save()
    dcp_ckpt = CheckpointManager(tmp_path / "dcp", dist=_OneRank()).save(1, tr.state_dict())
    bigger = replace(cfg, model=DiTConfig(hidden=48, depth=1, heads=2))
    for path in (one, dcp_ckpt):
        with pytest.raises(ValueError, match=r"written for another model: its 'model' weights do not fit.*48"):
            make_trainer(bigger).resume(path)
        with pytest.raises(ValueError, match="written for another model"):
            load_weights(path, DiT(DiTConfig(hidden=32, depth=2, heads=2)))


def test_eval_command_uses_the_runs_config_and_ema(tmp_path, capsys):
    from ddrl_engine.cli import main

    toml = tmp_path / "tiny.toml"
    toml.write_text(TINY_TOML.replace("[rewards]", "[optim]\nema_decay = 0.5\n\n[rewards]"))
    assert main(["train", "--config", str(toml), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002"
    assert main(["eval", "--checkpoint", str(ckpt)]) == 0
    out = capsys.readouterr()
    assert "'ema' weights" in out.err
    assert math.isfinite(json.loads(out.out)["heldout_data_loss"])
    assert main(["eval", "--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "no checkpoint folder" in capsys.readouterr().err


# ---- bad input: one clear error naming the thing, before any work ------------------------------------

class _NoShape(torch.nn.Module):
    def forward(self, x, t, cond):
        return x


def test_policy_without_sample_shape_is_refused(ex, tmp_path):
    cfg = ex.config(str(tmp_path), 2)
    with pytest.raises(ValueError, match="must have a `sample_shape`"):
        Trainer(cfg, _NoShape(), cfg.sampler.build(), ex.CenterMass(), ex.make_data())


def test_policy_without_conditions_is_refused(ex, tmp_path):
    cfg = ex.config(str(tmp_path), 2)
    with pytest.raises(ValueError, match="no `num_classes`.*pass conditions="):
        Trainer(cfg, ex.TinyVelocityNet(), cfg.sampler.build(), ex.CenterMass(), ex.make_data())
    with pytest.raises(TypeError, match="'conditions' must be a non-empty 1-D long tensor"):
        Trainer(cfg, ex.TinyVelocityNet(), cfg.sampler.build(), ex.CenterMass(), ex.make_data(),
                conditions=torch.tensor([1.0, 2.0]))


def test_bad_rewards_and_data_are_refused(ex, tmp_path):
    cfg = ex.config(str(tmp_path), 2)
    build = lambda rewards, data=ex.make_data(): Trainer(  # noqa: E731
        cfg, ex.TinyVelocityNet(), cfg.sampler.build(), rewards, data, conditions=torch.tensor([1, 4, 7]))
    with pytest.raises(TypeError, match="function is not a reward: a reward has a string `name`"):
        build(lambda s, c: s.mean())
    with pytest.raises(ValueError, match="needs a dataset with train_x"):
        build(ex.CenterMass(), None)
    wrong = ex.make_data()
    wrong.train_x = wrong.train_x[:, :, :3]
    with pytest.raises(ValueError, match=r"dataset.train_x must be \[N, \*\(1, 6, 6\)\]"):
        build(ex.CenterMass(), wrong)

    class Scalar:
        name = "scalar"

        def __call__(self, samples, cond):
            return samples.mean()

    tr = build(Scalar())
    with pytest.raises(ValueError, match=r"reward 'scalar' returned shape \(\), expected \[8\]"):
        tr.train_step()
