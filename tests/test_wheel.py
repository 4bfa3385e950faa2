"""A real (non-editable) wheel works: what an editable install hides (packages find_packages misses,
package data, _build_info.json written into the wrong tree).

Builds a CPU-only wheel from a copy of the checkout's files (what a clean clone holds: no build/,
no _C*.so, no _build_info.json), installs it into a folder of its own and runs it from outside the
source tree with only that folder on PYTHONPATH.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from tests.trainer_helpers import TINY_TOML
from tests.worker_share import worker_cores

ROOT = Path(__file__).resolve().parents[1]

# What `python -c` checks inside the installed copy; prints a JSON line for the test to read.
CHECK_IMPORTS = """
import json, sys
import ddrl_engine, ddrl_engine.trainer, ddrl_engine._C
from ddrl_engine._loader import build_info
from ddrl_engine.trainer import Trainer, load_config
from ddrl_engine.trainer.demo import DEMO_CONFIG
assert callable(Trainer.train), Trainer
cfg = load_config(DEMO_CONFIG)
print(json.dumps({"ddrl_engine": ddrl_engine.__file__, "trainer": ddrl_engine.trainer.__file__,
                  "ext": ddrl_engine._C.__file__, "demo_config": str(DEMO_CONFIG),
                  "demo_config_is_file": DEMO_CONFIG.is_file(), "demo_steps": cfg.run.steps,
                  "build_info": build_info(), "sys_path": sys.path}))
"""


def _checkout_files() -> list[str]:
    """The checkout's files, relative to ROOT: tracked ones plus new ones not ignored (what the next
    commit will hold), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sorted({p for p in out.decode().split("\0") if p and (ROOT / p).is_file()})


def _copy_sources(dest: Path) -> list[str]:
    files = _checkout_files()
    if files is None:  # e.g. an unpacked sdist: everything but build outputs
        ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "*.o",
                                        "_build_info.json", ".pytest_cache")
        shutil.copytree(ROOT, dest, ignore=ignore)
        return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    return files


def _run(cmd, timings, what, **kw):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    timings[what] = time.perf_counter() - t0
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}): {' '.join(map(str, cmd))}\n" \
                                 f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.slow
def test_cpu_wheel_builds_installs_and_runs_outside_the_source_tree(tmp_path):
    t_start = time.perf_counter()
    timings = {}
    src, wheels, site, work = (tmp_path / d for d in ("src", "wheels", "site", "work"))
    work.mkdir()
    files = _copy_sources(src)

    base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}
    base_env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # CPU-only, and without debug info: the CFLAGS the build would use ($CFLAGS, else Python's; setuptools
    # puts $CFLAGS in their place) plus -g0, the same code compiled a third faster (the build is most of
    # this test's time).
    cflags = os.environ.get("CFLAGS", sysconfig.get_config_var("CFLAGS") or "")
    # Compile jobs: $MAX_JOBS, else this worker's share of the cores (at most 2).
    jobs = os.environ.get("MAX_JOBS") or str(min(2, worker_cores()))
    build_env = dict(base_env, DDRL_ENGINE_CUDA="0", MAX_JOBS=jobs, CFLAGS=f"{cflags} -g0".strip())
    pip = [sys.executable, "-m", "pip"]
    _run(pip + ["wheel", "--no-build-isolation", "--no-deps", "--no-index", "-w", str(wheels), str(src)],
         timings, "pip wheel", cwd=work, env=build_env, timeout=1200)
    (wheel,) = wheels.glob("ddrl_engine-*.whl")

    # The wheel holds every module of the package, its data, the extension and the build info.
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {f for f in files if f.startswith("ddrl_engine/") and f.endswith(".py")}
    assert modules, "no ddrl_engine/*.py among the checkout's files"
    assert not modules - names, f"modules missing from the wheel: {sorted(modules - names)}"
    configs = {f for f in files if f.startswith("ddrl_engine/configs/") and f.endswith(".toml")}
    assert "ddrl_engine/configs/demo.toml" in configs
    assert not configs - names, f"configs missing from the wheel: {sorted(configs - names)}"
    assert "ddrl_engine/_build_info.json" in names
    assert any(n.startswith("ddrl_engine/_C") and n.endswith((".so", ".pyd")) for n in names), sorted(names)
    # A non-editable build writes nothing into the sources it builds from.
    assert not (src / "ddrl_engine" / "_build_info.json").exists()

    _run(pip + ["install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
         timings, "pip install --target", cwd=work, env=base_env, timeout=600)

    env = dict(base_env, PYTHONPATH=str(site))  # DDRL_ENGINE_CACHE: the tests' own (conftest)
    out = _run([sys.executable, "-c", CHECK_IMPORTS], timings, "import check", cwd=work, env=env, timeout=300)
    seen = json.loads(out.strip().splitlines()[-1])
    for key in ("ddrl_engine", "trainer", "ext", "demo_config"):
        assert Path(seen[key]).resolve().is_relative_to(site.resolve()), (key, seen[key])
    assert seen["demo_config_is_file"] and seen["demo_steps"] > 0
    assert not any(p and Path(p).resolve() in (ROOT, ROOT / "ddrl_engine") for p in seen["sys_path"]), seen["sys_path"]
    info = seen["build_info"]
    assert info["with_cuda"] is False and info["no_cuda_reason"] == "DDRL_ENGINE_CUDA=0", info
    import torch

    assert info["torch_version"] == torch.__version__

    out = _run([sys.executable, "-m", "ddrl_engine.info"], timings, "python -m ddrl_engine.info",
               cwd=work, env=env, timeout=300)
    assert "ddrl-engine build:" in out and re.search(r"with_cuda\s+False", out), out
    out = _run([sys.executable, "-m", "ddrl_engine", "--help"], timings, "python -m ddrl_engine --help",
               cwd=work, env=env, timeout=300)
    assert "demo" in out and "train" in out, out

    script = site / "bin" / "ddrl-engine"
    cli = [sys.executable, "-m", "ddrl_engine"]
    if script.exists():  # pip --target puts console scripts in <target>/bin
        out = _run([str(script), "--help"], timings, "ddrl-engine --help", cwd=work, env=env, timeout=300)
        assert "demo" in out, out
        cli = [str(script)]

    (work / "tiny.toml").write_text(TINY_TOML)
    _run(cli + ["demo", "--out", "demo", "--steps", "2", "--config", "tiny.toml", "--no-progress"],
         timings, "ddrl-engine demo (tiny, 2 steps)", cwd=work, env=env, timeout=900)
    summary = json.loads((work / "demo" / "summary.json").read_text())
    assert set(summary["methods"]) == {"base", "grpo", "grpo_kl", "ddrl"}
    assert "| ddrl |" in (work / "demo" / "report.md").read_text()

    timings["total"] = time.perf_counter() - t_start
    print("\nwheel test timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
