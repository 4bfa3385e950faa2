"""Checkpoints: one manager for one-process and distributed runs, atomic, resumable at any world size.

A checkpoint is root/step_XXXXXXX holding a trainer's `state_dict()`:
- one process: each module's weights as <name>.safetensors (model, ema, reference), everything else
  (optimizer, LR schedule, step, RNG and generator states, data order, monitors) in state.pt;
- distributed (torch.distributed.checkpoint): the modules and the optimizer as DCP shards (resharded
  on load: any world size, or one process), the rest in state.pt from rank 0; distributed.json.
It is written under a temporary name, fsynced and renamed into place, then `latest` is switched with
an atomic file replace: a crash at any moment leaves the previous checkpoint whole.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from ddrl_engine.models.trainable import select_trainable, trainable_keys

LATEST = "latest"
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


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def publish(tmp: Path, final: Path, *, config: dict | None, keep: int) -> Path:
    """Finishes a checkpoint written into `tmp`: config.json, fsync, rename to `final`, switch
    `latest`, prune old ones. Until the rename nothing of it is visible."""
    if config is not None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    for f in tmp.rglob("*"):  # data on disk before the rename makes it visible
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(final.parent / LATEST, final.name)
    _prune(final.parent, keep)
    return final


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

    def __init__(self, root: str | Path, *, dist=None, keep: int = 2):
        self.root, self.dist, self.keep = Path(root), dist, keep

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def save(self, step: int, state: dict, *, config: dict | None = None) -> Path:
        """Writes `state` ({module name: tensors, "optimizer": ..., "trainer": {...}}) as step `step`."""
        final = self.root / f"step_{step:07d}"
        if self.dist is not None:
            return self._save_dcp(final, state, config)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{final.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        rest = dict(state[TRAINER_KEY])
        for name, tensors in state.items():
            if name == OPTIMIZER_KEY:
                rest[OPTIMIZER_KEY] = tensors
            elif name != TRAINER_KEY:
                save_file(_plain(tensors), str(tmp / f"{name}.safetensors"))
        torch.save(rest, tmp / "state.pt")
        return publish(tmp, final, config=config, keep=self.keep)

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
            publish(tmp, final, config=config, keep=self.keep)
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
                    rest = torch.load(path / "state.pt", map_location=map_location, weights_only=False)
                if name == OPTIMIZER_KEY:
                    out[name] = rest[OPTIMIZER_KEY]
                else:
                    out[name] = {k: v for k, v in rest.items() if k != OPTIMIZER_KEY}
                continue
            f = path / f"{name}.safetensors"
            if not f.exists():
                raise FileNotFoundError(f"checkpoint {path} has no {f.name}")
            _check_fits(path, name, _safetensors_shapes(f), tensors)
            out[name] = load_file(str(f), device=str(map_location))
        return out

    def _load_dcp(self, path: Path, template: dict, map_location) -> dict:
        tensors = {k: v for k, v in template.items() if k != TRAINER_KEY}
        for name, sd in tensors.items():
            if name != OPTIMIZER_KEY:
                _check_fits(path, name, _dcp_shapes(path, name), sd)
        with warnings.catch_warnings():  # without a process group DCP warns that it loads in one process: intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(tensors, checkpoint_id=str(path))
        if TRAINER_KEY in template:
            tensors[TRAINER_KEY] = torch.load(path / "state.pt", map_location=map_location, weights_only=False)
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
