"""`ddrl-engine study`: every method over a grid of regulariser strengths and seeds, one base, one
evaluation, resumable.

A study is a list of `Variant`s (a method with its baseline forms, e.g. GRPO+KL in its exact form and in
Flow-GRPO's), each run at every strength in its grid and every seed. The seed is `run.seed`: rollout
noise, condition draws and data order (the base model and the evaluation are the same for every run).
Layout of DIR:

    study_config.json            the grid and the base config (a rerun with another grid is refused)
    base.json                    the base model's evaluation
    runs/<variant>/<strength>/seed_<s>/   each run's own folder (metrics.jsonl, checkpoints, samples/)
        result.json              written last (atomically): the run is done and is skipped on a rerun
    study.json                   every run's final and curve metrics (rewritten after every run)
    probe.json                   per trained step gradient norms of the policy and the data term
    report.md, fronts.png, curves.png, probe.png, samples_matched.png   (trainer/study_report.py)

An interrupted run resumes from its last checkpoint (written at every evaluation), so a killed study
loses at most one evaluation period of one run.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from ddrl_engine.trainer.config import TrainConfig, config_from_dict, load_config

FINAL_KEYS = ("reward", "fd", "diversity", "heldout_data_loss", "class_accuracy", "class_margin_heldout")


@dataclass(frozen=True)
class Variant:
    """One method configuration of the study.

    name: its key (folder and legend); method: "grpo", "grpo_kl", "ddrl" (trainer method presets);
    strength: the regulariser field varied ("beta_data", "beta_kl") or None (no regulariser);
    strengths: the grid of that field; overrides: other config values, "section.field" -> value
    (e.g. {"algorithm.kl_form": "flow_grpo"}); about: what the variant is, for the report.
    """

    name: str
    method: str
    strength: str | None
    strengths: tuple[float, ...]
    overrides: dict = field(default_factory=dict)
    about: str = ""

    def points(self) -> tuple[float | None, ...]:
        return tuple(self.strengths) if self.strength else (None,)


# Strength grids. GRPO+KL (exact) and DDRL (ours) span the demo's regulariser sweep (README), chosen on
# training runs. The other forms' grids are those scaled by how the form rescales its term, worked out
# before any run: Flow-GRPO's KL is the exact KL times |dt| (0.1 at 10 steps), so its beta_kl is x10;
# cosmos-rl's log-ratio is the density log-ratio times 2 s_k^2 (about 0.05 at mid-chain here), which
# shrinks the policy gradient against the data term by ~20, so its beta_data is /10 (and its loss_scale
# 10 with grad_clip 1 shrinks every step).
DEFAULT_VARIANTS = (
    Variant("grpo", "grpo", None, (), about="GRPO, no regulariser"),
    Variant("grpo_kl", "grpo_kl", "beta_kl", (0.03, 0.1, 0.3),
            about="GRPO + reverse KL, exact Gaussian KL ||mu - mu_ref||^2 / (2 s^2) (ours, kl_form = exact)"),
    Variant("ddrl", "ddrl", "beta_data", (0.01, 0.02, 0.05),
            about="DDRL, density log-ratio, clip 0.2 (ours, the demo's forms)"),
    Variant("ddrl_cosmos", "ddrl", "beta_data", (0.001, 0.003, 0.01),
            {"algorithm.logprob_form": "cosmos", "algorithm.clip_eps": 1e-4, "algorithm.adv_std": "unbiased",
             "algorithm.loss_scale": 10.0},
            about="DDRL as cosmos-rl configures it: its element-mean log-ratio without 1/(2 s^2), clip 1e-4, "
                  "unbiased group std, loss x10 (its EDM data weighting has no rectified-flow counterpart: "
                  "the velocity loss already weights x0 errors by 1/t^2)"),
)

# Flow-GRPO's KL form is the exact KL times |dt_k|: on the demo's uniform 10-step schedule (|dt| = 0.1)
# it is the exact form at 10x beta_kl, step for step (the same numbers: a separate grid, not the default).
FORMS_VARIANTS = (
    Variant("grpo_kl_flowgrpo", "grpo_kl", "beta_kl", (0.3, 1.0, 3.0), {"algorithm.kl_form": "flow_grpo"},
            about="GRPO + reverse KL in Flow-GRPO's form (divides by 2 std_t^2 without |dt|; kl_form = flow_grpo)"),
)

# What decides DDRL's realism (issue #13 item 4): DDRL (ours) with one setting changed at a time. The
# clip range is not among them: with one PPO epoch every likelihood ratio is exactly 1 (ratio_dev = 0),
# so no clip range is ever active.
INVESTIGATION_VARIANTS = (
    Variant("ddrl_fresh_noise", "ddrl", "beta_data", (0.01, 0.02, 0.05), {"algorithm.data_noise": "fresh"},
            about="DDRL, data loss at fresh noise and levels (not the rollout's)"),
    Variant("ddrl_data_one", "ddrl", "beta_data", (0.01, 0.02, 0.05), {"algorithm.data_loss_steps": "one"},
            about="DDRL, data loss at one trained step per update"),
    Variant("ddrl_lr_half", "ddrl", "beta_data", (0.01, 0.02, 0.05), {"optim.lr": 5e-5}, about="DDRL, lr 5e-5"),
    Variant("ddrl_all_steps", "ddrl", "beta_data", (0.01, 0.02, 0.05), {"algorithm.train_steps": "all"},
            about="DDRL, every step trained"),
)

GRIDS = {"default": DEFAULT_VARIANTS, "forms": FORMS_VARIANTS, "investigate": INVESTIGATION_VARIANTS}


@dataclass(frozen=True)
class RunSpec:
    variant: Variant
    strength: float | None
    seed: int

    @property
    def key(self) -> str:
        s = "none" if self.strength is None else f"{self.variant.strength}={self.strength:g}"
        return f"{self.variant.name}/{s}/seed_{self.seed}"

    def config(self, base: TrainConfig, out: Path, steps: int, eval_every: int) -> TrainConfig:
        """The run's TrainConfig: the method's preset, its strength and overrides, the seed and budget."""
        from ddrl_engine.algorithms import with_method

        data = base.to_dict()
        data["algorithm"] = dict(vars(with_method(base.algorithm, self.variant.method)))
        if self.strength is not None:
            data["algorithm"][self.variant.strength] = self.strength
        for dotted, value in self.variant.overrides.items():
            section, _, name = dotted.partition(".")
            if section not in data or not isinstance(data[section], dict) or not name:
                raise ValueError(f"study variant {self.variant.name!r}: override {dotted!r} names no config field")
            data[section][name] = value
        data["run"].update(seed=self.seed, steps=steps, eval_every=eval_every, ckpt_every=eval_every,
                           keep_checkpoints=1, out_dir=str(out / "runs" / self.key), progress=False)
        return config_from_dict(data)


def study_runs(variants, seeds) -> list[RunSpec]:
    """Every (variant, strength, seed), seeds innermost so that a partial study has whole seed sets."""
    return [RunSpec(v, s, seed) for v in variants for s in v.points() for seed in seeds]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _records(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records (every resumed segment); a torn last line is skipped (the trainer
    sets it aside on resume)."""
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else ():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _eval_curve(records: list[dict]) -> list[dict]:
    """The evaluations, one per step (the last record of a step wins), by step."""
    by_step = {r["step"]: {k: v for k, v in r.items() if k != "kind"} for r in records if r.get("kind") == "eval"}
    return [by_step[s] for s in sorted(by_step)]


def _train_mean(records: list[dict], key: str, last: int) -> float | None:
    """The mean of `key` over the last `last` training records (None without any)."""
    vals = [float(r[key]) for r in records if r.get("kind") == "train" and key in r][-last:]
    return sum(vals) / len(vals) if vals else None


def _check_same_study(out: Path, fingerprint: dict) -> None:
    path = out / "study_config.json"
    if path.exists():
        old, new = json.loads(path.read_text()), json.loads(json.dumps(fingerprint, default=str))
        if old != new:
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(f"study: {path} holds another study (differs in {', '.join(changed)}); use another --out "
                             "or remove it")
    else:
        _write_json(path, fingerprint)


def run_study(out: str | Path, *, config: str | Path | None = None, variants=DEFAULT_VARIANTS, seeds=(0, 1, 2),
              steps: int | None = None, eval_every: int = 40, reward: str | None = None, probe_steps: int = 12,
              progress: bool = True, log=print, trainer_factory: Callable | None = None) -> dict:
    """Runs (or resumes) the study in `out`; returns study.json's content. reward: one built-in reward
    name to train on instead of the config's (e.g. "class_margin"); probe_steps: steps of the gradient
    probe per probed variant (0 = none)."""
    from ddrl_engine.trainer.builders import build_dataset, build_evaluator, build_rewards, build_sampler
    from ddrl_engine.trainer.demo import DEMO_CONFIG, machine_description
    from ddrl_engine.trainer.loop import Trainer
    from ddrl_engine.trainer.pretrain import pretrain_base
    from ddrl_engine.trainer.study_report import write_study_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config or DEMO_CONFIG)
    if reward is not None:
        cfg = replace(cfg, rewards={reward: 1.0})
    steps = cfg.run.steps if steps is None else steps
    if steps < 1 or eval_every < 1:
        raise ValueError(f"study: steps ({steps}) and eval_every ({eval_every}) must be >= 1")
    seeds = tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"study: seeds must be distinct integers >= 0, got {seeds}")
    runs = study_runs(variants, seeds)
    for spec in runs:  # every run's config is checked before any work
        spec.config(cfg, out, steps, eval_every)
    fingerprint = {"config": cfg.to_dict(), "steps": steps, "eval_every": eval_every, "seeds": list(seeds),
                   "variants": [{"name": v.name, "method": v.method, "strength": v.strength,
                                 "strengths": list(v.strengths), "overrides": v.overrides, "about": v.about}
                                for v in variants]}
    _check_same_study(out, fingerprint)

    t0 = time.time()
    base_cfg = replace(cfg, run=replace(cfg.run, progress=progress))
    dataset = build_dataset(base_cfg)
    base = pretrain_base(base_cfg, dataset, device=cfg.run.device, progress=progress, log=log)
    sampler, rewards = build_sampler(cfg), build_rewards(cfg)
    evaluator = build_evaluator(cfg, dataset, rewards)
    base_path = out / "base.json"
    if base_path.exists():
        base_metrics = json.loads(base_path.read_text())
    else:
        base_metrics, base_samples = evaluator(base, sampler, base.sample_shape, cfg.run.device)
        evaluator.save_samples(base_samples, out / "base_samples")
        _write_json(base_path, base_metrics)
    make = trainer_factory or Trainer

    results = []
    bar = tqdm(runs, desc="study", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec.key)
        run_dir = out / "runs" / spec.key
        done = run_dir / "result.json"
        if done.exists():
            results.append(json.loads(done.read_text()))
            continue
        rcfg = spec.config(cfg, out, steps, eval_every)
        r0 = time.time()
        trainer = make(rcfg, copy.deepcopy(base), sampler, rewards, dataset, evaluator, log=lambda *a: None)
        resumed = trainer.resume()
        trainer.train()
        records = _records(run_dir)
        curve = _eval_curve(records)
        final = curve[-1]
        row = {"key": spec.key, "variant": spec.variant.name, "strength": spec.strength, "seed": spec.seed,
               "final": {k: final[k] for k in FINAL_KEYS if k in final}, "curve": curve,
               "train_reward_last10": _train_mean(records, "reward", 10), "wall_s": time.time() - r0,
               "resumed": bool(resumed)}
        _write_json(done, row)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # done: result.json is what is kept
        results.append(row)
        log(f"study: {spec.key}: " + ", ".join(f"{k}={v:.4g}" for k, v in row["final"].items()) +
            f" ({row['wall_s']:.0f} s)")
        _write_json(out / "study.json", _study_json(fingerprint, base_metrics, results, cfg, t0))
    bar.close()

    probe = None
    if probe_steps > 0:
        from ddrl_engine.trainer.grad_probe import run_probes

        probe = run_probes(out, cfg, base, sampler, rewards, dataset, variants, steps=probe_steps, log=log)
    study = _study_json(fingerprint, base_metrics, results, cfg, t0)
    study["machine"] = machine_description(cfg.run.device)
    _write_json(out / "study.json", study)
    write_study_report(out, study, probe)
    log(f"study done: {len(results)} runs, {out / 'report.md'}")
    return study


def _study_json(fingerprint: dict, base: dict, results: list[dict], cfg: TrainConfig, t0: float) -> dict:
    return {"grid": {k: fingerprint[k] for k in ("steps", "eval_every", "seeds", "variants")},
            "rewards": dict(cfg.rewards), "num_classes": getattr(cfg.model, "num_classes", None), "base": base,
            "runs": results,
            "wall_s_this_session": time.time() - t0,
            "wall_s_runs": sum(r["wall_s"] for r in results)}
