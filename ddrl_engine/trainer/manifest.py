"""Checkpoint manifests: what a whole checkpoint holds, so a resume can tell a whole one from a damaged one.

Every checkpoint folder gets manifest.json, written last before the folder is renamed into place:
{"format": 1, "run_id": ..., "seq": ..., "step": ..., "files": {relative path: {"size", "sha256"}}}.
`run_id` names the run that wrote it (a fresh id per run; a resumed run keeps its checkpoint's id), `seq`
orders checkpoints by when they were written (one more than any seq already in the folder), which is
what pruning and the fallback go by: never step numbers, which a restarted run repeats.

`verify(path)` re-hashes the files; `find_resumable(root)` picks the checkpoint to resume from: the one
`latest` names when it is whole, else the newest whole one by write order, with a warning naming what
was wrong. A folder whose checkpoints are all damaged is an error, never a silent fresh start.
Checkpoints written before manifests existed (no manifest.json) are taken as whole when their files
are there (they cannot be checked) and ordered after every manifest by step.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT = 1
_CHUNK = 8 << 20


class CheckpointError(OSError):
    """A checkpoint cannot be written or read; the message names the file and what to do (an OSError:
    code that caught a failed checkpoint write as one keeps working)."""


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: Path) -> dict | None:
    """The manifest of checkpoint folder `path`, None when it has none (a checkpoint from before
    manifests); a manifest that does not parse is returned as {} (the checkpoint is damaged)."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else {}


def next_seq(root: Path) -> int:
    """One more than the largest write sequence number of the checkpoints under `root`."""
    seqs = [m.get("seq", 0) for p in checkpoint_dirs(root) if (m := read_manifest(p))]
    return max(seqs, default=0) + 1


def write_manifest(folder: Path, *, run_id: str, seq: int, step: int) -> None:
    """Hashes every file under `folder` (a checkpoint being written) into folder/manifest.json."""
    files = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            files[f.relative_to(folder).as_posix()] = {"size": f.stat().st_size, "sha256": file_digest(f)}
    body = {"format": FORMAT, "run_id": run_id, "seq": seq, "step": step, "written_at": time.time(), "files": files}
    (folder / MANIFEST).write_text(json.dumps(body, indent=1))


def verify(path: Path, *, required: tuple[str, ...] = ("state.pt",)) -> str | None:
    """Why checkpoint folder `path` is not whole (naming the file), or None when it is."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} does not exist"
    manifest = read_manifest(path)
    if manifest is None:  # before manifests: only the presence of the files can be checked
        missing = [n for n in required if not (path / n).is_file()]
        return f"{path / missing[0]} is missing" if missing else None
    if not manifest:
        return f"{path / MANIFEST} is unreadable"
    for rel, want in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != want.get("size"):
            return f"{f} has {size} bytes, the manifest says {want.get('size')} (truncated or overwritten)"
        if file_digest(f) != want.get("sha256"):
            return f"{f} does not match its checksum in {MANIFEST} (the file was changed or corrupted)"
    return None


def checkpoint_dirs(root: Path) -> list[Path]:
    """The checkpoint folders under `root` (step_*, not the temporary ones being written)."""
    root = Path(root)
    return [p for p in root.glob("step_*") if p.is_dir()] if root.is_dir() else []


def write_order(paths: list[Path]) -> list[Path]:
    """`paths` oldest first: checkpoints without a manifest (older) by step, then by write sequence."""
    def key(p: Path):
        m = read_manifest(p)
        return (1, m.get("seq", 0), p.name) if m else (0, 0, p.name)

    return sorted(paths, key=key)


@dataclass
class Resumable:
    """The checkpoint to resume from (None: the folder holds no checkpoint) and what was wrong."""

    path: Path | None
    warnings: list[str]


def find_resumable(root: Path) -> Resumable:
    """The checkpoint under `root` a resume should load (see the module docstring)."""
    root = Path(root)
    dirs = checkpoint_dirs(root)
    notes: list[str] = []
    marker = root / LATEST
    named = None
    if marker.is_file():
        name = marker.read_text().strip()
        named = root / name
        if not named.is_dir():
            notes.append(f"{marker} names {name!r}, which does not exist")
            named = None
        elif (why := verify(named)) is not None:
            notes.append(f"the checkpoint {marker} names is damaged: {why}")
            named = None
    elif dirs:
        notes.append(f"{marker} is missing although {len(dirs)} checkpoint folder(s) exist")
    if named is not None:
        return Resumable(named, notes)
    reasons = []
    for p in reversed(write_order(dirs)):
        why = verify(p)
        if why is None:
            if notes:
                notes.append(f"resuming from {p.name}, the newest whole checkpoint")
            return Resumable(p, notes)
        reasons.append(why)
    if dirs:
        raise CheckpointError(f"no whole checkpoint under {root}: " + "; ".join(notes + reasons)
                              + ". Fix or move the folder, or start over with --restart (a new run; the old "
                              "checkpoints are kept)")
    return Resumable(None, notes)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True
