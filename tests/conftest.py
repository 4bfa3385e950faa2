import os
import tempfile

import pytest
import torch

# torch.compile caches compiled graphs (backward formulas included) across processes, keyed without
# our ops' Python autograd code: a stale entry would test an old formula. Compile fresh per run.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddrl_inductor_")


def pytest_collection_modifyitems(config, items):
    # GPU tests carry their own skipif; this only makes the reason visible in one place.
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords and not any(m.name == "skipif" for m in item.iter_markers()):
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture
def seed():
    """A fresh seed per test run (printed on failure through the test id's fixture value)."""
    s = torch.seed() % (2**31)
    torch.manual_seed(s)
    return s


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
