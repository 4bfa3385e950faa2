"""The study's aggregation and report: mean +- std over seeds, fronts, fd at matched reward, pictures.

Everything here is a function of study.json (and the runs' saved samples), so a report can be rebuilt
without rerunning anything: `write_study_report(out, json.load(open(out / "study.json")))`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

METRICS = ("reward", "fd", "diversity", "heldout_data_loss", "class_accuracy", "class_margin_heldout")


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def aggregate(study: dict) -> list[dict]:
    """One row per (variant, strength), in grid order: n seeds, and per metric its mean, std and the
    per-seed values (`values`)."""
    groups: dict[tuple, list[dict]] = {}
    for run in study["runs"]:
        groups.setdefault((run["variant"], run["strength"]), []).append(run)
    rows = []
    for (variant, strength), runs in groups.items():
        row = {"variant": variant, "strength": strength, "n": len(runs), "seeds": [r["seed"] for r in runs]}
        for key in METRICS:
            vals = [r["final"][key] for r in runs if key in r["final"]]
            if vals:
                m, s = _mean_std(vals)
                row[key] = {"mean": m, "std": s, "values": vals}
        rows.append(row)
    return rows


def common_reward_targets(study: dict, n: int = 3) -> list[float]:
    """`n` rewards spread over the range every regularised variant reaches with every seed (the
    intersection of the per-seed reward ranges over strengths); [] when they do not overlap."""
    lo, hi = -math.inf, math.inf
    for fronts in seed_fronts(study).values():
        for pts in fronts.values():
            r = [p[0] for p in pts]
            lo, hi = max(lo, min(r)), min(hi, max(r))
    if not lo < hi:
        return []
    return [float(x) for x in np.linspace(lo, hi, n + 2)[1:-1]]


def seed_fronts(study: dict, key: str = "fd") -> dict[str, dict[int, list[tuple[float, float]]]]:
    """variant -> seed -> [(reward, key)] over its strengths, sorted by reward (variants with >= 2)."""
    out: dict[str, dict[int, list]] = {}
    for run in study["runs"]:
        if run["strength"] is None or key not in run["final"]:
            continue
        out.setdefault(run["variant"], {}).setdefault(run["seed"], []).append((run["final"]["reward"], run["final"][key]))
    return {v: {s: sorted(p) for s, p in seeds.items()} for v, seeds in out.items()
            if all(len(p) >= 2 for p in seeds.values())}


def matched(study: dict, targets: list[float], key: str = "fd") -> dict[str, list[dict]]:
    """`key` at each target reward, per variant: per seed, linear interpolation along that seed's front
    over strengths (never extrapolated: a target outside a seed's reward range gives no value for that
    seed); then mean, std and [min, max] over the seeds that reach it."""
    result = {}
    for variant, seeds in seed_fronts(study, key).items():
        rows = []
        for t in targets:
            vals = []
            for pts in seeds.values():
                r, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
                if r.min() <= t <= r.max():
                    vals.append(float(np.interp(t, r, y)))
            if vals:
                m, s = _mean_std(vals)
                rows.append({"reward": t, "mean": m, "std": s, "min": min(vals), "max": max(vals), "n": len(vals)})
            else:
                rows.append({"reward": t, "n": 0})
        result[variant] = rows
    return result


def _fmt(cell: dict | None, digits: int = 3) -> str:
    if not cell:
        return "-"
    if len(cell["values"]) == 1:  # one seed: no spread to show
        return f"{cell['mean']:.{digits}f}"
    return f"{cell['mean']:.{digits}f} +- {cell['std']:.{digits}f}"


def _strength_label(study: dict, variant: str, strength) -> str:
    field = next((v["strength"] for v in study["grid"]["variants"] if v["name"] == variant), None)
    return "-" if strength is None else f"{field} = {strength:g}"


def write_study_report(out: Path, study: dict, probe: dict | None = None) -> None:
    out = Path(out)
    rows = aggregate(study)
    targets = common_reward_targets(study)
    fd_at = matched(study, targets, "fd") if targets else {}
    div_at = matched(study, targets, "diversity") if targets else {}
    keys = [k for k in METRICS if any(k in r for r in rows)]
    base = study["base"]
    grid = study["grid"]
    lines = ["# DDRL claim study", "",
             f"Rewards {study['rewards']}; {grid['steps']} steps per run, evaluated every {grid['eval_every']}; "
             f"seeds {grid['seeds']} (rollout noise, conditions, data order); one base model and one evaluation "
             f"for every run. {len(study['runs'])} runs, {study['wall_s_runs']:.0f} s of run time"
             + (f" on {study['machine']}" if study.get("machine") else "") + ".", "",
             "## Final metrics, mean +- std over seeds", "",
             "| variant | strength | n | " + " | ".join(keys) + " |", "|---" * (len(keys) + 3) + "|",
             "| base | - | 1 | " + " | ".join(f"{base[k]:.3f}" if k in base else "-" for k in keys) + " |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {_strength_label(study, r['variant'], r['strength'])} | {r['n']} | "
                     + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    lines += ["", "![fronts](fronts.png)", ""]
    if targets:
        lines += ["## At matched reward", "",
                  "Per seed, fd and diversity interpolated along that seed's front over strengths (linear, never "
                  "extrapolated), then mean +- std [min, max] over the seeds that reach the reward (n).", "",
                  "| reward | " + " | ".join(f"{v} fd" for v in fd_at) + " | " + " | ".join(f"{v} diversity" for v in div_at)
                  + " |", "|---" * (1 + len(fd_at) + len(div_at)) + "|"]
        for i, t in enumerate(targets):
            cells = []
            for table in (fd_at, div_at):
                for v in table:
                    c = table[v][i]
                    cells.append("-" if not c["n"] else f"{c['mean']:.2f} (n=1)" if c["n"] == 1 else
                                 f"{c['mean']:.2f} +- {c['std']:.2f} [{c['min']:.2f}, {c['max']:.2f}] (n={c['n']})")
            lines.append(f"| {t:.3f} | " + " | ".join(cells) + " |")
        lines += ["", "![samples at matched reward](samples_matched.png)", ""]
    else:
        lines += ["The variants' reward ranges do not overlap: no comparison at matched reward.", ""]
    if probe:
        lines += ["## Gradient of each term per trained step (probe)", "",
                  "Norm of the gradient each backward adds (the trainer's own losses and weights), mean over the "
                  "probe's updates from the base, at the variant's middle strength; s_k the transition std.", "",
                  "| variant | step k | s_k | policy | data | policy / data |", "|---|---|---|---|---|---|"]
        for name, p in probe.items():
            for k, s, a, b in zip(p["steps"], p["std"], p["policy"] or [], p["data"] or []):
                lines.append(f"| {name} (beta_data = {p['strength']:g}) | {k} | {s:.4f} | {a:.4g} | {b:.4g} | "
                             f"{a / b if b else float('nan'):.3g} |")
        lines += ["", "![probe](probe.png)", ""]
    lines += ["## Variants", ""] + [f"- {v['name']}: {v['about']}" for v in grid["variants"]]
    lines += ["", "![curves](curves.png)", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot_fronts(out / "fronts.png", study, rows)
    plot_study_curves(out / "curves.png", study)
    if probe:
        plot_probe(out / "probe.png", probe)
    if targets:
        plot_matched_samples(out / "samples_matched.png", out, study, targets)


def plot_fronts(path: Path, study: dict, rows: list[dict]) -> None:
    """Reward against fd, diversity and held-out data loss: per variant the seed means over its strengths
    (line), +- std over seeds (bars in both axes) and every seed's run (faint dots)."""
    ys = [(k, t) for k, t in (("fd", "fd (lower = more realistic)"), ("diversity", "diversity"),
                              ("heldout_data_loss", "held-out data loss"),
                              ("class_margin_heldout", "margin, independent classifier"))
          if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(ys), figsize=(4.4 * len(ys), 3.8), squeeze=False)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
    for ax, (key, title) in zip(axes[0], ys):
        for v in variants:
            vr = sorted((r for r in rows if r["variant"] == v and key in r), key=lambda r: r["reward"]["mean"])
            if not vr:
                continue
            x = [r["reward"]["mean"] for r in vr]
            y = [r[key]["mean"] for r in vr]
            ax.errorbar(x, y, xerr=[r["reward"]["std"] for r in vr], yerr=[r[key]["std"] for r in vr], marker="o",
                        ms=4, lw=1.2, capsize=2, color=colors[v], label=v)
            for r in vr:
                ax.scatter(r["reward"]["values"], r[key]["values"], s=8, color=colors[v], alpha=0.35)
        if key in study["base"]:
            ax.scatter([study["base"]["reward"]], [study["base"][key]], marker="*", s=90, color="black", label="base",
                       zorder=5)
        if key in ("fd", "heldout_data_loss"):
            ax.set_yscale("log")
        ax.set_xlabel("reward")
        ax.set_title(title, fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_study_curves(path: Path, study: dict) -> None:
    """Reward and fd over training steps, each variant at its middle strength, mean over seeds."""
    keys = [k for k in ("reward", "fd", "heldout_data_loss") if any(k in r["final"] for r in study["runs"])]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 3.4), squeeze=False)
    for v in study["grid"]["variants"]:
        strengths = v["strengths"] or [None]
        mid = sorted(strengths, key=lambda s: -1 if s is None else s)[len(strengths) // 2]
        runs = [r for r in study["runs"] if r["variant"] == v["name"] and r["strength"] == mid]
        if not runs:
            continue
        for ax, key in zip(axes[0], keys):
            steps = [e["step"] for e in runs[0]["curve"]]
            vals = np.array([[e.get(key, np.nan) for e in r["curve"]] for r in runs if len(r["curve"]) == len(steps)])
            label = v["name"] + ("" if mid is None else f" ({v['strength']}={mid:g})")
            ax.plot(steps, np.nanmean(vals, axis=0), marker="o", ms=3, label=label)
    for ax, key in zip(axes[0], keys):
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        if key in ("fd", "heldout_data_loss"):
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_probe(path: Path, probe: dict) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, p in probe.items():
        axes[0].plot(p["steps"], p["policy"], marker="o", label=f"{name}: policy")
        axes[0].plot(p["steps"], p["data"], marker="x", ls="--", label=f"{name}: data")
        axes[1].plot(p["std"], [a / b for a, b in zip(p["policy"], p["data"])], marker="o", label=name)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("trained step k")
    axes[0].set_title("gradient norm added per step", fontsize=9)
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("transition std s_k")
    axes[1].set_title("policy / data gradient norm", fontsize=9)
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _nearest_runs(study: dict, target: float, tolerance: float) -> dict[str, dict | None]:
    """variant -> its run whose final reward is nearest `target`, or None if none is within `tolerance`."""
    out = {}
    for v in study["grid"]["variants"]:
        runs = [r for r in study["runs"] if r["variant"] == v["name"]]
        if runs:
            r = min(runs, key=lambda r: abs(r["final"]["reward"] - target))
            out[v["name"]] = r if abs(r["final"]["reward"] - target) <= tolerance else None
    return out


def plot_matched_samples(path: Path, out: Path, study: dict, targets: list[float], per_class: int = 8,
                         tolerance: float = 0.15) -> None:
    """A row per target reward, a column per variant: the final evaluation samples of the variant's run
    (any strength, any seed) whose reward is nearest the target, if within `tolerance` of it (else the
    panel says so), `per_class` samples of each class (a row per class), titled with the run's reward and fd."""
    from PIL import Image

    rows = int(study.get("num_classes") or 10)
    variants = [v["name"] for v in study["grid"]["variants"]]
    fig, axes = plt.subplots(len(targets), len(variants), figsize=(2.3 * len(variants), 3.0 * len(targets)),
                             squeeze=False)
    for i, target in enumerate(targets):
        near = _nearest_runs(study, target, tolerance)
        for ax, name in zip(axes[i], variants):
            ax.axis("off")
            r = near.get(name)
            png = sorted((out / "runs" / r["key"] / "samples").glob("step_*.png")) if r is not None else []
            if not png:
                ax.set_title(f"{name}\nno run within {tolerance:g} of {target:.2f}", fontsize=7)
                continue
            img = np.asarray(Image.open(png[-1]).convert("L"))
            ax.imshow(_padded_tiles(img, rows, per_class), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            s = "" if r["strength"] is None else f" {r['strength']:g}"
            ax.set_title(f"{name}{s} seed {r['seed']}\nreward {r['final']['reward']:.2f}, fd "
                         f"{r['final'].get('fd', float('nan')):.1f}", fontsize=7)
    fig.suptitle("final samples at matched reward (a row of panels per target reward; a row per class)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _padded_tiles(grid: np.ndarray, rows: int, cols: int, pad: int = 1) -> np.ndarray:
    """The first `cols` tiles of each of `rows` rows of a saved sample grid, with grey lines between."""
    tile = grid.shape[0] // rows
    cols = min(cols, grid.shape[1] // tile)  # a run may have fewer samples per class
    t = grid[: rows * tile, : cols * tile].reshape(rows, tile, cols, tile).transpose(0, 2, 1, 3)
    t = np.pad(t, ((0, 0), (0, 0), (0, pad), (0, pad)), constant_values=128)
    return t.transpose(0, 2, 1, 3).reshape(rows * (tile + pad), cols * (tile + pad))


def load_study(out: Path) -> dict:
    return json.loads((Path(out) / "study.json").read_text())
