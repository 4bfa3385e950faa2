#!/usr/bin/env python3
"""Regulariser sweep on the demo's default: DDRL over beta_data and GRPO+KL over beta_kl, same base,
steps and seeds. Writes sweep.json, sweep.md and pareto.png (final reward vs realism and vs held-out
data loss), so the two regularisers are compared along their whole trade-off, not at one setting.

  python tools/sweep_regularisers.py --out sweep_out [--steps 120] [--ddrl 0.01,0.02,0.05,0.1] [--kl 0.03,0.1,0.3,1]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ddrl_engine.trainer.builders import build_dataset, build_evaluator, build_rewards, build_sampler  # noqa: E402
from ddrl_engine.trainer.config import load_config  # noqa: E402
from ddrl_engine.trainer.demo import DEMO_CONFIG, method_config  # noqa: E402
from ddrl_engine.trainer.loop import Trainer  # noqa: E402
from ddrl_engine.trainer.pretrain import pretrain_base  # noqa: E402

KEYS = ("reward", "fd", "heldout_data_loss", "diversity", "class_accuracy")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default=str(DEMO_CONFIG))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--ddrl", default="0.01,0.02,0.05,0.1", help="beta_data values")
    ap.add_argument("--kl", default="0.03,0.1,0.3,1.0", help="beta_kl values")
    args = ap.parse_args()
    from dataclasses import replace

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config)
    cfg = replace(cfg, run=replace(cfg.run, progress=False, **({"steps": args.steps} if args.steps else {})))
    dataset = build_dataset(cfg)
    base = pretrain_base(cfg, dataset, device=cfg.run.device, progress=False)
    sampler, rewards = build_sampler(cfg), build_rewards(cfg)
    evaluator = build_evaluator(cfg, dataset, rewards)
    base_metrics, _ = evaluator(base, sampler, tuple(cfg.model.sample_shape), cfg.run.device)
    runs = [("ddrl", {"beta_data": float(b)}) for b in args.ddrl.split(",")] + \
           [("grpo_kl", {"beta_kl": float(b)}) for b in args.kl.split(",")]
    results = []
    for method, over in runs:
        t0 = time.time()
        mcfg = method_config(cfg, method, out / "runs" / f"{method}_{next(iter(over.values()))}", over)
        evals = Trainer(mcfg, copy.deepcopy(base), sampler, rewards, dataset, evaluator, log=lambda *a: None).train()
        row = {"method": method, **over, **{k: evals[-1][k] for k in KEYS if k in evals[-1]}}
        results.append(row)
        print(json.dumps(row), f"({time.time() - t0:.0f} s)", flush=True)
    (out / "sweep.json").write_text(json.dumps({"base": base_metrics, "runs": results}, indent=2))
    lines = ["| method | beta | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 2) + "|",
             "| base | - | " + " | ".join(f"{base_metrics.get(k, float('nan')):.3f}" for k in KEYS) + " |"]
    for r in results:
        beta = r.get("beta_data", r.get("beta_kl"))
        lines.append(f"| {r['method']} | {beta:g} | " + " | ".join(f"{r.get(k, float('nan')):.3f}" for k in KEYS) + " |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "fd", "Frechet distance (lower = more realistic)"),
                           (axes[1], "heldout_data_loss", "held-out data loss")):
        for method, marker in (("ddrl", "o"), ("grpo_kl", "s")):
            pts = [(r["reward"], r[key], r.get("beta_data", r.get("beta_kl"))) for r in results if r["method"] == method]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=method)
            for x, y, b in pts:
                ax.annotate(f"{b:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.scatter([base_metrics["reward"]], [base_metrics[key]], color="gray", label="base", zorder=3)
        ax.set_xlabel("reward (brightness)")
        ax.set_ylabel(label, fontsize=8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)


if __name__ == "__main__":
    main()
