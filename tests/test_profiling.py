"""Profiling: the phase ranges (names, torch.profiler records, overhead), the harness on CPU, the
step benchmark on CPU, and the Nsight wrappers' --help (Nsight itself needs a GPU)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddrl_engine.profiling import PHASES, TORCH_PREFIX, phase
from ddrl_engine.sampling import RolloutRunner, rollout
from ddrl_engine.trainer.profiling import build_trainer, phase_rows, profile_run
from tests.test_sampling import SAMPLE_SHAPE, TinyPolicy, make_case
from tests.trainer_helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_phase_name_is_an_error():
    with pytest.raises(ValueError, match="unknown range name 'rolout'"):
        phase("rolout")


def test_every_phase_is_documented():
    readme = (ROOT / "profiling" / "README.md").read_text()
    missing = [name for name in PHASES if f"`{name}`" not in readme]
    assert not missing, f"profiling/README.md does not document {missing}"


def test_rollout_ranges_reach_torch_profiler():
    sampler, policy = make_case("rf"), TinyPolicy()
    cond = torch.arange(4) % 3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        rollout(policy, sampler, cond, generator=torch.Generator().manual_seed(0), sample_shape=SAMPLE_SHAPE)
        RolloutRunner(policy, sampler, sample_shape=SAMPLE_SHAPE)(cond, generator=torch.Generator().manual_seed(0))
    counts = {r.name: r.count for r in phase_rows(prof)}
    assert counts == {"rollout": 2, "rollout/step": 2 * sampler.num_steps, "rollout/finish": 2}


def test_ranges_cost_next_to_nothing_when_not_profiling():
    n = 20000
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for k in range(n):
            with phase("rollout/step", k % 10):
                pass
        best = min(best, (time.perf_counter() - t0) / n)
    # Measured ~1 us on a 2-core VM (Python's with-statement dominates); a DiT forward is >= 100 us.
    assert best < 20e-6, f"a phase range costs {best * 1e6:.1f} us"


def test_harness_profiles_training_steps_on_cpu(tmp_path):
    trainer = build_trainer(tiny_config(tmp_path / "run"))
    s = profile_run(trainer, steps=1, warmup=1, out_dir=tmp_path / "prof")
    names = {row["name"] for row in s["phases"]}
    assert {"step", "collect", "rollout", "rollout/step", "reward", "advantage", "update", "train/step",
            "train/forward", "train/data_loss", "train/backward", "optimizer", "checkpoint"} <= names
    md = (tmp_path / "prof" / "phases.md").read_text()
    assert "| `rollout/step` | 4 |" in md  # K = 4 sampling steps per training step
    trace = json.loads((tmp_path / "prof" / "trace.json").read_text())
    assert any(e.get("name") == TORCH_PREFIX + "rollout" for e in trace["traceEvents"])
    assert json.loads((tmp_path / "prof" / "phases.json").read_text())["steps"] == 1


@pytest.mark.parametrize("script", ["tools/nsys_profile.sh", "tools/ncu_kernels.sh"])
def test_nsight_wrappers_help(script):
    r = subprocess.run(["bash", str(ROOT / script), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "Usage:" in r.stdout
    bad = subprocess.run(["bash", str(ROOT / script), "--no-such-flag"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


@pytest.mark.parametrize("script", ["profiling/harness.py", "tools/bench_step.py"])
def test_python_tools_help(script):
    r = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=60,
                       cwd=ROOT)
    assert r.returncode == 0 and "usage:" in r.stdout


def test_bench_step_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "tools/bench_step.py", "--device", "cpu", "--configs", "video", "--steps", "1",
                        "--warmup", "0", "--json", str(out)], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["variant"]: row for row in json.loads(out.read_text())["configs"]["video"]["rows"]}
    assert rows["baseline"]["samples_per_s"] > 0 and rows["engine"]["samples_per_s"] > 0
    assert "needs CUDA" in rows["engine+graphs"]["skipped"]
