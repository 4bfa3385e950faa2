"""One rank of a context-parallel test run (launched by tests/test_context_parallel.py with torchrun).

python -m torch.distributed.run --nproc_per_node N -m tests.cp_worker MODE OUT RESULT [options]

MODE "model": a DiT (the image or the video config, --video) with random weights, sharded over a cp
    group of all N ranks; rank 0 writes its output and parameter gradients (for a loss that every rank
    computes from the gathered output) and the same from the unsharded model, so the test compares them.
MODE "train": the trainer test config (tests/test_context_parallel.cp_config) under
    distributed.context_parallel = --cp, for --steps steps (checkpoint every 2), resuming from --resume;
    rank 0 writes per step the global advantages and the update's metrics, and the final weights.
"""
import argparse
import json

import torch
import torch.distributed as dist


def model_mode(a):
    from ddrl_engine.models.dit import DiT
    from tests.test_context_parallel import model_case

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg, x, t, y, g = model_case(a.video, a.seed)
    torch.manual_seed(a.seed)
    plain = DiT(cfg)
    for p in plain.parameters():  # adaLN-Zero starts at zero: make the output depend on every weight
        torch.nn.init.normal_(p, std=0.2, generator=g)
    sharded = DiT(cfg)
    sharded.load_state_dict(plain.state_dict())
    sharded.set_context_parallel(dist.group.WORLD)
    out = {}
    for name, model in (("plain", plain), ("cp", sharded)):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            o = model(x, t, y)
        out[f"{name}_ranges"] = {e.key: e.count for e in prof.key_averages() if e.key.startswith("ddrl/cp/")}
        loss = (o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view_as(o)).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        if name == "cp":  # the trainer's rule: average over the ranks (each holds N x its tokens' part)
            for gr in grads.values():
                dist.all_reduce(gr)
                gr /= dist.get_world_size()
        out[name] = {"out": o.detach(), "grads": grads}
    if rank == 0:
        torch.save(out, a.result)
    dist.destroy_process_group()


def train_mode(a):
    from tests.test_context_parallel import cp_config, make_cp_trainer, run_records

    cfg = cp_config(a.out, a.video, a.steps, parallel=a.parallel, cp=a.cp)
    trainer = make_cp_trainer(cfg)
    if a.resume:
        assert trainer.resume(a.resume)
    records = run_records(trainer, gather=trainer.dist.gather, save_every=cfg.run.ckpt_every)
    # every rank takes part (FSDP2's full_tensor is a collective); rank 0 writes
    weights = {k: trainer.dist.full(v) for k, v in trainer._module().state_dict().items()}
    if trainer.dist.rank == 0:
        torch.save(weights, a.result + ".weights.pt")
        with open(a.result, "w") as f:
            json.dump({"world_size": trainer.dist.world_size, "data_size": trainer.dist.data_size,
                       "records": records}, f)
    trainer.dist.close()


def main():
    p = argparse.ArgumentParser()
    for name in ("mode", "out", "result"):
        p.add_argument(name)
    p.add_argument("--video", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--parallel", default="ddp")
    p.add_argument("--resume")
    a = p.parse_args()
    (model_mode if a.mode == "model" else train_mode)(a)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
