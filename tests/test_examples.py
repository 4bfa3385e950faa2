"""examples/wan_video_fsdp.py end to end on a tiny random Wan model (one process; 2 ranks with FSDP2
under torchrun, slow) and tools/launch_slurm.sh (help and dry run; SLURM is not installed here)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.example_loader import load_example  # noqa: E402

pytest.importorskip("diffusers", reason="diffusers is an optional dependency (pip install ddrl-engine[diffusers])")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "wan_video_fsdp.py"
CONFIG = ROOT / "examples" / "wan_video_fsdp.toml"
SLURM = ROOT / "tools" / "launch_slurm.sh"


def example():
    return load_example("wan_video_fsdp")


def train_lines(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tiny = tmp_path_factory.mktemp("wan") / "tiny"
    assert example().main(["--config", str(CONFIG), "--tiny", str(tiny), "--parallel", "none", "--steps", "2"]) == 0
    return tiny


def test_example_trains_in_one_process(one_process, capsys):
    run = one_process / "run"
    lines = train_lines(run)
    assert [r["step"] for r in lines] == [1, 2]
    for r in lines:
        assert all(math.isfinite(r[k]) for k in ("reward", "policy_loss", "data_loss", "grad_norm"))
        assert r["data_loss"] > 0 and r["grad_norm"] > 0
    assert lines[0]["ratio_dev_first"] == 0.0  # on-policy: the training forward reproduces the rollout
    assert (run / "checkpoints" / "step_0000002").is_dir()
    # A rerun with more steps resumes from the checkpoint instead of starting over.
    assert example().main(["--config", str(CONFIG), "--tiny", str(one_process), "--parallel", "none", "--steps", "3"]) == 0
    assert [r["step"] for r in train_lines(run)] == [1, 2, 3]


def test_example_errors_name_the_input(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[wan]\nmodel_dir = "m"\nlatent = "x"\n')
    with pytest.raises(ValueError, match="unknown field.*latent"):
        example().main(["--config", str(bad)])
    bad.write_text('[wan]\nmodel_dir = "m"\n')
    with pytest.raises(ValueError, match="missing prompts, latents"):
        example().main(["--config", str(bad)])
    bad.write_text(f'[wan]\nmodel_dir = "m"\nprompts = "{tmp_path}/none.pt"\nlatents = "l"\n')
    with pytest.raises(FileNotFoundError, match="prompt embedding file"):
        example().main(["--config", str(bad)])
    (tmp_path / "occupied").mkdir()
    with pytest.raises(FileExistsError, match="not a tiny example folder"):
        example().main(["--config", str(CONFIG), "--tiny", str(tmp_path / "occupied")])


@pytest.mark.slow
def test_example_under_torchrun_with_fsdp2(one_process, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE),
           "--config", str(CONFIG), "--tiny", str(one_process), "--parallel", "fsdp", "--steps", "2",
           "--out", str(tmp_path / "run")]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    fsdp, plain = train_lines(tmp_path / "run"), train_lines(one_process / "run")[:2]
    assert [r["step"] for r in fsdp] == [1, 2]
    assert (tmp_path / "run" / "checkpoints" / "step_0000002" / ".metadata").is_file()  # a DCP checkpoint
    # The toml's FSDP2 + activation checkpointing run reproduces the one-process run (float tolerance).
    for got, want in zip(fsdp, plain):
        for k in ("reward", "data_loss", "grad_norm", "adv_abs"):
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), (got["step"], k)


def slurm(*args, env=None):
    return subprocess.run(["bash", str(SLURM), *args], cwd=ROOT, capture_output=True, text=True, timeout=30,
                          env={k: v for k, v in (env or os.environ).items() if not k.startswith("SLURM_")})


def test_slurm_help_and_dry_run(tmp_path):
    out = slurm("--help")
    assert out.returncode == 0 and "usage:" in out.stdout and "--dry-run" in out.stdout
    out = slurm("--dry-run", "--nodes", "gpu-001,gpu-002", "--max-restarts", "1", "--", "-m", "ddrl_engine.cli",
                "train", "--config", "my run.toml")
    assert out.returncode == 0, out.stderr
    cmd = out.stdout.splitlines()[-1]
    for part in ("srun --nodes=2 --ntasks-per-node=1", "torchrun --nnodes 2 --nproc_per_node 8",
                 "--rdzv_backend c10d --rdzv_endpoint gpu-001:29500", "--max-restarts 1",
                 "-m ddrl_engine.cli train --config my\\ run.toml"):
        assert part in cmd, (part, cmd)
    # Inside an allocation the nodes come from scontrol (faked here), the job id from SLURM_JOB_ID.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\nprintf 'node-a\\nnode-b\\nnode-c\\n'\n")
    (fake / "scontrol").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(SLURM), "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=30,
                          env=env | {"SLURM_JOB_NODELIST": "node-[a-c]", "SLURM_JOB_ID": "4242"})
    assert proc.returncode == 0, proc.stderr
    assert "--nnodes 3" in proc.stdout and "node-a:29500 --rdzv_id 4242" in proc.stdout
    assert "examples/wan_video_fsdp.py --config examples/wan_video_fsdp.toml" in proc.stdout


def test_slurm_errors():
    assert "no node list" in slurm("--dry-run").stderr
    assert "not inside a SLURM job" in slurm("--nodes", "a").stderr
    assert "--port must be" in slurm("--dry-run", "--nodes", "a", "--port", "x").stderr
    out = slurm("--bogus")
    assert out.returncode == 2 and "unknown option '--bogus'" in out.stderr
