"""Loads the compiled extension, after checking it was built for the torch that is running.

A mismatch (extension built against another torch) otherwise shows up as an undefined-symbol
error deep in the import; here it is one sentence with the fix.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

_BUILD_INFO_PATH = Path(__file__).with_name("_build_info.json")
_REBUILD = "rebuild it against the installed torch: pip install --no-build-isolation . (-e . in a checkout)"


def build_info() -> dict:
    if not _BUILD_INFO_PATH.exists():
        raise ImportError(f"ddrl_engine's extension is not built ({_BUILD_INFO_PATH.name} missing); {_REBUILD}")
    return json.loads(_BUILD_INFO_PATH.read_text())


def load_extension():
    info = build_info()
    if info["torch_version"] != torch.__version__:
        raise ImportError(
            f"ddrl_engine._C was built against torch {info['torch_version']} but torch "
            f"{torch.__version__} is installed; {_REBUILD}"
        )
    try:
        from ddrl_engine import _C  # noqa: F401  (registers torch.ops.ddrl.*)
    except ImportError as e:
        raise ImportError(f"ddrl_engine._C failed to load ({e}); {_REBUILD}") from e
    return info


def cuda_ops_available() -> tuple[bool, str]:
    """Whether the ops can run on CUDA here, and why not when they cannot."""
    info = build_info()
    if not info["with_cuda"]:
        return False, f"extension built without CUDA ({info['no_cuda_reason']})"
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    return True, ""
