"""Atomic checkpoints: weights as safetensors, the rest (optimizer, RNG, counters) with torch.save.

A checkpoint is a directory written under a temporary name and renamed into place, then `latest`
is switched with an atomic file replace: a crash at any moment leaves the previous checkpoint whole.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def _state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(root: str | Path, step: int, *, modules: dict[str, torch.nn.Module], state: dict,
                    config: dict | None = None, keep: int = 2) -> Path:
    """Writes root/step_XXXXXXX/{<name>.safetensors..., state.pt, config.json} atomically."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, module in modules.items():
        save_file(_state_tensors(module), str(tmp / f"{name}.safetensors"))
    torch.save(state, tmp / "state.pt")
    return publish(tmp, final, config=config, keep=keep)


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


def latest_checkpoint(root: str | Path) -> Path | None:
    root = Path(root)
    marker = root / LATEST
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: str | Path, modules: dict[str, torch.nn.Module], map_location="cpu") -> dict:
    """Loads weights into `modules` (strict) and returns the saved state dict."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    for name, module in modules.items():
        f = path / f"{name}.safetensors"
        if not f.exists():
            raise FileNotFoundError(f"checkpoint {path} has no {f.name}")
        module.load_state_dict(load_file(str(f), device=str(map_location)))
    return torch.load(path / "state.pt", map_location=map_location, weights_only=False)
