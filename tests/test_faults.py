"""Crashes, corruption and full disks around checkpoints and metrics.jsonl (the reliability issue).

Each test builds the damage a real failure leaves (a kill mid-write, flipped bytes, a deleted folder,
a full disk) on a tiny run and checks that nothing is silently lost: the resume names what was wrong
and continues from the newest whole checkpoint, or stops with an error naming the file.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid

import pytest

from ddrl_engine.trainer import checkpoint as ckpt_mod
from ddrl_engine.trainer.checkpoint import CheckpointManager, latest_checkpoint
from ddrl_engine.trainer.manifest import CheckpointError, read_manifest, verify
from tests.trainer_helpers import make_trainer, tiny_config, with_run


def _run(out, steps=4, **run):
    cfg = with_run(tiny_config(out, "ddrl", steps=steps), **run)
    t = make_trainer(cfg)
    t.train()
    return t


def _ckpts(out):
    return sorted(p.name for p in (out / "checkpoints").glob("step_*"))


def _flip_bytes(f, at=None):
    data = bytearray(f.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i : i + 8] = bytes(b ^ 0xFF for b in data[i : i + 8])
    f.write_bytes(bytes(data))


def _resume(out, steps=4, **run):
    t = make_trainer(with_run(tiny_config(out, "ddrl", steps=steps), **run))
    return t, t.resume()


def test_manifest_written_and_verified(tmp_path):
    _run(tmp_path, steps=2, ckpt_every=2)
    path = latest_checkpoint(tmp_path / "checkpoints")
    m = read_manifest(path)
    assert m["step"] == 2 and m["run_id"] and "model.safetensors" in m["files"] and "state.pt" in m["files"]
    assert verify(path) is None


@pytest.mark.parametrize("victim", ["model.safetensors", "state.pt"])
def test_corrupt_newest_falls_back_to_previous(tmp_path, victim):
    _run(tmp_path, steps=4, ckpt_every=2)
    assert _ckpts(tmp_path) == ["step_0000002", "step_0000004"]
    _flip_bytes(tmp_path / "checkpoints" / "step_0000004" / victim)
    with pytest.warns(UserWarning, match=victim):
        t, ok = _resume(tmp_path)
    assert ok and t.step == 2


def test_truncated_file_is_named(tmp_path):
    _run(tmp_path, steps=2, ckpt_every=2)
    f = tmp_path / "checkpoints" / "step_0000002" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    assert "model.safetensors" in verify(f.parent) and "bytes" in verify(f.parent)
    t = make_trainer(tiny_config(tmp_path, "ddrl", steps=4))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        t.resume(f.parent)  # an explicit path: no fallback, the damage named


def test_garbled_checkpoint_without_manifest_names_the_file(tmp_path):
    # A checkpoint from before manifests cannot be verified; reading it still names the bad file.
    _run(tmp_path, steps=2, ckpt_every=2)
    path = tmp_path / "checkpoints" / "step_0000002"
    (path / "manifest.json").unlink()
    _flip_bytes(path / "model.safetensors", at=0)  # the header length
    t = make_trainer(tiny_config(tmp_path, "ddrl", steps=4))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        t.resume()


def test_missing_latest_resumes_newest_whole_with_warning(tmp_path):
    _run(tmp_path, steps=4, ckpt_every=2)
    (tmp_path / "checkpoints" / "latest").unlink()
    with pytest.warns(UserWarning, match="latest is missing"):
        t, ok = _resume(tmp_path)
    assert ok and t.step == 4


def test_wrong_latest_and_deleted_newest_folder(tmp_path):
    _run(tmp_path, steps=4, ckpt_every=2)
    shutil.rmtree(tmp_path / "checkpoints" / "step_0000004")
    with pytest.warns(UserWarning, match="does not exist"):
        t, ok = _resume(tmp_path)
    assert ok and t.step == 2
    t.train()  # continues, and prunes nothing it should keep
    assert _ckpts(tmp_path) == ["step_0000002", "step_0000004"]
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_0000004"


def test_all_damaged_is_an_error_not_a_fresh_start(tmp_path):
    _run(tmp_path, steps=4, ckpt_every=2)
    for p in (tmp_path / "checkpoints").glob("step_*"):
        _flip_bytes(p / "state.pt")
    t = make_trainer(tiny_config(tmp_path, "ddrl", steps=4))
    with pytest.raises(CheckpointError, match="no whole checkpoint.*state.pt.*--restart"):
        t.resume()
    assert t.step == 0


def test_prune_keeps_newest_of_this_run(tmp_path):
    _run(tmp_path, steps=6, ckpt_every=2, keep_checkpoints=2)
    assert _ckpts(tmp_path) == ["step_0000004", "step_0000006"]


def test_restarted_run_keeps_its_own_and_the_old_checkpoints(tmp_path):
    _run(tmp_path, steps=6, ckpt_every=2, keep_checkpoints=2)
    old_id = read_manifest(tmp_path / "checkpoints" / "step_0000006")["run_id"]
    # A new run in the same folder (what --restart does): its step_2 is newer than the old step_6.
    new = _run(tmp_path, steps=2, ckpt_every=2, keep_checkpoints=2)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_0000002"
    assert read_manifest(tmp_path / "checkpoints" / "step_0000002")["run_id"] == new.checkpoints.run_id != old_id
    assert (tmp_path / "checkpoints" / "step_0000006").is_dir()  # another run's: never pruned by this one
    # The old log was set aside; the new one holds one run.
    assert (tmp_path / "metrics.jsonl.old-1").exists()
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # one run: no lines of the old one
    t, ok = _resume(tmp_path, steps=2)
    assert ok and t.step == 2 and t.checkpoints.run_id == new.checkpoints.run_id


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
    _run(tmp_path, steps=2, ckpt_every=2)
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"kind": "train", "step": 3, "policy_loss": 0.1, "rew')  # killed mid-write
    logs = []
    t = make_trainer(tiny_config(tmp_path, "ddrl", steps=3))
    t.log = logs.append
    assert t.resume() and t.step == 2
    assert any("dropped line" in m for m in logs)
    lines = metrics.read_text().splitlines()
    assert all(json.loads(ln)["step"] <= 2 for ln in lines)
    t.train()
    assert [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()][-1] == 3


def test_kill_before_first_checkpoint_leaves_no_duplicates(tmp_path):
    _run(tmp_path, steps=2, ckpt_every=0)  # metrics written, ckpt_every 0: only the last-step checkpoint
    shutil.rmtree(tmp_path / "checkpoints")  # as if killed before it
    first = (tmp_path / "metrics.jsonl").read_text()
    t, ok = _resume(tmp_path, steps=2, ckpt_every=0)
    assert not ok
    t.train()
    assert (tmp_path / "metrics.jsonl.old-1").read_text() == first
    assert [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_folders_are_removed_at_start(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir(parents=True)
    dead = root / f".step_0000002.tmp-{_dead_pid()}"
    dcp_tmp = root / ".step_0000004.tmp-dcp"
    live = root / f".step_0000006.tmp-{os.getppid()}"
    for d in (dead, dcp_tmp, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 1000)
    CheckpointManager(root).clean_stale_temps(log=lambda *_: None)
    assert not dead.exists() and not dcp_tmp.exists() and live.exists()


def test_injected_enospc_keeps_previous_checkpoint(tmp_path, monkeypatch):
    t = make_trainer(with_run(tiny_config(tmp_path, "ddrl", steps=4), ckpt_every=2))
    t.train(2)
    real = ckpt_mod.save_file

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_file", full_disk)
    with pytest.raises(CheckpointError, match="no space left on device.*step_0000002 is whole"):
        t.train(4)
    monkeypatch.setattr(ckpt_mod, "save_file", real)
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(root).name == "step_0000002" and verify(root / "step_0000002") is None
    assert not list(root.glob(".*tmp*")), "the partial checkpoint folder must be removed"


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); the injected-ENOSPC test covers it")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_full_disk(small_tmpfs):
    out = small_tmpfs / "run"
    t = make_trainer(with_run(tiny_config(out, "ddrl", steps=4), ckpt_every=2))
    t.train(2)
    filler = small_tmpfs / "filler"
    with open(filler, "wb") as f:  # fill the disk to the last byte
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    with pytest.raises(CheckpointError, match="no space left on device"):
        t.train(4)
    filler.unlink()
    root = out / "checkpoints"
    assert latest_checkpoint(root).name == "step_0000002" and verify(root / "step_0000002") is None
    t2, ok = _resume(out)
    assert ok and t2.step == 2


def test_sigint_checkpoints_and_exits_130(tmp_path):
    cfg = with_run(tiny_config(tmp_path, "ddrl", steps=6), ckpt_every=0)
    t = make_trainer(cfg)
    inner = t.train_step

    def step_then_ctrl_c():
        m = inner()
        if t.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return m

    t.train_step = step_then_ctrl_c
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with pytest.raises(SystemExit) as e:
        t.train()
    assert e.value.code == 130
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_0000002"
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back


# ---- every bad value is one line naming the field, before any pretraining --------------------------

NAN, INF = float("nan"), float("inf")
BAD_VALUES = [
    ("[algorithm]\nbeta_data = nan", "algorithm.beta_data"),
    ("[algorithm]\nadv_clip = nan", "algorithm.adv_clip"),
    ("[optim]\nema_decay = 2.0", "optim.ema_decay"),
    ("[optim]\nlr = inf", "optim.lr"),
    ("[optim]\nlr = nan", "optim.lr"),
    ("[optim]\nbeta1 = 1.5", "optim.beta1"),
    ("[optim]\ngrad_clip = nan", "optim.grad_clip"),
    ("[model]\nnum_classes = 0", "num_classes"),
    ("[run]\ndevice = 'tpu'", "run.device"),
    ("[run]\nseed = -1", "run.seed"),
    ("[run]\nheldout_rise_threshold = nan", "run.heldout_rise_threshold"),
    ("[algorithm]\ntrain_steps = [99]", "algorithm.train_steps"),
    ("[data]\nbatch_size = 7", "data.batch_size"),
    ("[rewards]\nnope = 1.0", "rewards.nope"),
    ("[rewards]\nbrightness = nan", "rewards.brightness"),
    ("[sampler]\nnoise_level = -1.0", "noise_level"),
    ("[sampler]\nshift = 0.0", "shift"),
    ("[reward_workers]\ntimeout_s = nan", "reward_workers.timeout_s"),
    ("[model]\nhidden = 1048576\nheads = 1", "GiB"),
    ("[rollout]\nconditions_per_step = 1000000000", "GiB"),
]
if not __import__("torch").cuda.is_available():
    BAD_VALUES.append(("[run]\ndevice = 'cuda'", "run.device"))


@pytest.mark.parametrize("toml, field", BAD_VALUES, ids=[b[0].replace("\n", " ") for b in BAD_VALUES])
def test_bad_values_fail_at_load_before_pretraining(tmp_path, monkeypatch, capsys, toml, field):
    import ddrl_engine.trainer.pretrain as pretrain
    from ddrl_engine.cli import main

    monkeypatch.setattr(pretrain, "pretrain_base", lambda *a, **k: pytest.fail("pretraining started"))
    f = tmp_path / "bad.toml"
    f.write_text(toml + "\n")
    assert main(["train", "--config", str(f), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0], err


def test_world_size_must_divide_the_batch(monkeypatch):
    from ddrl_engine.trainer.config import config_from_dict
    from ddrl_engine.trainer.validate import check_runnable

    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = config_from_dict({"distributed": {"parallel": "ddp"}})
    with pytest.raises(ValueError, match="divisible by the world size \\(3\\)"):
        check_runnable(cfg)
