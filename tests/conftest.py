import pytest
import torch


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
