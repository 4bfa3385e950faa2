"""End-to-end DDRL step throughput: a plain PyTorch eager baseline vs the engine, optimisations on in turn.

    python tools/bench_step.py --device cpu                    # small sizes, a few steps (minutes)
    python tools/bench_step.py --device cuda --json out.json   # tiny DiT + video-shaped DiT (~2 min, H200)

Variants, all from the same initial weights, seed and data, in one run:
  baseline       what public diffusion-RL code does: Python-list rollout stacked at the end, log-prob and
                 diffusion loss as unfused eager PyTorch (ddrl_engine.ops.reference *_eager), SDPA
                 attention, foreach AdamW, no graphs;
  engine         the Trainer: fused step_logprob/diffusion_loss ops, preallocated rollout buffers, fused
                 AdamW on CUDA (rollout.cuda_graph = false);
  +graphs        rollout.cuda_graph = true (CUDA only);
  +graphs+fp8    rollout.attention_backend = "fp8" as well (only when available_backends() says it is usable).
A variant that cannot run here is listed with the reason, never silently replaced.
Per variant: samples/s over --steps steps after --warmup steps, and the time split per phase (rollout,
reward + advantages, update), each boundary synchronised (Trainer(sync_timing=True)).
Configs: "tiny" (the default 8x8 digits DiT, K = 10, 4 x 8 samples) and "video": on CUDA a 1.3B-like
width (hidden 1536, 12 heads), depth 2, a 480p-like latent (16 x 4 x 60 x 104, patch 1x2x2: 6240
tokens), K = 8, 1 x 4 samples; on CPU a scaled-down video shape so the run takes minutes.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from dataclasses import replace

import torch

from ddrl_engine.algorithms import clipped_policy_loss, group_advantages, preset
from ddrl_engine.attention import available_backends
from ddrl_engine.data import DataStream
from ddrl_engine.models.dit import DiTConfig
from ddrl_engine.ops.reference import diffusion_loss_eager, step_logprob_eager
from ddrl_engine.data import Dataset
from ddrl_engine.trainer.builders import build_dataset
from ddrl_engine.trainer.config import OptimConfig, RolloutConfig, RunConfig, SamplerConfig, TrainConfig
from ddrl_engine.trainer.evaluate import decode
from ddrl_engine.trainer.profiling import build_trainer, machine


def bench_configs(device: str) -> dict[str, TrainConfig]:
    cuda = device.startswith("cuda")
    run = RunConfig(device=device, progress=False, out_dir="/tmp/ddrl_bench_step")
    tiny = TrainConfig(run=run, sampler=SamplerConfig(num_steps=10), algorithm=preset("ddrl", group_size=8),
                       rollout=RolloutConfig(conditions_per_step=4), optim=OptimConfig(lr=1e-5))
    if cuda:
        model = DiTConfig(in_channels=16, sample_size=(4, 60, 104), patch_size=(1, 2, 2), hidden=1536, depth=2, heads=12)
        k = 8
    else:
        model = DiTConfig(in_channels=4, sample_size=(2, 8, 8), patch_size=(1, 2, 2), hidden=128, depth=2, heads=4)
        k = 6
    video = TrainConfig(run=run, model=model, sampler=SamplerConfig(num_steps=k), algorithm=preset("ddrl", group_size=4),
                        rollout=RolloutConfig(conditions_per_step=1), optim=OptimConfig(lr=1e-5))
    return {"tiny": tiny, "video": video}


def synthetic_dataset(cfg: TrainConfig, n: int = 64) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand((n, *cfg.model.sample_shape), generator=g) * 2 - 1
    y = torch.randint(0, cfg.model.num_classes, (n,), generator=g)
    return Dataset(x, y, x[:8], y[:8])


def _sync(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


class EagerBaseline:
    """One DDRL step written the way public diffusion-RL code does it (see the module docstring).
    Shares the engine's sampler tables, rewards, advantages and data order; nothing fused, no buffers."""

    def __init__(self, trainer):
        self.t = trainer
        self.opt = torch.optim.AdamW(trainer.policy.parameters(), lr=trainer.cfg.optim.lr, foreach=True,
                                     weight_decay=trainer.cfg.optim.weight_decay)

    def _logprob(self, x_next, x, out, k):
        c = self.t.sampler.coefs(k)
        return step_logprob_eager(x_next, x, out, x_coef=c.x_coef, out_coef=c.out_coef, std=c.std,
                                  reduction=self.t.algo.logprob_reduction)

    def train_step(self) -> dict:
        t, algo, dev, s = self.t, self.t.algo, self.t.device, self.t.sampler
        policy = t.policy
        t0 = _sync(dev)
        policy.eval()
        classes = torch.randint(0, t.cfg.model.num_classes, (t.cfg.rollout.conditions_per_step,), generator=t.cond_gen)
        cond = classes.to(dev).repeat_interleave(algo.group_size)
        b = cond.shape[0]
        with torch.no_grad():
            x = torch.randn((b, *t.sample_shape), generator=t.rollout_gen, device=dev) * s.initial_scale
            states, lps = [x], []
            for k in range(s.num_steps):
                out = policy(x, s.network_level(k).expand(b), cond)
                c = s.coefs(k)
                mu = c.x_coef * x + c.out_coef * out
                x_next = mu + c.std * torch.randn(x.shape, generator=t.rollout_gen, device=dev)
                lps.append(self._logprob(x_next, x, out, k))
                states.append(x_next)
                x = x_next
            samples = s.finish(policy, x, cond)
            states, old_lp = torch.stack(states, 1), torch.stack(lps, 1)
        t1 = _sync(dev)
        batch = t.rewards.evaluate(decode(samples), cond, on_invalid="error")
        comps = torch.stack([batch.components[r.name] for r in t.rewards.rewards])
        adv = group_advantages(comps, algo.group_size, eps=algo.adv_eps, clip=algo.adv_clip,
                               weights=torch.tensor(t.rewards.weights, device=comps.device)).to(dev)
        reward = batch.total.mean().item()
        t2 = _sync(dev)
        x0, y = (v.to(dev) for v in t.data.next_batch())
        policy.train()
        self.opt.zero_grad(set_to_none=True)
        steps = t.trained_steps
        for k in steps:
            level = s.network_level(k).expand(b)
            out = policy(states[:, k], level, cond)
            pol, _ = clipped_policy_loss(self._logprob(states[:, k + 1], states[:, k], out, k), old_lp[:, k], adv,
                                         algo.clip_eps)
            eps = states[:, 0] / s.initial_scale
            pred = policy(s.noised(x0, eps, k), level, y)
            nc, dc = s.target_coefs(k)
            dat = diffusion_loss_eager(pred, x0, eps, noise_coef=nc, data_coef=dc)
            ((pol + algo.beta_data * dat) / len(steps)).backward()
            pol.item(), dat.item()  # the per-term logging every framework does
        torch.nn.utils.clip_grad_norm_(policy.parameters(), t.cfg.optim.grad_clip)
        self.opt.step()
        t3 = _sync(dev)
        return {"reward": reward, "time_rollout": t1 - t0, "time_reward": t2 - t1, "time_train": t3 - t2}


def variants(device: str) -> list[tuple[str, dict, str | None]]:
    """(name, rollout overrides, why it cannot run here or None)."""
    cuda = device.startswith("cuda")
    # On the bench device: on CUDA "usable" means the sm_90 kernel can run (not the CPU emulation).
    fp8_ok, fp8_why = available_backends(device).get("fp8", (False, "no fp8 backend"))
    no_cuda = None if cuda else "needs CUDA (CUDA graphs)"
    return [
        ("baseline", {}, None),
        ("engine", {}, None),
        ("engine+graphs", {"cuda_graph": True}, no_cuda),
        ("engine+graphs+fp8", {"cuda_graph": True, "attention_backend": "fp8"},
         no_cuda or (None if fp8_ok else f"fp8 attention unavailable: {fp8_why}")),
    ]


def run_variant(cfg: TrainConfig, dataset, name: str, overrides: dict, steps: int, warmup: int) -> dict:
    cfg = replace(cfg, rollout=replace(cfg.rollout, **overrides))
    trainer = build_trainer(cfg, dataset=dataset, sync_timing=True)
    runner = EagerBaseline(trainer) if name == "baseline" else trainer
    for _ in range(warmup):
        runner.train_step()
    times = {"time_rollout": 0.0, "time_reward": 0.0, "time_train": 0.0}
    t0 = _sync(cfg.run.device)
    for _ in range(steps):
        m = runner.train_step()
        for key in times:
            times[key] += m[key]
    wall = _sync(cfg.run.device) - t0
    samples = trainer.rollout_batch * steps
    res = {"variant": name, "samples_per_s": samples / wall, "step_ms": 1e3 * wall / steps,
           "rollout_ms": 1e3 * times["time_rollout"] / steps, "reward_ms": 1e3 * times["time_reward"] / steps,
           "update_ms": 1e3 * times["time_train"] / steps, "captures": getattr(trainer.runner, "captures", 0)}
    del runner, trainer
    gc.collect()
    if cfg.run.device.startswith("cuda"):
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--configs", default="tiny,video", help="comma-separated: tiny, video")
    ap.add_argument("--steps", type=int, default=0, help="measured steps per variant (default: 5 CUDA, 2 CPU)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured steps per variant (graphs capture here)")
    ap.add_argument("--variants", default="", help="comma-separated subset of variant names (default: all)")
    ap.add_argument("--no-tf32", action="store_true", help="keep fp32 matmuls exact on CUDA (default: TF32 on)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    steps = args.steps or (5 if cuda else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
        torch.backends.cudnn.allow_tf32 = not args.no_tf32
    wanted = set(filter(None, args.variants.split(",")))
    configs = bench_configs(args.device)
    results = {"machine": machine(), "device": args.device, "steps": steps, "warmup": args.warmup,
               "tf32": cuda and not args.no_tf32, "configs": {}}

    def save():  # after every variant: a run cut short (a time budget) keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2, default=str)
    print(f"# bench_step on {results['machine']}, device {args.device}, {steps} steps after {args.warmup} warm-up")
    for cname in filter(None, args.configs.split(",")):
        if cname not in configs:
            ap.error(f"unknown config {cname!r}; known: {', '.join(configs)}")
        cfg = configs[cname]
        dataset = build_dataset(cfg) if cname == "tiny" else synthetic_dataset(cfg)
        tokens = math.prod(cfg.model.grid)
        print(f"\n## {cname}: hidden {cfg.model.hidden}, depth {cfg.model.depth}, {tokens} tokens, "
              f"K = {cfg.sampler.num_steps}, {cfg.rollout.conditions_per_step * cfg.algorithm.group_size} samples/step\n")
        # reward ms: the baseline's includes its advantages; the engine computes them in the update
        # (after the data-loss pass, which reward workers overlap).
        print("| variant | samples/s | ms/step | rollout ms | reward ms | update ms | vs baseline |")
        print("|---|---|---|---|---|---|---|")
        rows, base = [], None
        results["configs"][cname] = {"model": cfg.model.to_dict(), "num_steps": cfg.sampler.num_steps,
                                     "tokens": tokens, "rows": rows}
        for name, overrides, why in variants(args.device):
            if wanted and name not in wanted:
                continue
            if why is not None:
                rows.append({"variant": name, "skipped": why})
                print(f"| {name} | - | - | - | - | - | not run: {why} |")
                continue
            try:
                r = run_variant(cfg, dataset, name, overrides, steps, args.warmup)
            except Exception as e:  # a variant that fails is reported, the others still run
                rows.append({"variant": name, "failed": f"{type(e).__name__}: {e}"})
                print(f"| {name} | - | - | - | - | - | FAILED: {type(e).__name__}: {str(e)[:200]} |", flush=True)
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                save()
                continue
            base = r["samples_per_s"] if name == "baseline" else base
            r["speedup"] = r["samples_per_s"] / base if base else None
            rows.append(r)
            sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
            print(f"| {name} | {r['samples_per_s']:.2f} | {r['step_ms']:.1f} | {r['rollout_ms']:.1f} | "
                  f"{r['reward_ms']:.1f} | {r['update_ms']:.1f} | {sp} |", flush=True)
            save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
