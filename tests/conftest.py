import collections
import os
import tempfile

import pytest
import torch

from tests.worker_share import worker_cores

# torch.compile caches compiled graphs (backward formulas included) across processes, keyed without
# our ops' Python autograd code: a stale entry would test an old formula. Compile fresh per run.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddrl_inductor_")


# Under the README's `-n 2 --dist loadfile` each pytest-xdist worker takes whole files (module fixtures
# are built once), in this order: RUN_FIRST (the wheel build, 80-120 s in one test, which must not be left
# for last), then the other files by number of tests, most first (xdist's own order, which
# pytest_configure turns off to put RUN_FIRST ahead). Serially (`-n 0`) only the order of files changes.
RUN_FIRST = ("test_wheel.py",)

# The workers share the machine's cores: each takes its share of torch's threads (one each for -n 2 on
# 2 cores), so no worker's OpenMP threads spin against the other's (test_wheel's compile jobs likewise).
# Tests that need a thread count set it themselves; torchrun ranks run one thread each anyway.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1) > 1:
    torch.set_num_threads(worker_cores())


def pytest_collection_modifyitems(config, items):
    first = {name: i for i, name in enumerate(RUN_FIRST)}
    per_file = collections.Counter(item.path for item in items)
    # stable, and the path in the key keeps each file's tests together and in their order
    items.sort(key=lambda item: (first.get(item.path.name, len(first)), -per_file[item.path], str(item.path)))
    # GPU tests carry their own skipif; this only makes the reason visible in one place.
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords and not any(m.name == "skipif" for m in item.iter_markers()):
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


SEED_ENV = "DDRL_TEST_SEED"
_SEED_PROPERTY = "ddrl_test_seed"  # in each report's user_properties (also in --junitxml output)


def _seed_from_env() -> int | None:
    """The seed $DDRL_TEST_SEED asks for, None when unset or empty; a bad value is a UsageError."""
    raw = os.environ.get(SEED_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV}={raw!r} is not an integer seed (unset it for a fresh seed)") from None
    if not 0 <= value < 2**63:
        raise pytest.UsageError(f"{SEED_ENV}={value} is out of range: a seed must be in [0, 2**63)")
    return value


def pytest_configure(config):
    _seed_from_env()  # a bad value stops the run before any test, with the variable named
    # xdist would sort the files by number of tests again, the wheel build last
    if getattr(config.option, "loadscopereorder", False):
        config.option.loadscopereorder = False


@pytest.fixture
def seed(request):
    """The test's torch seed (already applied with torch.manual_seed): $DDRL_TEST_SEED when set, else a
    fresh one per test. A failing test that used it reports "seed: N (rerun with DDRL_TEST_SEED=N)" in
    its failure output (a "seed" section) and in a "seeds of failed tests" section at the end of the run."""
    s = _seed_from_env()
    if s is None:
        s = torch.seed() % (2**31)
    torch.manual_seed(s)
    request.node.user_properties.append((_SEED_PROPERTY, s))
    return s


def _seed_of(report) -> int | None:
    # the last one: a rerun of the test (e.g. pytest-rerunfailures) appends its own
    return next((v for k, v in reversed(getattr(report, "user_properties", ())) if k == _SEED_PROPERTY), None)


def _rerun_hint(s: int) -> str:
    return f"seed: {s} (rerun with {SEED_ENV}={s})"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    s = _seed_of(report)
    if report.failed and s is not None:
        report.sections.append(("seed", _rerun_hint(s)))


def pytest_terminal_summary(terminalreporter):
    lines = [f"{r.nodeid} ({r.when}): {_rerun_hint(s)}"
             for key in ("failed", "error") for r in terminalreporter.stats.get(key, ())
             if (s := _seed_of(r)) is not None]
    if lines:
        terminalreporter.section("seeds of failed tests")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session", autouse=True)
def _engine_cache(tmp_path_factory):
    """Tests never read or write the user's cache (classifiers, base models)."""
    import os

    old = os.environ.get("DDRL_ENGINE_CACHE")
    os.environ["DDRL_ENGINE_CACHE"] = str(tmp_path_factory.mktemp("ddrl_cache"))
    yield
    if old is None:
        os.environ.pop("DDRL_ENGINE_CACHE", None)
    else:
        os.environ["DDRL_ENGINE_CACHE"] = old


@pytest.fixture(scope="session")
def split():
    """The default digits train/held-out split."""
    from ddrl_engine.data import digits_split

    return digits_split(seed=0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A cache directory of the module's own (classifier caching is tested from empty)."""
    return tmp_path_factory.mktemp("ddrl_cache")
