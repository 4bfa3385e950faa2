"""Prompt files: the training (or evaluation) prompts of a text-conditioned run.

Two formats, chosen by the extension:
  - `.txt`: one prompt a line; surrounding whitespace is stripped and blank lines are skipped;
  - `.jsonl`: one JSON object a line with a non-empty "prompt" string (other fields are ignored);
    blank lines are skipped.
Duplicates are kept, in file order: prompt id i is the i-th prompt of the file, so a repeated prompt
is sampled more often (the embedding cache stores it once).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

PROMPT_SUFFIXES = (".txt", ".jsonl")


def read_prompts(path: Union[str, Path]) -> list[str]:
    """The prompts of a .txt or .jsonl file, in order (see the module docstring)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        raise ValueError(f"prompt file {str(path)!r}: unsupported extension {path.suffix!r}; "
                         f"expected one of {', '.join(PROMPT_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist or is not a file")
    prompts: list[str] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            prompts.append(_jsonl_prompt(path, lineno, line) if suffix == ".jsonl" else line)
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} holds no prompt (only blank lines or empty)")
    return prompts


def _jsonl_prompt(path: Path, lineno: int, line: str) -> str:
    where = f"prompt file {str(path)!r}, line {lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or "prompt" not in obj:
        raise ValueError(f"{where}: expected a JSON object with a \"prompt\" field, got {line[:80]!r}")
    prompt = obj["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: \"prompt\" must be a non-empty string, got {prompt!r}")
    return prompt.strip()
