"""docs/backend.md against the code: its table of stable names is each package's `__all__`, its example
excerpts are the tested example files verbatim, and its step-by-step snippet runs."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "backend.md").read_text()


def sections() -> dict[str, str]:
    parts = re.split(r"^## ", DOC, flags=re.M)
    return {p.splitlines()[0].strip(): p for p in parts[1:]}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_stable_names_table_is_each_packages_all():
    rows = re.findall(r"^\| `(ddrl_engine\.\w+)` \| (.+) \|$", sections()["Stable names"], flags=re.M)
    assert {r[0] for r in rows} == {f"ddrl_engine.{p}" for p in ("ops", "algorithms", "sampling", "models", "rewards",
                                                                 "trainer")}
    for package, names in rows:
        module = importlib.import_module(package)
        listed = set(re.findall(r"`(\w+)`", names))
        assert listed == set(module.__all__), (package, listed ^ set(module.__all__))
        assert all(hasattr(module, n) for n in module.__all__), package


@pytest.mark.parametrize("section,example", [("Example (a): the pieces inside a Flow-GRPO-style loop", "flow_grpo_loop.py"),
                                             ("Example (b): our Trainer on your own model", "custom_policy_trainer.py")])
def test_example_excerpts_are_the_tested_files_verbatim(section, example):
    source = (ROOT / "examples" / example).read_text()
    blocks = python_blocks(sections()[section])
    assert blocks
    for block in blocks:
        assert block in source, f"docs/backend.md excerpt not in examples/{example}:\n{block}"


def test_the_step_by_step_snippet_runs(tmp_path):
    from tests.trainer_helpers import make_trainer, tiny_config

    (snippet,) = python_blocks(sections()["The Trainer's step, for outside loops"])
    trainer = make_trainer(tiny_config(tmp_path, "ddrl", steps=2))
    scope = {"trainer": trainer}
    exec(compile(snippet, "docs/backend.md", "exec"), scope)
    assert scope["outcome"].advantages.shape == (trainer.rollout_batch,)
    assert scope["metrics"]["reward"] == scope["outcome"].metrics["reward"]
    assert trainer.step == 1 and trainer.checkpoints.latest() is not None
