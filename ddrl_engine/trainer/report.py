"""The demo's outputs: summary.json, report.md, curves.png, samples.png."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

SUMMARY_KEYS = ("reward", "fd", "diversity", "heldout_data_loss")


def write_summary(out: Path, results: dict[str, dict], wall_seconds: float) -> dict:
    methods = {name: {k: float(m.get(k, float("nan"))) for k in SUMMARY_KEYS} for name, m in results.items()}
    summary = {"methods": methods, "wall_seconds": float(wall_seconds)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def write_report(out: Path, results: dict[str, dict], wall_seconds: float, machine: str, notes: list[str]) -> None:
    extra = ("class_accuracy", "class_entropy")
    cols = SUMMARY_KEYS + tuple(k for k in extra if any(k in m for m in results.values()))
    lines = ["# DDRL demo: base vs GRPO vs GRPO+KL vs DDRL", "",
             f"Machine: {machine}. Wall time: {wall_seconds:.0f} s. Same base, budget, seeds and evaluation for every method.",
             "", "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for k in cols) + " |")
    lines += ["", "- reward: the training reward on the evaluation samples (higher = more reward).",
              "- fd: Frechet distance to the data in the features of a classifier trained on held-out digits (lower = more realistic).",
              "- diversity: mean pairwise L2 distance between samples of the same class (higher = more diverse).",
              "- heldout_data_loss: diffusion loss on held-out data, the forward-KL estimate (rising = drifting from the data).",
              "", "![curves](curves.png)", "", "![samples](samples.png)", ""]
    lines += [f"- {n}" for n in notes]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def plot_curves(out: Path, curves: dict[str, list[dict]], base: dict) -> None:
    keys = [("reward", "reward"), ("fd", "realism: Frechet distance (lower is better)"),
            ("heldout_data_loss", "held-out data loss (forward KL estimate)"), ("diversity", "diversity")]
    keys = [(k, t) for k, t in keys if k in base or any(k in e for evals in curves.values() for e in evals)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    axes = axes[0]
    for ax, (key, title) in zip(axes, keys):
        for method, evals in curves.items():
            pts = [(e["step"], e[key]) for e in evals if key in e]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=method)
        if key in base:
            ax.axhline(base[key], color="gray", ls="--", lw=1, label="base")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def sample_grid(s: torch.Tensor, num_classes: int, per_class: int, pad: int = 1) -> torch.Tensor:
    """[N, C, H, W] samples (class-major) -> one [rows*(H+pad), cols*(W+pad)(, 3)] image in [0, 1]."""
    s = ((s.detach().float().cpu() + 1) / 2).clamp(0, 1)
    n = s.shape[0] // num_classes
    s = s.reshape(num_classes, n, *s.shape[1:])[:, :per_class]
    s = s[:, :, :1] if s.shape[2] != 3 else s
    s = torch.nn.functional.pad(s, (0, pad, 0, pad), value=0.5)  # grey lines between tiles
    rows, cols, c, h, w = s.shape
    return s.permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c).squeeze(-1)


def plot_samples(out: Path, samples: dict[str, torch.Tensor], num_classes: int, per_class: int = 8) -> None:
    """One grid per method: a row per class, `per_class` samples each (same seeds for every method)."""
    fig, axes = plt.subplots(1, len(samples), figsize=(2.6 * len(samples), 3.6))
    for ax, (name, s) in zip(axes, samples.items()):
        ax.imshow(sample_grid(s, num_classes, per_class).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=120)
    plt.close(fig)
