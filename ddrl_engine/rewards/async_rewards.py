"""Rewards computed in worker processes, so a step can overlap them with the next rollout or the
data-loss forward.

    with AsyncReward(make_reward, workers=2, timeout_s=120, retries=1) as rewards:
        handle = rewards.submit(samples, cond)   # returns at once
        ...                                      # other work: the next rollout, the data loss
        batch = handle.result()                  # RewardBatch, or None if the batch was dropped
        handle.wait_s                            # how long result() blocked

`reward_factory` is a picklable callable (a top-level function, a class, a functools.partial) that
each worker calls once to build its reward: a `WeightedReward`, or a single `Reward` (wrapped in a
`WeightedReward` of weight 1). Reward models are thus loaded in the workers, not pickled over. Workers
run `torch.set_num_threads(worker_threads)` and start with `start_method`: "forkserver" (the default
where the platform has it) forks them from a server process that has imported torch once, so a worker
replaced after a timeout is up in milliseconds; "spawn" starts each from scratch (a torch import,
seconds). Both are safe with CUDA and threads in the caller, unlike "fork".

Each batch goes to one idle worker; batches wait in a FIFO queue while all are busy. An attempt
fails when the reward raises, the worker dies, or it runs longer than `timeout_s` (the worker is then
killed and replaced). A failed batch is retried up to `retries` times; after that it is dropped:
`result()` returns None and `stats.dropped` counts it (on_failure="drop"), or `result()` raises
`RewardFailedError` with the cause (on_failure="raise"). A failed batch is never turned into zeros.
If the factory itself fails in a worker (missing weights, missing package), nothing is retried:
every outstanding and later call raises `RewardWorkerError` with the worker's traceback.

Samples and conditions are sent to the workers on the CPU; results come back on the CPU. Call
`close()` (or use `with`); workers are daemon processes, so they also end when the caller exits.
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import torch
import torch.multiprocessing as mp
from torch import Tensor

from .base import InvalidRewardError, RewardBatch, WeightedReward

__all__ = ["AsyncReward", "AsyncRewardStats", "RewardFailedError", "RewardHandle", "RewardWorkerError"]


class RewardFailedError(RuntimeError):
    """A reward batch failed on every attempt (on_failure="raise")."""


class RewardWorkerError(RuntimeError):
    """A worker could not build its reward (the factory raised); the AsyncReward is unusable."""


@dataclass
class AsyncRewardStats:
    """Counters since construction. submitted/completed/dropped: batches; retried: extra attempts;
    timeouts, errors, crashes: failed attempts by cause; wait_s: total time result() blocked;
    compute_s: total reward time in the workers (successful attempts)."""

    submitted: int = 0
    completed: int = 0
    dropped: int = 0
    retried: int = 0
    timeouts: int = 0
    errors: int = 0
    crashes: int = 0
    wait_s: float = 0.0
    compute_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


class RewardHandle:
    """A submitted batch. `result(timeout=None)` blocks until it is done; then `wait_s` is the time
    result() blocked, `compute_s` the worker's reward time, `attempts` how many attempts ran."""

    def __init__(self, owner: "AsyncReward", future: Future) -> None:
        self._owner, self._future = owner, future
        self.wait_s: Optional[float] = None
        self.compute_s: Optional[float] = None
        self.attempts = 0
        self.dropped = False
        self.invalid = False  # dropped because a reward broke its contract (rewards.base.InvalidRewardError)
        self.causes: list[str] = []  # why each attempt failed, when the batch was dropped

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: Optional[float] = None) -> Optional[RewardBatch]:
        """The RewardBatch, or None when the batch was dropped (on_failure="drop")."""
        start = time.perf_counter()
        try:
            return self._future.result(timeout=timeout)
        finally:
            waited = time.perf_counter() - start
            if self.wait_s is None and self._future.done():
                self.wait_s = waited
                with self._owner._lock:
                    self._owner.stats.wait_s += waited


# ----------------------------------------------------------------------------------------------- worker side


def _evaluator(reward) -> WeightedReward:
    if isinstance(reward, WeightedReward):
        return reward
    if callable(reward) and isinstance(getattr(reward, "name", None), str):
        return WeightedReward([reward])
    raise TypeError(f"reward_factory must build a WeightedReward or a Reward (callable with a str `name`), got {type(reward).__name__}")


def _worker_main(wid: int, gen: int, factory, threads: int, tasks, results) -> None:
    torch.set_num_threads(threads)
    try:
        reward = _evaluator(factory())
    except BaseException:  # noqa: BLE001 - reported to the parent, then the worker exits
        results.put(("init_error", wid, gen, None, traceback.format_exc()))
        return
    spec = ([r.name for r in reward.rewards], list(reward.weights))
    results.put(("ready", wid, gen, None, spec))
    while True:
        item = tasks.get()
        if item is None:
            return
        task_id, samples, cond, on_invalid = item
        start = time.perf_counter()
        try:
            batch = reward.evaluate(samples, cond, on_invalid=on_invalid)
            batch = RewardBatch({k: v.cpu() for k, v in batch.components.items()}, batch.valid.cpu(),
                                dict(batch.n_invalid), batch.total.cpu())
            results.put(("ok", wid, gen, task_id, (batch, time.perf_counter() - start)))
        except InvalidRewardError as e:  # the reward's contract: a retry would give the same
            results.put(("invalid", wid, gen, task_id, str(e)))
        except Exception:  # noqa: BLE001 - a failed attempt, reported with its traceback
            results.put(("error", wid, gen, task_id, traceback.format_exc()))


# ----------------------------------------------------------------------------------------------- parent side


@dataclass
class _Task:
    id: int
    samples: Tensor
    cond: Any
    future: Future
    handle: RewardHandle
    attempts: int = 0
    causes: list = field(default_factory=list)


@dataclass
class _Worker:
    wid: int
    gen: int
    process: Any
    tasks: Any
    ready: bool = False
    task: Optional[_Task] = None
    started: float = 0.0


class AsyncReward:
    """Rewards in `workers` processes with per-attempt `timeout_s` and `retries` (see the module docstring).

    on_invalid: passed to `WeightedReward.evaluate` ("error": a non-finite reward fails the attempt;
    "drop": such samples are masked out of the RewardBatch and counted in its n_invalid).
    on_failure: "drop" (result() returns None, counted in stats.dropped) or "raise".
    """

    def __init__(self, reward_factory: Callable[[], Any], *, workers: int = 1, timeout_s: float = 300.0,
                 retries: int = 1, on_invalid: Literal["error", "drop"] = "error",
                 on_failure: Literal["drop", "raise"] = "drop", worker_threads: int = 1,
                 start_method: Optional[Literal["forkserver", "spawn"]] = None) -> None:
        if not callable(reward_factory):
            raise TypeError(f"reward_factory must be callable, got {type(reward_factory).__name__}")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if on_invalid not in ("error", "drop"):
            raise ValueError(f"on_invalid must be 'error' or 'drop', got {on_invalid!r}")
        if on_failure not in ("drop", "raise"):
            raise ValueError(f"on_failure must be 'drop' or 'raise', got {on_failure!r}")
        if not isinstance(worker_threads, int) or worker_threads < 1:
            raise ValueError(f"worker_threads must be an int >= 1, got {worker_threads!r}")
        self.factory, self.timeout_s, self.retries = reward_factory, float(timeout_s), retries
        self.on_invalid, self.on_failure, self.worker_threads = on_invalid, on_failure, worker_threads
        self.stats = AsyncRewardStats()
        self._lock = threading.Lock()
        if start_method is None:
            start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(f"start_method must be 'forkserver' or 'spawn' (not 'fork': unsafe with CUDA), got {start_method!r}")
        self.start_method = start_method
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            # Only takes effect when the (per-process) fork server starts; later calls are no-ops.
            self._ctx.set_forkserver_preload([__name__])
        self._results = self._ctx.Queue()
        self._pending: collections.deque[_Task] = collections.deque()
        self._ids = itertools.count()
        self._broken: Optional[str] = None
        self._spec: Optional[tuple[list[str], list[float]]] = None
        self._spec_ready = threading.Event()  # set by the first "ready" (or by _fail_all)
        self._closed = False
        self._stop = threading.Event()
        self._workers = [self._start_worker(i, 0) for i in range(workers)]
        self._thread = threading.Thread(target=self._run, name="ddrl-async-reward", daemon=True)
        self._thread.start()

    # -- public ----------------------------------------------------------------------------------------

    def submit(self, samples: Tensor, cond: Any) -> RewardHandle:
        """Queues one batch; returns at once. samples [B, ...] and cond (indexable, [B]) go to the CPU."""
        if self._closed:
            raise RuntimeError("AsyncReward.submit: the AsyncReward is closed")
        if self._broken is not None:
            raise RewardWorkerError(self._broken)
        if not isinstance(samples, Tensor) or samples.dim() < 1:
            raise ValueError(f"AsyncReward.submit: samples must be a tensor [B, ...], got {getattr(samples, 'shape', type(samples))}")
        future: Future = Future()
        handle = RewardHandle(self, future)
        cond = cond.detach().cpu() if isinstance(cond, Tensor) else cond
        task = _Task(next(self._ids), samples.detach().cpu(), cond, future, handle)
        with self._lock:
            self.stats.submitted += 1
            self._pending.append(task)
        return handle

    def evaluate(self, samples: Tensor, cond: Any) -> Optional[RewardBatch]:
        """submit + result: the synchronous call, through the workers."""
        return self.submit(samples, cond).result()

    def reward_spec(self, timeout_s: Optional[float] = None) -> tuple[list[str], list[float]]:
        """(names, weights) of the reward the workers built (their WeightedReward's components), as
        reported by the first worker ready; blocks until then (timeout_s: default self.timeout_s)."""
        if not self._spec_ready.wait(self.timeout_s if timeout_s is None else timeout_s):
            raise TimeoutError(f"AsyncReward.reward_spec: no reward worker was ready within {timeout_s or self.timeout_s:g} s")
        if self._spec is None:
            raise RewardWorkerError(self._broken or "the AsyncReward is unusable")
        return list(self._spec[0]), list(self._spec[1])

    def close(self, timeout_s: float = 5.0) -> None:
        """Stops the workers (politely, then by force after timeout_s) and fails unfinished batches."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join()
        for w in self._workers:
            try:
                w.tasks.put(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + timeout_s
        for w in self._workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
        with self._lock:
            leftover = list(self._pending) + [w.task for w in self._workers if w.task is not None]
            self._pending.clear()
        for task in leftover:
            if not task.future.done():
                task.future.set_exception(RuntimeError("AsyncReward closed before this batch finished"))
        self._results.close()
        self._results.join_thread()

    def __enter__(self) -> "AsyncReward":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- dispatcher thread -----------------------------------------------------------------------------

    def _start_worker(self, wid: int, gen: int) -> _Worker:
        tasks = self._ctx.Queue()
        process = self._ctx.Process(target=_worker_main, name=f"ddrl-reward-{wid}", daemon=True,
                                    args=(wid, gen, self.factory, self.worker_threads, tasks, self._results))
        process.start()
        return _Worker(wid, gen, process, tasks)

    def _replace_worker(self, w: _Worker) -> None:
        if w.process.is_alive():
            w.process.kill()
        w.process.join()
        w.tasks.close()
        self._workers[w.wid] = self._start_worker(w.wid, w.gen + 1)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._results.get(timeout=0.01)
            except queue.Empty:
                msg = None
            except (OSError, ValueError, EOFError):  # pragma: no cover - queue torn down
                return
            if msg is not None:
                self._on_message(*msg)
            self._check_workers()
            self._dispatch()

    def _on_message(self, kind: str, wid: int, gen: int, task_id, payload) -> None:
        if kind == "init_error":
            self._fail_all(f"reward worker {wid} could not build its reward (reward_factory raised):\n{payload}")
            return
        w = self._workers[wid]
        if gen != w.gen:
            return  # from a worker already replaced
        if kind == "ready":
            w.ready = True
            if self._spec is None:
                self._spec = payload
                self._spec_ready.set()
        elif w.task is not None and w.task.id == task_id:
            task, w.task = w.task, None
            if kind == "ok":
                batch, compute_s = payload
                task.handle.compute_s, task.handle.attempts = compute_s, task.attempts
                with self._lock:
                    self.stats.completed += 1
                    self.stats.compute_s += compute_s
                task.future.set_result(batch)
            elif kind == "invalid":
                with self._lock:
                    self.stats.errors += 1
                task.handle.invalid = True
                self._attempt_failed(task, f"invalid reward: {payload}", retry=False)
            else:
                with self._lock:
                    self.stats.errors += 1
                self._attempt_failed(task, f"the reward raised:\n{payload}")

    def _check_workers(self) -> None:
        now = time.monotonic()
        for w in list(self._workers):
            if w.task is not None and now - w.started > self.timeout_s:
                task, w.task = w.task, None
                with self._lock:
                    self.stats.timeouts += 1
                self._replace_worker(w)
                self._attempt_failed(task, f"timed out after {self.timeout_s:g} s (worker killed and restarted)")
            elif not w.process.is_alive() and self._broken is None:
                self._drain()  # its last messages (a result, a start-up error) may still be queued
                if self._broken is not None or w is not self._workers[w.wid]:
                    continue
                code = w.process.exitcode
                if not w.ready:
                    self._fail_all(f"reward worker {w.wid} died during start-up (exit code {code}); its traceback is on "
                                   "stderr. Is the calling script missing an `if __name__ == '__main__':` guard "
                                   "(forkserver and spawn re-import it), or is reward_factory not picklable?")
                    continue
                task, w.task = w.task, None
                with self._lock:
                    self.stats.crashes += 1
                self._replace_worker(w)
                if task is not None:
                    self._attempt_failed(task, f"the worker died (exit code {code})")

    def _drain(self) -> None:
        while True:
            try:
                msg = self._results.get_nowait()
            except queue.Empty:
                return
            self._on_message(*msg)

    def _attempt_failed(self, task: _Task, cause: str, retry: bool = True) -> None:
        task.causes.append(cause)
        if retry and task.attempts <= self.retries:
            with self._lock:
                self.stats.retried += 1
                self._pending.appendleft(task)
            return
        task.handle.attempts, task.handle.dropped, task.handle.causes = task.attempts, True, list(task.causes)
        with self._lock:
            self.stats.dropped += 1
        if self.on_failure == "drop":
            task.future.set_result(None)
        else:
            causes = "\n".join(f"attempt {i + 1}: {c}" for i, c in enumerate(task.causes))
            task.future.set_exception(RewardFailedError(f"reward batch failed {task.attempts} time(s):\n{causes}"))

    def _dispatch(self) -> None:
        if self._broken is not None and self._pending:
            self._fail_all(self._broken)
        for w in self._workers:
            if not self._pending or self._broken is not None:
                return
            if w.ready and w.task is None and w.process.is_alive():
                with self._lock:
                    task = self._pending.popleft()
                task.attempts += 1
                w.task, w.started = task, time.monotonic()
                w.tasks.put((task.id, task.samples, task.cond, self.on_invalid))

    def _fail_all(self, message: str) -> None:
        self._broken = message
        self._spec_ready.set()
        with self._lock:
            tasks = list(self._pending) + [w.task for w in self._workers if w.task is not None]
            self._pending.clear()
        for w in self._workers:
            w.task = None
        for task in tasks:
            if not task.future.done():
                task.future.set_exception(RewardWorkerError(message))
