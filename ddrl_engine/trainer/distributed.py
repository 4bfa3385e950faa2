"""Multi-process training under torchrun: process group, sharding of the rollout and data batches,
FSDP2 / DDP wrapping, collectives for rewards and metrics, torch.distributed.checkpoint (DCP).

How a step is split (DistributedConfig.parallel = "ddp" or "fsdp", world size W):
- every rank draws the same global conditions, data batch and noise (identical generator states on
  every rank), and keeps its rows: rank r owns samples r*B/W ... (r+1)*B/W - 1 of the global batch B
  (group members may live on different ranks; the group size is not tied to W);
- rewards are all-gathered so advantages are computed per group on the global batch, as on one process;
- every loss is a mean over the rank's rows and gradients are averaged over ranks (DDP all-reduce or
  FSDP2 reduce-scatter), which is the one-process gradient when the shards have equal sizes.
With context_parallel = N > 1 the W ranks form W / N data-parallel ranks of N ranks each (a cp group:
consecutive ranks, mesh ("dp", "cp")): the rows above are split over the W / N data ranks, the N ranks
of a cp group hold the same samples, and the model shards each sample's tokens over them
(`set_context_parallel` of models.DiT and of the diffusers adapters; attention through a Ulysses
all-to-all, attention.context_parallel).
The model's output is all-gathered, so each cp rank holds whole samples and computes the same losses;
the gather's backward (a reduce-scatter) makes each rank's gradient N times its tokens' part, and the
average over all W ranks (DDP / FSDP2 over the world, which also shards the weights over the cp ranks)
is then the one-process gradient. Rewards and metrics reduce over the data ranks only.
Since generator states are rank-invariant, a checkpoint's non-tensor state is saved once (rank 0)
and the weights and optimizer go through DCP (trainer.checkpoint), which reshards: a checkpoint resumes
at any world size.
"""
from __future__ import annotations

import atexit
import contextlib
import gc
import os
import warnings
import weakref
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

@dataclass
class Distributed:
    """One rank's view of a torchrun job. mode: "ddp" or "fsdp"; device: this rank's device;
    shard_size: FSDP2 shards over groups of this many ranks and replicates across the groups (HSDP;
    0 or the world size: shard over all ranks).
    context_parallel: ranks per cp group (1: off); see the module doc."""

    mode: str
    rank: int
    world_size: int
    device: str
    shard_size: int = 0
    context_parallel: int = 1
    cp_attention: str = "ulysses"  # distributed.context_parallel_attention
    _mesh: object = field(default=None, init=False, repr=False, compare=False)
    _cp_mesh: object = field(default=None, init=False, repr=False, compare=False)

    # ---- setup ------------------------------------------------------------------------------

    @classmethod
    def from_env(cls, mode: str, device: str, timeout_s: float = 600, shard_size: int = 0,
                 context_parallel: int = 1, cp_attention: str = "ulysses") -> "Distributed":
        """Joins the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR (gloo on CPU,
        NCCL on CUDA; "cuda" becomes cuda:LOCAL_RANK). Raises with the cause outside torchrun."""
        missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing and not dist.is_initialized():
            raise RuntimeError(f"distributed.parallel = {mode!r} needs a torchrun launch (missing environment "
                               f"variables {', '.join(missing)}); run it with `torchrun --nproc_per_node N ...` "
                               "or set distributed.parallel = 'none'")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device.startswith("cuda"):
            device = device if ":" in device else f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if not dist.is_initialized():
            timeout = timedelta(seconds=timeout_s)
            dist.init_process_group(backend, store=_attempt_store(timeout), rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
        ctx = cls(mode, dist.get_rank(), dist.get_world_size(), device, shard_size, context_parallel, cp_attention)
        if shard_size and (mode != "fsdp" or ctx.world_size % shard_size):
            raise ValueError(f"distributed.shard_size = {shard_size} needs parallel = 'fsdp' and a world size "
                             f"divisible by it (world size {ctx.world_size}, parallel {mode!r})")
        if context_parallel < 1 or ctx.world_size % context_parallel:
            raise ValueError(f"distributed.context_parallel = {context_parallel} must be >= 1 and divide the world "
                             f"size ({ctx.world_size})")
        if context_parallel > 1:
            ctx.cp_mesh()  # every rank creates the groups together, now
        return ctx

    @staticmethod
    def close() -> None:
        """Ends this rank's part of the job; every rank calls it, after dropping its models (the
        FSDP2 / DDP modules, optimizer and meshes hold the process groups). A barrier (every rank's
        collectives are done, so the joins below never wait on a peer that has left), then the process
        groups are destroyed and freed, which joins their gloo worker threads now, while the
        interpreter is fully alive.

        Why not just destroy_process_group() (issue #15 item 10, rank 1 SIGABRT "terminate called
        without an active exception"): it only drops torch's own references, and a ProcessGroupGloo
        joins its worker threads only in its destructor (its shutdown() does nothing). Left alive, a
        worker that drops the last reference to a finished collective whose tensor's Python object is
        owned by the C++ side (the Python tensor died first) takes the GIL to decref it; asked just
        before the main thread marks the interpreter finalizing and granted after, CPython (3.11)
        ends that thread with pthread_exit inside ~TensorImpl, a noexcept destructor: std::terminate.
        Groups still referenced here (a caller holding its trainer) are freed again at interpreter
        exit, before finalization (atexit), and reported if even that fails."""
        if not dist.is_initialized():
            return
        dist.barrier()
        groups = [weakref.ref(pg) for pg in dist.distributed_c10d._world.pg_map]
        dist.destroy_process_group()
        if _free_groups(groups):
            _free_at_exit(groups)

    # ---- sharding by sample index --------------------------------------------------------------

    @property
    def data_size(self) -> int:
        """Data-parallel ranks: the world size / context_parallel (ranks holding different samples)."""
        return self.world_size // self.context_parallel

    @property
    def data_rank(self) -> int:
        return self.rank // self.context_parallel

    @property
    def data_group(self):
        """The process group of this rank's data-parallel peers (None: the whole world)."""
        return None if self.context_parallel == 1 else self.cp_mesh().get_group("dp")

    @property
    def cp_group(self):
        """The process group of this rank's cp group (None without context parallelism)."""
        return None if self.context_parallel == 1 else self.cp_mesh().get_group("cp")

    def cp_mesh(self):
        """The 2-D mesh ("dp", "cp") of context parallelism: cp groups of consecutive ranks."""
        from torch.distributed.device_mesh import init_device_mesh

        if self._cp_mesh is None:
            kind = "cuda" if self.device.startswith("cuda") else "cpu"
            self._cp_mesh = init_device_mesh(kind, (self.data_size, self.context_parallel),
                                             mesh_dim_names=("dp", "cp"))
        return self._cp_mesh

    def shard(self, total: int, what: str = "batch") -> tuple[int, int]:
        """(first row, rows) of this rank's share of a global batch of `total` rows (the ranks of a cp
        group share the same rows)."""
        size = self.data_size
        if total % size:
            cp = f" / distributed.context_parallel = {self.context_parallel}" if self.context_parallel > 1 else ""
            raise ValueError(f"distributed: the {what} ({total}) must be divisible by the world size "
                             f"({self.world_size}{cp}) so that every rank holds the same number of samples")
        n = total // size
        return self.data_rank * n, n

    def rows(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        first, n = self.shard(t.shape[dim])
        return t.narrow(dim, first, n)

    def gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenates every data rank's `t` (equal shapes) along `dim`, in rank order."""
        src = t.to(torch.uint8) if t.dtype == torch.bool else t.contiguous()
        parts = [torch.empty_like(src) for _ in range(self.data_size)]
        dist.all_gather(parts, src, group=self.data_group)
        out = torch.cat(parts, dim=dim)
        return out.bool() if t.dtype == torch.bool else out

    def reduce(self, values: dict[str, float], op: str = "mean") -> dict[str, float]:
        """Averages (op="mean"), sums (op="sum") or maximises (op="max") scalar metrics over the data
        ranks (a cp group's ranks hold the same values)."""
        if op not in ("mean", "sum", "max"):
            raise ValueError(f"reduce: op must be 'mean', 'sum' or 'max', got {op!r}")
        if not values:
            return {}
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.data_group)
        if op == "mean":
            t /= self.data_size
        return dict(zip(keys, t.tolist()))

    def barrier(self) -> None:
        dist.barrier()

    # ---- models ---------------------------------------------------------------------------------

    def wrap(self, policy: nn.Module, reference: nn.Module | None, ema: nn.Module | None, *,
             activation_checkpointing: bool = False):
        """(policy, reference, ema) ready for training: rank 0's weights broadcast, then FSDP2 (each of
        them sharded per block) or DDP (the policy wrapped; reference and EMA replicated). With
        context_parallel > 1 each model first shards its tokens over the cp group
        (`set_context_parallel(group, attention=cp_attention)`, which the model must have)."""
        for m in (policy, reference, ema):
            if m is not None:
                for t in list(m.parameters()) + list(m.buffers()):
                    dist.broadcast(t.data, src=0)
        if self.context_parallel > 1:
            for m in (policy, reference, ema):
                if m is None:
                    continue
                if not callable(getattr(m, "set_context_parallel", None)):
                    raise ValueError(f"distributed.context_parallel = {self.context_parallel}: the model "
                                     f"({type(m).__name__}) cannot shard its tokens (no set_context_parallel); "
                                     "the built-in DiT and the SD3, FLUX and Wan adapters have it")
                m.set_context_parallel(self.cp_group, attention=self.cp_attention)
        if activation_checkpointing:
            checkpoint_blocks(policy)
        if self.mode == "ddp":
            ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
            return nn.parallel.DistributedDataParallel(policy, device_ids=ids), reference, ema
        return tuple(None if m is None else self.fully_shard(m) for m in (policy, reference, ema))

    def fully_shard(self, model: nn.Module, compute_dtype: torch.dtype | None = None) -> nn.Module:
        """FSDP2 per transformer block (model.blocks) and the root. compute_dtype: the parameters' dtype
        in forward/backward, with fp32 gradient reduction (default: bf16 on CUDA; on CPU fp32, as CPU
        bf16 matmuls are slow and would break the 1-rank equality).

        The root does not cast the policy's inputs (x, t): the models cast x to their weights' dtype
        themselves and build the timestep embedding from the fp32 level (cast at the root, t = 0.7
        would reach the model as 0.69921875; for a diffusers model, timestep 699.2 instead of 700)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if compute_dtype is None:
            compute_dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        mesh = self.mesh()
        for block in getattr(model, "blocks", ()):
            fully_shard(block, mesh=mesh, mp_policy=mp)
        # The root also reshards after forward: a module only run without grad (the EMA after an
        # evaluation, the reference, the policy after a rollout) must not be left holding unsharded
        # parameters that an in-place update (EMA lerp, optimizer) would then miss.
        root_mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        fully_shard(model, mesh=mesh, mp_policy=root_mp, reshard_after_forward=True)
        return model

    def mesh(self):
        """FSDP2's device mesh: 1-D over all ranks, or 2-D (replicate, shard) for HSDP (shard_size)."""
        from torch.distributed.device_mesh import init_device_mesh

        if self._mesh is None:
            kind = "cuda" if self.device.startswith("cuda") else "cpu"
            size = self.shard_size or self.world_size
            if size == self.world_size:
                self._mesh = init_device_mesh(kind, (self.world_size,), mesh_dim_names=("shard",))
            else:  # shard inside groups of `size` ranks (e.g. a node), replicate across them
                self._mesh = init_device_mesh(kind, (self.world_size // size, size),
                                              mesh_dim_names=("replicate", "shard"))
        return self._mesh

    @contextlib.contextmanager
    def grad_sync(self, model: nn.Module, enabled: bool):
        """Within the block, a backward of `model` reduces gradients across ranks only if `enabled`;
        otherwise they accumulate locally (DDP no_sync; FSDP2 unsharded) until a synced backward."""
        if enabled:
            yield
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            with model.no_sync():
                yield
        else:
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    @staticmethod
    def full(t: torch.Tensor) -> torch.Tensor:
        """A plain tensor from a possibly sharded one (e.g. FSDP2's gradient norm)."""
        return t.full_tensor() if isinstance(t, DTensor) else t


def _free_groups(groups: list) -> list:
    """Frees destroyed process groups (weak references) that nothing of ours holds any more; returns
    those still alive. torch 2.14 keeps two references past destroy_process_group: each DeviceMesh
    holds its groups in `_pg_registry` (for torch.compile), and DTensor's sharding caches keep the
    meshes for the life of the interpreter; FSDP2 state sits in reference cycles (hence the collect)."""
    _clear_mesh_registries()
    gc.collect()
    return [g for g in groups if g() is not None]


def _clear_mesh_registries() -> None:
    # A function of its own: its locals (the object list, the loop variable) are gone before the
    # collect above; a lingering reference to one object of a cycle would keep the whole cycle.
    from torch.distributed.device_mesh import DeviceMesh

    for mesh in [obj for obj in gc.get_objects() if issubclass(type(obj), DeviceMesh)]:
        getattr(mesh, "_pg_registry", {}).clear()  # its groups are destroyed: the mesh is unusable anyway


_exit_groups: list = []


def _free_at_exit(groups: list) -> None:
    """Retries _free_groups when the interpreter exits: atexit handlers run before finalization, once
    the caller's frames (its trainer) are gone."""
    if not _exit_groups:
        atexit.register(_report_groups_at_exit)
    _exit_groups.extend(groups)


def _report_groups_at_exit() -> None:
    alive = _free_groups(_exit_groups)
    if alive:
        warnings.warn(f"Distributed.close(): {len(alive)} process group(s) are still referenced at interpreter exit; "
                      "their gloo worker threads outlive into interpreter finalization, where a late tensor release "
                      "aborts the process (SIGABRT, 'terminate called without an active exception'). Drop the "
                      "models, optimizers and meshes that hold them before the process exits", RuntimeWarning,
                      stacklevel=1)


def _attempt_store(timeout: timedelta) -> dist.Store:
    """torchrun's store, with keys prefixed by the restart attempt.

    Under `torchrun --max-restarts`, the restarted workers reuse the elastic agent's store (same
    MASTER_ADDR:MASTER_PORT), which still holds the failed attempt's process-group keys; a plain
    init_process_group can read a dead rank's address from them and fail to connect (seen with gloo:
    "connectFullMesh ... Connection refused"). A per-attempt prefix gives every attempt fresh keys.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_hosts and rank == 0, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"ddrl_engine/attempt_{attempt}", store)


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing of each block in model.blocks (non-reentrant; parameter names unchanged)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError("distributed.activation_checkpointing needs a model with a `blocks` list of modules")
    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
