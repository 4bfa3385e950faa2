"""tools/gpu_check.sh without a GPU: its dry-run mode walks every section (each runs a stand-in
command under the same timeout and budget logic), so the section list, the per-file timeouts, the
status of a failing or hanging section, the budget cut and the summary table are all checked here."""
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def gpu_test_files() -> list[str]:
    """Test files holding GPU tests, found independently of the script's own grep."""
    files = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        text = path.read_text()
        if "mark.gpu" in text or "CUDA_PARAM" in text:
            files.append(path.name)
    return files


def dry_run(tmp_path, **env):
    out = tmp_path / "out"
    full_env = dict(os.environ, OUT=str(out), GPU_CHECK_DRY_RUN="1", **env)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout, took


def table_rows(out: Path) -> dict[str, str]:
    rows = {}
    for line in (out / "summary.md").read_text().splitlines():
        m = re.match(r"^\| (.+?) \| (.+?) \| (\d+) \|$", line)
        if m and m.group(1) != "section":
            rows[m.group(1)] = m.group(2)
    return rows


def test_every_section_is_in_the_table_with_per_file_timeouts(tmp_path):
    out, log, _ = dry_run(tmp_path)
    rows = table_rows(out)
    files = gpu_test_files()
    assert "test_ops_cuda.py" in files and "test_fp8_attention.py" in files
    for name in files:
        assert rows.get(f"tests: {name}") == "ok", rows
        # each file alone, under the default 120 s limit (a hang names the file)
        assert re.search(rf"== tests: {re.escape(name)} \(at most 120 s", log), name
        assert re.search(rf"would run: .*-m gpu and not slow tests/{re.escape(name)}$", log, re.M), name
    for section in ("build", "fp8 vs emulation: extra shapes", "memcheck: fp8 (1, 2, 129, 131, 64)",
                    "memcheck: row ops (3, 7)", "memcheck: row ops (5, 8193)", "bench_ops bf16 64M",
                    "bench_ops fp32 64M", "bench_attention", "bench_step"):
        assert rows.get(section) == "ok", (section, rows)
    assert len(re.findall(r"would run: \S*compute-sanitizer --tool memcheck", log)) == 3
    assert re.search(r"sanitize_rows\.py 3 7$", log, re.M) and re.search(r"sanitize_rows\.py 5 8193$", log, re.M)
    assert f"{len(rows)} sections, 0 not ok" in (out / "summary.md").read_text()
    # the device tool returns at most 8 files, none nested
    assert len(list(out.iterdir())) <= 8 and all(p.is_file() for p in out.iterdir())


def test_a_hang_and_a_failure_name_their_section(tmp_path):
    out, log, took = dry_run(tmp_path, GPU_CHECK_TEST_TIMEOUT_S="2", GPU_CHECK_DRY_HANG="tests: test_graphs.py",
                             GPU_CHECK_DRY_FAIL="memcheck: row ops (3, 7)")
    rows = table_rows(out)
    assert rows["tests: test_graphs.py"] == "TIMEOUT (cut at 2 s)"
    assert rows["memcheck: row ops (3, 7)"] == "FAILED (rc 3)"
    # the rest still ran: one hang costs its own limit, not the run
    assert rows["tests: test_ops_cuda.py"] == "ok" and rows["bench_step"] == "ok"
    assert "2 not ok" in (out / "summary.md").read_text()
    assert took < 60


def test_budget_skips_late_sections_and_says_so(tmp_path):
    out, _, took = dry_run(tmp_path, GPU_CHECK_BUDGET_S="24", GPU_CHECK_DRY_CMD="sleep 2",
                           GPU_CHECK_SECTIONS="build tests bench_ops")
    rows = table_rows(out)
    assert rows["build"] == "ok"
    skipped = [name for name, status in rows.items() if status == "skipped (budget spent)"]
    assert skipped and "bench_ops fp32 64M" in skipped
    assert not any(name.startswith("bench_attention") for name in rows)  # not selected: not run, not listed
    assert took < 40


@pytest.mark.parametrize("name", ["fp8_shapes", "sanitize_fp8", "sanitize_rows"])
def test_embedded_python_checks_compile(name):
    text = SCRIPT.read_text()
    m = re.search(rf"cat > \"\$WORK/{name}\.py\" <<'EOF'\n(.*?)\nEOF\n", text, re.S)
    assert m, name
    compile(m.group(1), f"{name}.py", "exec")
