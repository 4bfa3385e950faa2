"""Checkpoints: one manager for one-process and distributed runs, atomic, resumable at any world size.

A checkpoint is root/step_XXXXXXX holding a trainer's `state_dict()`:
- one process: each module's weights as <name>.safetensors (model, ema, reference), everything else
  (optimizer, LR schedule, step, RNG and generator states, data order, monitors) in state.pt;
- distributed (torch.distributed.checkpoint): the modules and the optimizer as DCP shards (resharded
  on load: any world size, or one process), the rest in state.pt from rank 0; distributed.json.
It is written under a temporary name with a manifest of sizes and checksums (trainer.manifest), fsynced
and renamed into place, then `latest` is switched with an atomic file replace: a crash at any moment
leaves the previous checkpoint whole. A resume verifies the manifest and falls back to the newest whole
checkpoint (with a warning) when the newest is damaged; pruning removes only this run's checkpoints, by
write order, never the one `latest` names. A full disk is one error saying so, the previous checkpoint whole.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from ddrl_engine.models.trainable import select_trainable, trainable_keys
from ddrl_engine.trainer.manifest import (LATEST, CheckpointError, checkpoint_dirs, find_resumable, next_seq, pid_alive,
                                          read_manifest, write_manifest, write_order)

DCP_METADATA = ".metadata"
TRAINER_KEY = "trainer"  # the non-tensor part of a state dict (state.pt)
OPTIMIZER_KEY = "optimizer"


def is_dcp_checkpoint(path: str | Path) -> bool:
    """Whether `path` was written by a distributed run (torch.distributed.checkpoint)."""
    return (Path(path) / DCP_METADATA).is_file()


def latest_checkpoint(root: str | Path) -> Path | None:
    root = Path(root)
    marker = root / LATEST
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    return path if path.is_dir() else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _prune(root: Path, keep: int, run_id: str, protect: Path) -> None:
    """Removes this run's checkpoints beyond the newest `keep` (by write order), never `protect` (the
    one `latest` names) nor checkpoints of other runs or from before manifests."""
    if keep <= 0:
        return
    ours = [p for p in write_order(checkpoint_dirs(root)) if (read_manifest(p) or {}).get("run_id") == run_id]
    for old in ours[:-keep]:
        if old.resolve() != protect.resolve():
            shutil.rmtree(old, ignore_errors=True)


def _disk_full(err: BaseException) -> bool:
    """Whether `err` is a write failing for want of space: an OSError, or the libraries' own errors
    (torch.save: RuntimeError "unexpected pos"; safetensors: SafetensorError "os error 28")."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return any(s in text for s in ("No space left", "os error 28", "Disk quota exceeded", "unexpected pos"))


def publish(tmp: Path, final: Path, *, config: dict | None, keep: int, run_id: str = "", step: int = 0) -> Path:
    """Finishes a checkpoint written into `tmp`: config.json, manifest.json, fsync, rename to `final`,
    switch `latest`, prune this run's old ones. Until the rename nothing of it is visible."""
    if config is not None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    write_manifest(tmp, run_id=run_id, seq=next_seq(final.parent), step=step)
    for f in tmp.rglob("*"):  # data on disk before the rename makes it visible
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(final.parent / LATEST, final.name)
    _prune(final.parent, keep, run_id, protect=final)
    return final


def _read(file: Path, reader):
    """reader(file), with any failure of the library reading it turned into one error naming the file."""
    try:
        return reader(file)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file {file} is missing ({e})") from e
    except Exception as e:  # safetensors / pickle / DCP errors do not name the file
        raise CheckpointError(f"cannot read checkpoint file {file}: {type(e).__name__}: {e}") from e


def _plain(sd: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def _check_fits(path: Path, name: str, saved: dict[str, tuple], wanted: dict[str, torch.Tensor]) -> None:
    """Raises a ValueError naming the checkpoint when its `name` weights are not this model's."""
    want = {k: tuple(v.shape) for k, v in wanted.items()}
    missing, unexpected = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    wrong = [f"'{k}' is {list(saved[k])} in the checkpoint but {list(want[k])} in the model"
             for k in sorted(set(want) & set(saved)) if tuple(saved[k]) != want[k]]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {', '.join(unexpected[:3])})")
        parts += wrong[:3]
        raise ValueError(f"checkpoint {path} was written for another model: its {name!r} weights do not fit "
                         f"({'; '.join(parts)})")


def _safetensors_shapes(file: Path) -> dict[str, tuple]:
    with safe_open(str(file), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _dcp_shapes(path: Path, name: str) -> dict[str, tuple]:
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = f"{name}."
    return {k[len(prefix):]: tuple(getattr(v, "size", ())) for k, v in meta.items() if k.startswith(prefix)}


class CheckpointManager:
    """Saves and loads a trainer's state dict under `root` (see the module docstring).

    dist: the run's `Distributed` context, or None for one process. A distributed run writes DCP
    checkpoints (every rank calls save/load); one process writes safetensors. Either kind loads in
    either kind of run: a one-process checkpoint into a distributed run is refused (its optimizer
    state is not sharded), a DCP checkpoint loads anywhere.
    """

    def __init__(self, root: str | Path, *, dist=None, keep: int = 2, run_id: str | None = None):
        self.root, self.dist, self.keep = Path(root), dist, keep
        # Names this run's checkpoints (pruning touches no other run's); a resume adopts the loaded one's.
        self.run_id = run_id or uuid.uuid4().hex

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def resumable(self, log=print) -> Path | None:
        """The checkpoint a resume should load: the one `latest` names when whole, else the newest whole
        one (each problem logged as a warning); None when there is none. CheckpointError when
        checkpoints exist but none is whole (never a silent fresh start)."""
        found = find_resumable(self.root)
        for note in found.warnings:
            warnings.warn(f"checkpoints: {note}", stacklevel=2)
            log(f"WARNING checkpoints: {note}")
        return found.path

    def adopt(self, path: Path) -> None:
        """Continue the run that wrote checkpoint `path` (its run id; pruning then covers its checkpoints)."""
        m = read_manifest(path)
        if m and m.get("run_id"):
            self.run_id = m["run_id"]

    def clean_stale_temps(self, log=print) -> list[Path]:
        """Removes what dead writers left: temporary checkpoint folders of processes that no longer run
        (and a distributed run's, whose writer is gone when a new run starts). Call before any save."""
        if not self.root.is_dir() or (self.dist is not None and self.dist.rank != 0):
            return []
        removed = []
        for p in self.root.glob(".*.tmp-*"):
            tag = p.name.rsplit(".tmp-", 1)[1]
            if tag.isdigit() and (int(tag) == os.getpid() or pid_alive(int(tag))):
                continue  # a live writer is still at it
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
            log(f"checkpoints: removed {p.name}, left by a writer that died")
        return removed

    def save(self, step: int, state: dict, *, config: dict | None = None) -> Path:
        """Writes `state` ({module name: tensors, "optimizer": ..., "trainer": {...}}) as step `step`.
        A full disk raises CheckpointError saying so; the partial folder is removed and the previous
        checkpoint stays whole and `latest`."""
        final = self.root / f"step_{step:07d}"
        if self.dist is not None:
            return self._save_dcp(final, state, config)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{final.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            rest = dict(state[TRAINER_KEY])
            for name, tensors in state.items():
                if name == OPTIMIZER_KEY:
                    rest[OPTIMIZER_KEY] = tensors
                elif name != TRAINER_KEY:
                    save_file(_plain(tensors), str(tmp / f"{name}.safetensors"))
            torch.save(rest, tmp / "state.pt")
            return publish(tmp, final, config=config, keep=self.keep, run_id=self.run_id, step=step)
        except Exception as e:  # nothing half-written stays behind, whatever failed
            shutil.rmtree(tmp, ignore_errors=True)
            raise self._write_error(final, e) from e

    def _write_error(self, final: Path, err: BaseException) -> BaseException:
        previous = self.latest()
        kept = f"the previous checkpoint {previous} is whole and still `latest`" if previous else "no earlier checkpoint exists"
        if _disk_full(err):
            return CheckpointError(f"no space left on device writing checkpoint {final} ({err}); {kept}. "
                                   "Free space on that disk and resume")
        if isinstance(err, OSError):
            return CheckpointError(f"cannot write checkpoint {final}: {err}; {kept}")
        return err

    def _save_dcp(self, final: Path, state: dict, config: dict | None) -> Path:
        ctx = self.dist
        tmp = self.root / f".{final.name}.tmp-dcp"
        if ctx.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        ctx.barrier()
        dcp.save({k: v for k, v in state.items() if k != TRAINER_KEY}, checkpoint_id=str(tmp))
        if ctx.rank == 0:
            torch.save(state[TRAINER_KEY], tmp / "state.pt")
            (tmp / "distributed.json").write_text(json.dumps({"world_size": ctx.world_size, "parallel": ctx.mode}))
            publish(tmp, final, config=config, keep=self.keep, run_id=self.run_id, step=int(state[TRAINER_KEY]["step"]))
        ctx.barrier()
        return final

    def load(self, path: str | Path, template: dict, *, map_location="cpu") -> dict:
        """The checkpoint at `path` as a state dict shaped like `template` (a trainer's state_dict(),
        or a part of it: e.g. {"ema": ...} alone). Weights are checked against the template's keys
        and shapes first: a checkpoint of another model is one error naming the file."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if is_dcp_checkpoint(path):
            return self._load_dcp(path, template, map_location)
        if self.dist is not None:
            raise ValueError(f"{path} is a one-process checkpoint; a distributed run resumes from checkpoints "
                             "of distributed runs (any world size, including a 1-process torchrun)")
        out, rest = {}, None
        for name, tensors in template.items():
            if name in (TRAINER_KEY, OPTIMIZER_KEY):
                if rest is None:
                    rest = _read(path / "state.pt", lambda f: torch.load(f, map_location=map_location, weights_only=False))
                if name == OPTIMIZER_KEY:
                    out[name] = rest[OPTIMIZER_KEY]
                else:
                    out[name] = {k: v for k, v in rest.items() if k != OPTIMIZER_KEY}
                continue
            f = path / f"{name}.safetensors"
            if not f.exists():
                raise FileNotFoundError(f"checkpoint {path} has no {f.name}")
            _check_fits(path, name, _read(f, _safetensors_shapes), tensors)
            out[name] = _read(f, lambda g: load_file(str(g), device=str(map_location)))
        return out

    def _load_dcp(self, path: Path, template: dict, map_location) -> dict:
        tensors = {k: v for k, v in template.items() if k != TRAINER_KEY}
        for name, sd in tensors.items():
            if name != OPTIMIZER_KEY:
                _check_fits(path, name, _dcp_shapes(path, name), sd)
        with warnings.catch_warnings():  # without a process group DCP warns that it loads in one process: intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            _read(path, lambda p: dcp.load(tensors, checkpoint_id=str(p)))
        if TRAINER_KEY in template:
            tensors[TRAINER_KEY] = _read(path / "state.pt",
                                         lambda f: torch.load(f, map_location=map_location, weights_only=False))
        return tensors


def load_weights(path: str | Path, module: nn.Module, *, names=("ema", "model"), map_location="cpu") -> str:
    """Loads the first of `names` that checkpoint `path` holds into `module` (the EMA weights when the
    run kept them); either checkpoint kind. A LoRA policy (frozen base + adapters, built as the run
    built it) loads the adapters. Returns the name loaded."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    dcp_kind = is_dcp_checkpoint(path)
    for name in names:
        if (dcp_kind and _dcp_shapes(path, name)) or (path / f"{name}.safetensors").exists():
            partial = trainable_keys(module) is not None  # a LoRA policy: the checkpoint holds its adapters
            template = {name: select_trainable(module, get_model_state_dict(module))}
            sd = CheckpointManager(path.parent).load(path, template, map_location=map_location)
            set_model_state_dict(module, sd[name], options=StateDictOptions(strict=not partial))
            return name
    raise FileNotFoundError(f"checkpoint {path} holds none of the weights {list(names)}")
