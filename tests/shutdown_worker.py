"""One rank of a shutdown test run (tests/test_shutdown.py launches two with torchrun, gloo on CPU).

python -m torch.distributed.run --nproc_per_node 2 -m tests.shutdown_worker OUT PARALLEL SEED
    [--late-release] [--keep-trainer]
trains the tiny config one step under PARALLEL ("ddp" or "fsdp") with a DCP checkpoint, drops the
trainer, calls Distributed.close() and writes OUT/rank<R>.json: the gloo threads and process groups
still alive right after close() and at interpreter exit (an atexit handler that runs after
close()'s own, before finalization). --keep-trainer calls close() with the trainer still
referenced (as a script that closes and then returns does): close() cannot free the groups then,
and must free them at exit.

--late-release: rank 1 also leaves an all-reduce queued when it calls close(), of a tensor whose Python
object it dropped (the C++ side owns it: releasing it takes the GIL), and rank 0 joins it only after a
delay. And rank 1 holds the GIL for 2 s right before interpreter finalization (an atexit C call: no
bytecode, so no GIL hand-over). A gloo worker outliving close() would release that tensor in this
window and abort the process (issue #15 item 10); the JSON records that close() freed it.
"""
import atexit
import ctypes
import sys

if __name__ == "__main__" and "--late-release" in sys.argv:
    # Registered before torch registers its own atexit handlers: runs last, just before finalization.
    atexit.register(ctypes.PyDLL(None).sleep, 2)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
import weakref  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ddrl_engine.trainer.config import DistributedConfig  # noqa: E402
from ddrl_engine.trainer.distributed import Distributed  # noqa: E402
from tests.trainer_helpers import make_trainer, tiny_config  # noqa: E402

GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")  # names torch 2.14 gives the workers and the I/O loop
PENDING = "late_release_pending"


def gloo_threads() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except OSError:  # the thread ended while we looked
            pass
    return sorted(n for n in names if n in GLOO_THREADS)


def train_one_step(out: str, parallel: str, seed: int):
    cfg = replace(tiny_config(out, steps=1), distributed=DistributedConfig(parallel=parallel))
    cfg = replace(cfg, run=replace(cfg.run, seed=seed))
    trainer = make_trainer(cfg)
    trainer.update(trainer.collect())
    trainer.save()  # DCP: the run's last collectives, as at the end of every fixture launch
    return trainer


def census(groups: list) -> dict:
    return {"gloo_threads": gloo_threads(), "groups_alive": sum(g() is not None for g in groups)}


def leave_a_late_release(out: Path, seed: int):
    """Rank 1: an all-reduce its peer has not joined yet, holding the only reference to its tensor.
    Returns (weak reference to that tensor, whether the queued work still held it)."""
    t = torch.randn(1024, generator=torch.Generator().manual_seed(seed))
    held = weakref.ref(t)
    dist.all_reduce(t, async_op=True)  # the work handle is dropped at once
    del t
    pending = held() is not None
    (out / PENDING).write_text("")  # rank 0 joins the all-reduce only after this
    return held, pending


def join_the_late_release(out: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not (out / PENDING).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 1 never wrote {out / PENDING}")
        time.sleep(0.01)
    time.sleep(1.0)  # rank 1 is in close() (or, were close() to return at once, in its GIL hold)
    dist.all_reduce(torch.zeros(1024))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("parallel", choices=("ddp", "fsdp"))
    p.add_argument("seed", type=int)
    p.add_argument("--late-release", action="store_true")
    p.add_argument("--keep-trainer", action="store_true")
    a = p.parse_args()
    out = Path(a.out)
    trainer = train_one_step(a.out, a.parallel, a.seed)
    if not a.keep_trainer:
        del trainer  # the models and meshes hold the process groups
    rank = dist.get_rank()
    result = {"rank": rank, "late_release": None}
    if a.late_release and rank == 1:
        held, pending = leave_a_late_release(out, a.seed)
    elif a.late_release:
        join_the_late_release(out)
    groups = [weakref.ref(pg) for pg in dist.distributed_c10d._world.pg_map]

    def write_at_exit():  # registered before close() registers its own handler: runs after it
        result["at_exit"] = census(groups)
        (out / f"rank{rank}.json").write_text(json.dumps(result))

    atexit.register(write_at_exit)
    Distributed.close()
    result["after_close"] = census(groups)
    if a.late_release and rank == 1:
        result["late_release"] = {"pending_at_close": pending, "freed_by_close": held() is None}


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
