"""One rank of a ring-attention test run (launched by tests/test_ring_attention.py with torchrun).

python -m torch.distributed.run --nproc_per_node N -m tests.ring_worker MODE RESULT [--seed S]

MODE "ops": `ring_attention` over a cp group of all N ranks for each case of RING_CASES; every rank
    writes its output and q / k / v gradients, and its slices of the whole-sequence attention's (float64
    and the case's dtype; the same seed on every rank), to RESULT.rank<r>.pt.
MODE "models": the DiT (3 heads: Ulysses could not split them) and the tiny Wan adapter sharded with
    context_parallel_attention = "ring"; rank 0 writes output, profiler ranges and gradients of the
    sharded and the unsharded model (tests/cp_worker.compare's layout).
MODE "both": "ops" (to RESULT.ops.rank<r>.pt) then "models" (to RESULT), in one launch.
MODE "train": the video DiT trainer config (tests/test_context_parallel.cp_config) under FSDP2 at
    context_parallel = N with ring attention, 2 steps; rank 0 writes the records and final weights.
"""
import argparse
import copy
import dataclasses
import json
import os
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

# (dtype, [B, H, S, D] of the whole sequence): heads that no cp size divides, odd head dims, one row
RING_CASES = [(torch.float64, (2, 3, 16, 8)), (torch.float32, (1, 5, 32, 12)), (torch.float32, (3, 2, 8, 64)),
              (torch.bfloat16, (2, 4, 16, 16)), (torch.float16, (1, 3, 24, 8))]


def ops_mode(a, result=None):
    from ddrl_engine.attention.ring import ring_attention

    from torch.distributed.tensor.experimental._context_parallel import _cp_options

    n, rank = dist.get_world_size(), dist.get_rank()
    options = dataclasses.asdict(_cp_options)  # torch's global ring options, which each call sets and restores
    out = []
    for i, (dtype, shape) in enumerate(RING_CASES):
        g = torch.Generator().manual_seed(a.seed * 100 + i)  # the same inputs on every rank
        q, k, v, w = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4))
        scale = 0.3 if i % 2 else None
        full = [t.clone().requires_grad_(True) for t in (q, k, v)]
        want = F.scaled_dot_product_attention(*full, scale=scale)  # float64 reference
        (want * w).sum().backward()
        s = shape[2] // n
        mine = slice(rank * s, (rank + 1) * s)
        local = [t[:, :, mine].to(dtype).requires_grad_(True) for t in (q, k, v)]
        got = ring_attention(*local, dist.group.WORLD, scale)
        (got.double() * w[:, :, mine]).sum().backward()
        same = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]  # unsharded attention in this dtype
        plain = F.scaled_dot_product_attention(*same, scale=scale)
        (plain.double() * w).sum().backward()
        out.append({"dtype": str(dtype), "out": got.detach(), "want": want.detach()[:, :, mine],
                    "plain": plain.detach()[:, :, mine], "grads": [t.grad for t in local],
                    "want_grads": [t.grad[:, :, mine] for t in full], "plain_grads": [t.grad[:, :, mine] for t in same]})
    out.append({"options_restored": dataclasses.asdict(_cp_options) == options})
    torch.save(out, f"{result or a.result}.rank{rank}.pt")
    if result is None:
        dist.destroy_process_group()


def models_mode(a):
    from ddrl_engine.models.dit import DiT, DiTConfig
    from tests.cp_worker import compare, save

    cfg = DiTConfig(in_channels=2, sample_size=(4, 4, 4), patch_size=(1, 2, 2), hidden=48, depth=2, heads=3,
                    num_classes=3)  # 16 tokens, 3 heads
    g = torch.Generator().manual_seed(a.seed)
    x, t, y = torch.randn(3, *cfg.sample_shape, generator=g), torch.rand(3, generator=g), torch.tensor([0, 2, 3])
    torch.manual_seed(a.seed)
    plain = DiT(cfg)
    for p in plain.parameters():  # adaLN-Zero starts at zero: make the output depend on every weight
        torch.nn.init.normal_(p, std=0.2, generator=g)
    results = {"dit": compare(plain, copy.deepcopy(plain), (x, t, y), "ring")}
    try:
        from tests.test_diffusers_context_parallel import case
    except ImportError:  # diffusers / peft not installed: the DiT only
        pass
    else:
        for name in ("wan", "experts"):
            policy, *inputs = case(name, a.seed)
            results[name] = compare(policy, copy.deepcopy(policy), tuple(inputs), "ring")
    save(results, a.result)


def train_mode(a):
    from ddrl_engine.trainer.config import DistributedConfig
    from tests.test_context_parallel import cp_config, make_cp_trainer, run_records

    cfg = cp_config(a.result + ".out", True, 2)
    cfg = replace(cfg, distributed=DistributedConfig(parallel="fsdp", context_parallel=int(os.environ["WORLD_SIZE"]),
                                                     context_parallel_attention="ring"))
    trainer = make_cp_trainer(cfg)
    records = run_records(trainer, gather=trainer.dist.gather)
    weights = {k: trainer.dist.full(v) for k, v in trainer._module().state_dict().items()}
    if trainer.dist.rank == 0:
        torch.save(weights, a.result + ".weights.pt")
        block = trainer._module().blocks[0]
        with open(a.result, "w") as f:
            json.dump({"cp_size": dist.get_world_size(block.cp_group), "cp_attention": block.cp_attention,
                       "records": records}, f)
    trainer.dist.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("ops", "models", "both", "train"))
    p.add_argument("result")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.mode != "train":
        dist.init_process_group("gloo")
    if a.mode == "both":  # one launch for both (each torchrun start costs ~10 s here)
        ops_mode(a, result=a.result + ".ops")
        a.mode = "models"
    {"ops": ops_mode, "models": models_mode, "train": train_mode}[a.mode](a)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
