"""This pytest process's share of the machine's cores: pytest-xdist workers (the README's `-n 2`) share them."""
import os


def worker_cores() -> int:
    """Cores available to this process divided among the xdist workers (all of them when run serially)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    return max(1, cores // workers)
