"""`ddrl-engine study`: its bookkeeping (runs, skip on rerun, resume of an interrupted run, a changed
grid refused), its aggregation (mean +- std over seeds, fd at matched reward) and the gradient probe,
on a 2-step grid of a tiny DiT; and the learned class_margin reward it can train on."""
import json
import math
import os
import random
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from ddrl_engine.rewards import ClassMarginReward, class_margin, reward_classifier
from ddrl_engine.trainer.config import PretrainConfig
from ddrl_engine.trainer.loop import Trainer
from ddrl_engine.trainer.study import Variant, run_study, study_runs
from ddrl_engine.trainer.study_report import aggregate, common_reward_targets, matched
from tests.trainer_helpers import tiny_config

VARIANTS = (Variant("grpo", "grpo", None, ()),
            Variant("ddrl", "ddrl", "beta_data", (0.05, 0.5), about="tiny"))


@pytest.fixture(scope="module")
def tiny_toml(tmp_path_factory):
    cfg = tiny_config("unused", steps=2)
    cfg = replace(cfg, pretrain=PretrainConfig(steps=30, batch_size=32, cache=False))
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(cfg.to_dict(), default=str))
    return path


def _study(out, config, **kw):
    kw.setdefault("variants", VARIANTS)
    kw.setdefault("seeds", (0, 1))
    return run_study(out, config=config, steps=2, eval_every=1, progress=False, log=lambda *a: None, **kw)


class CountingTrainer(Trainer):
    made = 0

    def __init__(self, *a, **kw):
        type(self).made += 1
        super().__init__(*a, **kw)


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_toml):
    out = tmp_path_factory.mktemp("study")
    return out, _study(out, tiny_toml, probe_steps=2)


def test_study_runs_every_point_and_writes_the_report(study):
    out, s = study
    assert [r["key"] for r in s["runs"]] == [spec.key for spec in study_runs(VARIANTS, (0, 1))]
    assert len(s["runs"]) == 6
    for r in s["runs"]:
        assert (out / "runs" / r["key"] / "result.json").exists()
        assert not (out / "runs" / r["key"] / "checkpoints").exists()  # removed once done
        assert [e["step"] for e in r["curve"]] == [0, 1, 2]
        assert r["final"] == {k: r["curve"][-1][k] for k in r["final"]}
    assert json.loads((out / "study.json").read_text())["runs"] == s["runs"]
    for name in ("report.md", "fronts.png", "curves.png", "probe.png", "base.json", "probe.json"):
        assert (out / name).stat().st_size > 0, name
    # The seed is the run's: two seeds of one point differ, the runs' configs say so.
    a, b = (r for r in s["runs"] if r["variant"] == "ddrl" and r["strength"] == 0.05)
    assert a["final"]["reward"] != b["final"]["reward"]
    cfg = json.loads((out / "runs" / b["key"] / "config.json").read_text())
    assert cfg["run"]["seed"] == 1 and cfg["algorithm"]["beta_data"] == 0.05 and cfg["algorithm"]["method"] == "ddrl"


def test_rerun_skips_finished_runs_and_reruns_a_missing_one(study, tiny_toml):
    out, s = study
    CountingTrainer.made = 0
    again = _study(out, tiny_toml, probe_steps=2, trainer_factory=CountingTrainer)
    assert CountingTrainer.made == 0 and [r["final"] for r in again["runs"]] == [r["final"] for r in s["runs"]]
    victim = s["runs"][3]
    (out / "runs" / victim["key"] / "result.json").unlink()
    redo = _study(out, tiny_toml, probe_steps=2, trainer_factory=CountingTrainer)
    assert CountingTrainer.made == 1
    assert redo["runs"][3]["final"] == victim["final"]  # the same run again: the same numbers


def test_changed_grid_in_the_same_folder_is_refused(study, tiny_toml):
    out, _ = study
    with pytest.raises(ValueError, match="study_config.json holds another study.*seeds"):
        _study(out, tiny_toml, seeds=(0, 1, 2))


def test_interrupted_run_resumes_from_its_checkpoint_exactly(tmp_path, tiny_toml, study):
    class Crash(Exception):
        pass

    class CrashingTrainer(Trainer):
        def train_step(self):
            if self.step == 1 and self.algo.method == "ddrl":
                raise Crash  # after step 1's checkpoint (eval_every = ckpt_every = 1)
            return super().train_step()

    variants = VARIANTS[1:]
    with pytest.raises(Crash):
        _study(tmp_path, tiny_toml, variants=variants, seeds=(0,), probe_steps=0, trainer_factory=CrashingTrainer)
    resumed = _study(tmp_path, tiny_toml, variants=variants, seeds=(0,), probe_steps=0)
    first = resumed["runs"][0]
    assert first["resumed"] and [e["step"] for e in first["curve"]] == [0, 1, 2]
    _, full = study
    reference = next(r for r in full["runs"] if r["key"] == first["key"])
    for k, v in reference["final"].items():  # same as the uninterrupted run of the shared study
        assert first["final"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


def _fake_study(finals: dict) -> dict:
    """A study.json with the given final metrics: {(variant, strength, seed): {metric: value}}."""
    runs = [{"key": f"{v}/{s}/{seed}", "variant": v, "strength": s, "seed": seed, "final": f, "curve": []}
            for (v, s, seed), f in finals.items()]
    return {"runs": runs, "base": {"reward": 0.0, "fd": 1.0}, "rewards": {}, "wall_s_runs": 0.0,
            "grid": {"steps": 1, "eval_every": 1, "seeds": [0, 1, 2], "variants": []}}


def test_aggregate_is_mean_and_sample_std_over_seeds():
    seed = int(os.environ.get("TEST_SEED", random.randrange(2**31)))
    print(f"seed {seed} (TEST_SEED={seed} to repeat)")
    rng = np.random.default_rng(seed)
    vals = rng.normal(size=(2, 3, 2))  # strength x seed x (reward, fd)
    s = _fake_study({("ddrl", b, sd): {"reward": float(vals[i, sd, 0]), "fd": float(vals[i, sd, 1])}
                     for i, b in enumerate((0.1, 0.2)) for sd in range(3)})
    rows = aggregate(s)
    assert [(r["variant"], r["strength"], r["n"]) for r in rows] == [("ddrl", 0.1, 3), ("ddrl", 0.2, 3)]
    for i, r in enumerate(rows):
        assert r["fd"]["mean"] == pytest.approx(vals[i, :, 1].mean(), rel=1e-12)
        assert r["fd"]["std"] == pytest.approx(vals[i, :, 1].std(ddof=1), rel=1e-12)
        assert r["reward"]["values"] == pytest.approx(vals[i, :, 0].tolist())


def test_matched_reward_interpolates_per_seed_and_never_extrapolates():
    # seed 0: fd = 10 r along (0, 0) - (1, 10); seed 1: fd = 20 r along (0, 0) - (0.5, 10).
    s = _fake_study({("ddrl", 0.1, 0): {"reward": 1.0, "fd": 10.0}, ("ddrl", 1.0, 0): {"reward": 0.0, "fd": 0.0},
                     ("ddrl", 0.1, 1): {"reward": 0.5, "fd": 10.0}, ("ddrl", 1.0, 1): {"reward": 0.0, "fd": 0.0},
                     ("grpo", None, 0): {"reward": 2.0, "fd": 99.0}})
    assert common_reward_targets(s, n=1) == pytest.approx([0.25])  # middle of [0, 0.5], the seeds' common range
    low, high = matched(s, [0.25, 0.75])["ddrl"]
    assert (low["mean"], low["min"], low["max"], low["n"]) == pytest.approx((3.75, 2.5, 5.0, 2))
    assert low["std"] == pytest.approx(np.std([2.5, 5.0], ddof=1))
    assert high["n"] == 1 and high["mean"] == pytest.approx(7.5)  # seed 1 does not reach 0.75
    assert "grpo" not in matched(s, [0.25])  # a single point is no front


def test_probe_measures_each_terms_gradient(tmp_path):
    """From the same weights, the data term's gradient scales with beta_data and the policy term's does
    not; the probe changes nothing in training."""
    from ddrl_engine.trainer.builders import build_dataset, build_model, build_rewards, build_sampler
    from ddrl_engine.trainer.grad_probe import GradProbeTrainer, step_profile

    def first_update(cls, beta):
        cfg = tiny_config(tmp_path / f"{cls.__name__}{beta}", steps=1, beta_data=beta)
        torch.manual_seed(0)
        t = cls(cfg, build_model(cfg), build_sampler(cfg), build_rewards(cfg), build_dataset(cfg), None,
                log=lambda *a: None)
        return t, t.train_step()

    (p1, m1), (p2, _) = first_update(GradProbeTrainer, 0.1), first_update(GradProbeTrainer, 0.4)
    a, b = step_profile(p1.records), step_profile(p2.records)
    assert a["steps"] == [0, 2]  # 4 sampler steps, every other one trained
    assert all(v > 0 and math.isfinite(v) for v in a["policy"] + a["data"])
    assert b["data"] == pytest.approx([4 * v for v in a["data"]], rel=1e-5)
    assert b["policy"] == pytest.approx(a["policy"], rel=1e-6)
    _, plain = first_update(Trainer, 0.1)
    for k in ("policy_loss", "data_loss", "grad_norm"):
        assert m1[k] == plain[k], k


def test_class_margin_reward(tmp_path):
    seed = int(os.environ.get("TEST_SEED", random.randrange(2**31)))
    print(f"seed {seed} (TEST_SEED={seed} to repeat)")
    g = torch.Generator().manual_seed(seed)
    logits, cond = torch.randn(7, 10, generator=g), torch.randint(0, 10, (7,), generator=g)
    expect = [logits[i, c] - max(logits[i, j] for j in range(10) if j != c) for i, c in enumerate(cond.tolist())]
    assert class_margin(logits, cond).tolist() == pytest.approx([float(e) for e in expect])

    from ddrl_engine.data import digits_split

    split = digits_split()
    reward = ClassMarginReward(reward_classifier(split))
    x, y = split.heldout_x[:64], split.heldout_y[:64]
    on_data = reward(x, y)
    assert on_data.shape == (64,) and on_data.dtype == torch.float32
    assert on_data.median() > 0  # the right class wins on real digits
    assert reward(x, (y + 1) % 10).median() < 0  # and loses when the condition is another class
    with pytest.raises(ValueError, match="class_margin: cond must hold class ids"):
        reward(x[:2], torch.tensor([0, 10]))


def test_probe_skips_variants_whose_data_loss_is_not_at_each_trained_step(tmp_path):
    from ddrl_engine.trainer.builders import build_dataset, build_model, build_rewards, build_sampler
    from ddrl_engine.trainer.grad_probe import run_probes

    cfg = tiny_config(tmp_path / "cfg", steps=1)
    variants = (Variant("one", "ddrl", "beta_data", (0.1,), {"algorithm.data_loss_steps": "one"}),
                Variant("fresh", "ddrl", "beta_data", (0.1,), {"algorithm.data_noise": "fresh"}),
                Variant("all", "ddrl", "beta_data", (0.1,)), Variant("grpo", "grpo", None, ()))
    logs = []
    probes = run_probes(tmp_path, cfg, build_model(cfg), build_sampler(cfg), build_rewards(cfg), build_dataset(cfg),
                        variants, steps=1, log=logs.append)
    assert list(probes) == ["all"] and probes["all"]["steps"] == [0, 2]
    assert sum("skipped" in line for line in logs) == 2
    assert json.loads((tmp_path / "probe.json").read_text()) == probes


def test_cli_study_runs_and_names_bad_arguments(tmp_path, tiny_toml, capsys):
    from ddrl_engine.cli import main

    out = tmp_path / "cli"
    args = ["study", "--out", str(out), "--config", str(tiny_toml), "--steps", "1", "--eval-every", "1",
            "--seeds", "0", "--variants", "grpo", "--probe-steps", "0", "--no-progress"]
    assert main(args) == 0
    assert json.loads((out / "study.json").read_text())["runs"][0]["key"] == "grpo/none/seed_0"
    assert (out / "report.md").exists()
    for bad, match in ((["--grid", "nope"], "--grid: unknown grid"), (["--variants", "dddrl"], "--variants: \\['dddrl'\\]"),
                       (["--seeds", "0,x"], "--seeds must be comma-separated integers"),
                       (["--seeds", "1,1"], "seeds must be distinct")):
        assert main(["study", "--out", str(tmp_path / "bad"), "--config", str(tiny_toml), *bad]) == 2
        assert re.search(match, capsys.readouterr().err), bad
