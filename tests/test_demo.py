"""The main job's outputs, on a tiny configuration: summary.json exactly as specified, report, pictures."""
import json

from ddrl_engine.trainer.demo import run_demo
from tests.trainer_helpers import TINY_TOML



def test_demo_writes_summary_report_and_pictures(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_TOML)
    out = tmp_path / "demo"
    run_demo(out, config=cfg, progress=False, log=lambda *a: None)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"methods", "wall_seconds"}
    assert set(summary["methods"]) == {"base", "grpo", "grpo_kl", "ddrl"}
    for m in summary["methods"].values():
        assert set(m) == {"reward", "fd", "diversity", "heldout_data_loss"}
        assert all(isinstance(v, float) for v in m.values())
    assert isinstance(summary["wall_seconds"], float)
    report = (out / "report.md").read_text()
    assert "| ddrl |" in report and "curves.png" in report
    for pic in ("curves.png", "samples.png"):
        assert (out / pic).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The base model was cached: a second demo does not pretrain again.
    again = []
    run_demo(tmp_path / "demo2", config=cfg, progress=False, log=again.append)
    assert any("loaded from cache" in line for line in again)
