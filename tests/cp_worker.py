"""One rank of a context-parallel test run (launched by tests/test_context_parallel.py with torchrun).

python -m torch.distributed.run --nproc_per_node N -m tests.cp_worker MODE OUT RESULT [options]

MODE "model": a DiT (the image or the video config, --video) with random weights, sharded over a cp
    group of all N ranks; rank 0 writes its output and parameter gradients (for a loss that every rank
    computes from the gathered output) and the same from the unsharded model, so the test compares them;
    --dtype bfloat16 runs both models in bf16 (the gloo collectives then move bf16 tensors).
MODE "diffusers_model": the same for the diffusers adapters (Wan, two-expert Wan, SD3, FLUX:
    tests/test_diffusers_context_parallel.case), saved together.
MODE "train": the trainer test config (tests/test_context_parallel.cp_config) under
    distributed.context_parallel = --cp, for --steps steps (checkpoint every 2), resuming from --resume;
    rank 0 writes per step the global advantages and the update's metrics, and the final weights.
MODE "pipeline": the same for the pipeline run of the TOML file --config (a diffusers folder), built as
    `ddrl-engine train` builds it.
"""
import argparse
import json

import torch
import torch.distributed as dist


def model_mode(a):
    from ddrl_engine.models.dit import DiT
    from tests.test_context_parallel import model_case

    dist.init_process_group("gloo")
    cfg, x, t, y, g = model_case(a.video, a.seed)
    torch.manual_seed(a.seed)
    plain = DiT(cfg)
    dtype = getattr(torch, a.dtype)  # the model computes in it; inputs stay fp32 (the forward casts them)
    # bf16: a milder init, since std 0.2 amplifies bf16's own rounding to several % of the output
    std = 0.2 if dtype == torch.float32 else 0.05
    for p in plain.parameters():  # adaLN-Zero starts at zero: make the output depend on every weight
        torch.nn.init.normal_(p, std=std, generator=g)
    plain.to(dtype)
    sharded = DiT(cfg).to(dtype)
    sharded.load_state_dict(plain.state_dict())
    out = compare(plain, sharded, (x, t, y))
    if dtype != torch.float32:  # float64 on the same (rounded) weights: what both runs' error is measured against
        ref = DiT(cfg).double()
        ref.load_state_dict(plain.state_dict())
        o = ref(x.double(), t, y)
        _loss(o).backward()
        out["ref"] = {"out": o.detach(), "grads": {n: p.grad for n, p in ref.named_parameters()}}
    save(out, a.result)


def diffusers_model_mode(a):
    import copy

    from tests.test_diffusers_context_parallel import CASES, case

    dist.init_process_group("gloo")
    out = {}
    for name in CASES:
        plain, x, t, cond = case(name, a.seed)
        out[name] = compare(plain, copy.deepcopy(plain), (x, t, cond))
    save(out, a.result)


def save(out, result):
    """Rank 0 writes `out` to `result`; the process group is closed."""
    if dist.get_rank() == 0:
        torch.save(out, result)
    dist.destroy_process_group()


def _loss(o):
    """A loss every output value weighs into differently (in float64)."""
    return (o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view_as(o)).sum()


def compare(plain, sharded, inputs, attention: str = "ulysses"):
    """Output, cp profiler ranges and parameter gradients of `plain` and of `sharded` (the same weights)
    over a cp group of all ranks, attended across the shards by `attention`."""
    sharded.set_context_parallel(dist.group.WORLD, attention=attention)
    out = {}
    for name, model in (("plain", plain), ("cp", sharded)):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            o = model(*inputs)
        out[f"{name}_ranges"] = {e.key: e.count for e in prof.key_averages() if e.key.startswith("ddrl/cp/")}
        _loss(o).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if name == "cp":  # the trainer's rule: average over the ranks (each holds N x its tokens' part)
            for gr in grads.values():
                dist.all_reduce(gr)
                gr /= dist.get_world_size()
        out[name] = {"out": o.detach(), "grads": grads}
    return out


def pipeline_trainer(config_path):
    """The Trainer `ddrl-engine train --config config_path` runs for a pipeline [model]."""
    from ddrl_engine.trainer.config import load_config
    from ddrl_engine.trainer.loop import Trainer
    from ddrl_engine.trainer.pipeline_run import build_pipeline_run

    cfg = load_config(config_path)
    run = build_pipeline_run(cfg, log=lambda *a: None, progress=False)
    return Trainer(cfg, run.policy, run.sampler, run.rewards, run.dataset, run.evaluator, conditions=run.conditions,
                   decode=run.decode, log=lambda *a: None)


def train_mode(a):
    from tests.test_context_parallel import cp_config, make_cp_trainer, run_records

    if a.mode == "pipeline":
        trainer = pipeline_trainer(a.config)
        cfg = trainer.cfg
    else:
        cfg = cp_config(a.out, a.video, a.steps, parallel=a.parallel, cp=a.cp, shard_size=a.shard_size)
        trainer = make_cp_trainer(cfg)
    if a.resume:
        assert trainer.resume(a.resume)
    records = run_records(trainer, gather=trainer.dist.gather, save_every=cfg.run.ckpt_every)
    # every rank takes part (FSDP2's full_tensor is a collective); rank 0 writes
    weights = {k: trainer.dist.full(v) for k, v in trainer._module().state_dict().items()}
    if trainer.dist.rank == 0:
        torch.save(weights, a.result + ".weights.pt")
        group = trainer._module()._cp_group  # the model's own cp group: proves the run was sharded
        mesh = trainer.dist._mesh  # FSDP2's mesh (2-D under HSDP), None under DDP
        with open(a.result, "w") as f:
            json.dump({"world_size": trainer.dist.world_size, "data_size": trainer.dist.data_size,
                       "cp_size": 1 if group is None else dist.get_world_size(group), "records": records,
                       "fsdp_mesh": None if mesh is None else dict(zip(mesh.mesh_dim_names, mesh.shape))}, f)
    trainer.dist.close()


def main():
    p = argparse.ArgumentParser()
    for name in ("mode", "out", "result"):
        p.add_argument(name)
    p.add_argument("--video", action="store_true")
    p.add_argument("--config")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--parallel", default="ddp")
    p.add_argument("--shard-size", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--resume")
    a = p.parse_args()
    {"model": model_mode, "diffusers_model": diffusers_model_mode, "train": train_mode, "pipeline": train_mode}[a.mode](a)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
