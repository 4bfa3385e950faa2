"""ddrl-engine: the command line over the trainer.

  ddrl-engine demo --out DIR            base vs GRPO vs GRPO+KL vs DDRL on the built-in default
  ddrl-engine pretrain --config X.toml  pretrain (and cache) the base model
  ddrl-engine train --config X.toml     train one method; resumes from DIR/checkpoints when present
  ddrl-engine eval --run RUN_DIR | [--config X.toml] [--checkpoint DIR]   (EMA weights when kept; any checkpoint kind)
  ddrl-engine export --run RUN_DIR --out DIR   a pipeline run as a diffusers LoRA file (or transformer folder)
  ddrl-engine config                    print the default configuration, every field documented
  ddrl-engine memory --preset wan2.1-14b --resolution 720p --world-size 64 --activation-checkpointing
                                        estimated memory per GPU (a formula, not a measurement)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import replace
from pathlib import Path


def _load(args):
    from ddrl_engine.trainer.config import TrainConfig, load_config

    cfg = load_config(args.config) if args.config else TrainConfig()
    if getattr(args, "steps", None) is not None:
        cfg = replace(cfg, run=replace(cfg.run, steps=args.steps))
    if getattr(args, "out", None):
        cfg = replace(cfg, run=replace(cfg.run, out_dir=args.out))
    if getattr(args, "device", None):
        cfg = replace(cfg, run=replace(cfg.run, device=args.device))
    from ddrl_engine.trainer.validate import check_runnable

    check_runnable(cfg)  # the device, world size, rewards and memory: before any pretraining or loading
    return cfg


def _log(message: str) -> None:
    """Progress messages go to stderr: stdout carries the command's JSON result."""
    print(message, file=sys.stderr)


def _setup(cfg):
    from ddrl_engine.trainer.builders import (build_dataset, build_evaluator, build_rewards, build_sampler,
                                              build_training_data)
    from ddrl_engine.trainer.pretrain import pretrain_base

    dataset = build_dataset(cfg)
    base = pretrain_base(cfg, dataset, device=cfg.run.device, progress=cfg.run.progress, log=_log)
    rewards = build_rewards(cfg)
    sampler = build_sampler(cfg)
    evaluator = build_evaluator(cfg, dataset, rewards)
    return build_training_data(cfg, base, sampler, dataset), base, sampler, rewards, evaluator


def cmd_demo(args):
    from ddrl_engine.trainer.demo import run_demo

    summary = run_demo(args.out, config=args.config, steps=args.steps, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))


def cmd_study(args):
    from ddrl_engine.trainer.study import GRIDS, run_study

    names = [n for g in args.grid.split(",") for n in [g.strip()] if n]
    unknown = [n for n in names if n not in GRIDS]
    if unknown or not names:
        raise ValueError(f"--grid: unknown grid(s) {unknown or names} (known: {', '.join(GRIDS)})")
    variants = [v for n in names for v in GRIDS[n]]
    if args.variants:
        keep = [v.strip() for v in args.variants.split(",")]
        missing = sorted(set(keep) - {v.name for v in variants})
        if missing:
            raise ValueError(f"--variants: {missing} not in grid(s) {names} ({', '.join(v.name for v in variants)})")
        variants = [v for v in variants if v.name in keep]
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    study = run_study(args.out, config=args.config, variants=variants, seeds=seeds, steps=args.steps,
                      eval_every=args.eval_every, reward=args.reward, probe_steps=args.probe_steps,
                      progress=not args.no_progress)
    print(f"{len(study['runs'])} runs; report: {args.out}/report.md")


def cmd_pretrain(args):
    from ddrl_engine.trainer.builders import build_dataset
    from ddrl_engine.trainer.pretrain import base_cache_path, pretrain_base

    cfg = _load(args)
    dataset = build_dataset(cfg)
    pretrain_base(cfg, dataset, device=cfg.run.device, progress=cfg.run.progress)
    print(base_cache_path(cfg, dataset))


def _is_pipeline(cfg) -> bool:
    from ddrl_engine.trainer.config import PipelineModelConfig

    return isinstance(cfg.model, PipelineModelConfig)


def _trainer(cfg, stack, *, progress=True):
    """The Trainer of `cfg`: the built-in DiT default, or a pipeline folder's model (PipelineRun)."""
    from ddrl_engine.trainer.loop import Trainer

    if not _is_pipeline(cfg):
        from ddrl_engine.trainer.builders import build_trainer_rewards

        dataset, base, sampler, rewards, evaluator = _setup(cfg)
        trainer_rewards = build_trainer_rewards(cfg, rewards)  # reward workers, when configured
        if trainer_rewards is not rewards:
            stack.enter_context(trainer_rewards)
        return Trainer(cfg, base, sampler, trainer_rewards, dataset, evaluator)
    from ddrl_engine.trainer.pipeline_run import build_pipeline_run, reward_factory

    run = build_pipeline_run(cfg, log=_log, progress=progress)
    rewards = run.rewards
    w = cfg.reward_workers
    if w.workers:
        from ddrl_engine.rewards import AsyncReward

        rewards = stack.enter_context(AsyncReward(
            reward_factory(cfg, run.texts), workers=w.workers, timeout_s=w.timeout_s, retries=w.retries,
            on_invalid=cfg.run.on_invalid_reward, on_failure=w.on_failure, worker_threads=w.threads))
    return Trainer(cfg, run.policy, run.sampler, rewards, run.dataset, run.evaluator, conditions=run.conditions,
                   decode=run.decode, log=_log)


def cmd_train(args):
    cfg = _load(args)
    with contextlib.ExitStack() as stack:
        trainer = _trainer(cfg, stack, progress=cfg.run.progress)
        if not args.restart:
            trainer.resume()  # the newest whole checkpoint; an error when all are damaged (never a silent restart)
        evals = trainer.train()
        writer, out = trainer._is_writer(), trainer.out
        del trainer  # it holds the process groups (FSDP2 state, meshes): dropped before they are freed
    if writer:
        _plot_run(out, cfg.algorithm.method)
    from ddrl_engine.trainer.distributed import Distributed

    Distributed.close()  # under torchrun: joins gloo's worker threads while the interpreter is alive
    if evals:
        print(json.dumps(evals[-1], indent=2))


def _plot_run(out: Path, method: str) -> None:
    """out/curves.png: the run's evaluations over steps (all of metrics.jsonl, resumed parts included)."""
    from ddrl_engine.trainer.report import plot_curves

    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    evals = [r for r in lines if r.get("kind") == "eval"]
    if evals:
        plot_curves(out, {method: evals}, evals[0])
        _log(f"curves: {out / 'curves.png'}")


def _run_checkpoint(args):
    """(config path, checkpoint dir) of --run RUN_DIR (its config.json, its latest checkpoint) or of
    --checkpoint DIR (the checkpoint's config.json unless --config)."""
    from ddrl_engine.trainer.checkpoint import latest_checkpoint

    ckpt, config = getattr(args, "checkpoint", None), args.config
    if getattr(args, "run", None):
        run = Path(args.run)
        if not (run / "config.json").is_file():
            raise FileNotFoundError(f"--run: {run} is not a run folder (no config.json)")
        ckpt = ckpt or latest_checkpoint(run / "checkpoints")
        if ckpt is None:
            raise FileNotFoundError(f"--run: {run} has no checkpoint yet (no {run / 'checkpoints' / 'latest'})")
        config = config or str(run / "config.json")
    if ckpt and not Path(ckpt).is_dir():
        raise FileNotFoundError(f"--checkpoint: no checkpoint folder at {ckpt}")
    if ckpt and not config and (Path(ckpt) / "config.json").is_file():
        config = str(Path(ckpt) / "config.json")  # the run's own configuration
    return config, ckpt


def cmd_eval(args):
    from ddrl_engine.trainer.checkpoint import load_weights

    args.config, ckpt = _run_checkpoint(args)
    cfg = _load(args)
    if _is_pipeline(cfg):
        from ddrl_engine.trainer.pipeline_run import build_pipeline_run

        run = build_pipeline_run(cfg, log=_log, progress=cfg.run.progress)
        model, sampler, evaluator = run.policy, run.sampler, run.evaluator
    else:
        _, model, sampler, _, evaluator = _setup(cfg)
    if ckpt:
        which = load_weights(ckpt, model, map_location=cfg.run.device)
        _log(f"evaluating the {which!r} weights of {ckpt}")
    from ddrl_engine.sampling.guidance import guided

    # the training evaluations' policy: the rollouts' guidance (rollout.guidance_scale; 1 = the model itself)
    policy = guided(model, cfg.rollout.guidance_scale)
    metrics, samples = evaluator(policy, sampler, model.sample_shape, cfg.run.device)
    if args.out and hasattr(evaluator, "save_samples"):
        _log(f"samples: {evaluator.save_samples(samples, Path(args.out) / 'samples')}")
    print(json.dumps(metrics, indent=2))


def cmd_export(args):
    from ddrl_engine.trainer.checkpoint import load_weights

    args.config, ckpt = _run_checkpoint(args)
    cfg = _load(args)
    if not _is_pipeline(cfg):
        raise ValueError("export writes a diffusers LoRA file or transformer folder: the run's [model] must be a "
                         "pipeline (kind = 'sd3', 'flux' or 'wan'); a DiT run's weights are its checkpoint's "
                         "model.safetensors")
    from ddrl_engine.models.lora_export import export_lora, export_transformer
    from ddrl_engine.trainer.pipeline_run import load_policy

    policy = load_policy(cfg, log=_log).policy
    which = load_weights(ckpt, policy, map_location=cfg.run.device)
    out = export_lora(policy, args.out) if cfg.model.lora_rank else export_transformer(policy, args.out)
    _log(f"exported the {which!r} weights of {ckpt} to {out}")
    if len(getattr(policy, "experts", ())) > 1:  # two-expert Wan2.2: transformer and transformer_2
        from ddrl_engine.models.lora_export import LORA_WEIGHT_NAME_2

        _log(f"load both experts with: pipe.load_lora_weights({str(args.out)!r}); pipe.load_lora_weights("
             f"{str(args.out)!r}, weight_name={LORA_WEIGHT_NAME_2!r}, load_into_transformer_2=True)" if cfg.model.lora_rank
             else f"the experts are {out}/transformer and {out}/transformer_2 (the pipeline's subfolders)")
    print(out)


def cmd_config(args):
    from ddrl_engine.trainer.config import defaults_as_toml

    print(defaults_as_toml())


def cmd_memory(args):
    from ddrl_engine.trainer import memory as mem
    from ddrl_engine.trainer.throughput import PEAK_TFLOPS, step_seconds

    GIB_ = mem.GIB

    custom = {k: getattr(args, k) for k in ("params", "block_params", "blocks", "hidden", "ffn_dim")}
    if args.preset and any(v is not None for v in custom.values()):
        raise ValueError("give --preset or the model's numbers (--params, --block-params, --blocks, "
                         "--hidden, --ffn-dim), not both")
    options = dict(rollout_per_rank=args.rollout_per_rank, data_per_rank=args.data_per_rank, parallel=args.parallel,
                   kl_reference=args.kl_reference, ema=args.ema, sampler_steps=args.sampler_steps, prompts=args.prompts,
                   micro_batch=args.micro_batch, guidance_scale=args.guidance_scale)
    if args.context_parallel != 1:
        options.update(context_parallel=args.context_parallel, cp_attention=args.cp_attention)
    if args.lora_rank or args.dtype != "fp32":
        options.update(lora_rank=args.lora_rank, dtype=args.dtype)
    trained = args.trained_steps if args.trained_steps is not None else -(-args.sampler_steps // 2)  # every other
    steps = dict(trained_steps=trained, data_loss_steps=args.data_loss_steps, ppo_epochs=args.ppo_epochs,
                 recompute_old_logprobs=args.recompute_old_logprobs)
    plan = mem.step_plan(activation_checkpointing=args.activation_checkpointing, **steps, **options)  # checks them
    step_seconds(0, mfu=args.mfu)  # checks --mfu before any output
    if args.summary:
        print(mem.summary_table(tuple(args.world_size), **options))
        return
    if args.notes:
        options.update(lora_rank=args.lora_rank or 32, dtype=args.dtype)
        for w in args.world_size:
            print(mem.notes_table(world_size=w, mfu=args.mfu, activation_checkpointing=args.activation_checkpointing,
                                  **steps, **options))
        print(f"ESTIMATES from formulas (ddrl_engine/trainer/memory.py, throughput.py), not measured: {args.dtype} "
              f"policy weights, LoRA rank {options['lora_rank']} or full fine-tuning; s/step at an ASSUMED MFU of "
              f"{args.mfu:g} of the {PEAK_TFLOPS['H100 SXM']:g} TFLOP/s bf16 dense peak (H100 SXM = H200 SXM)")
        return
    preset = mem.PRESETS[args.preset] if args.preset else None
    if preset is not None:
        shape = preset.shape
    else:
        missing = [f"--{k.replace('_', '-')}" for k, v in custom.items() if v is None]
        if missing:
            raise ValueError(f"give --preset ({', '.join(mem.PRESETS)}) or all of the model's numbers "
                             f"(missing {', '.join(missing)})")
        shape = mem.ModelShape(params=args.params, block_params=args.block_params, num_blocks=args.blocks,
                               hidden=args.hidden, ffn_dim=args.ffn_dim, latent_per_token=args.latent_per_token)
    video = [args.frames, args.height, args.width]
    if args.tokens is not None and (args.resolution or any(v is not None for v in video)):
        raise ValueError("give --tokens or the video size (--resolution, or --frames/--height/--width), not both")
    if args.tokens is not None:
        tokens, what = args.tokens, f"{args.tokens:,} tokens"
    elif preset is not None and not preset.video:  # an image model: [H, W]
        if args.frames is not None:
            raise ValueError(f"--frames is for video models; {args.preset} takes --height and --width")
        if args.resolution or (args.height is None and args.width is None):
            tokens, what = mem.preset_tokens(preset, args.resolution or "1024px")
        elif None in (args.height, args.width):
            raise ValueError("--height and --width go together (and replace --resolution)")
        else:
            tokens, what = mem.image_tokens(args.height, args.width), f"{args.width}x{args.height}"
        what = f"{what} = {tokens:,} image + {shape.text_tokens} text tokens"
    else:
        if any(v is not None for v in video):
            if None in video or args.resolution:
                raise ValueError("--frames, --height and --width go together (and replace --resolution)")
            frames, height, width = video
        elif (args.resolution or "480p") not in mem.RESOLUTIONS:
            raise ValueError(f"--resolution {args.resolution} is an image size; video models take "
                             f"{', '.join(sorted(mem.RESOLUTIONS))}")
        else:
            frames, height, width = mem.RESOLUTIONS[args.resolution or "480p"]
        tokens = mem.video_tokens(frames, height, width)
        what = f"{frames} frames {width}x{height} = {tokens:,} tokens"
    tp = mem.throughput_estimate(preset or shape, tokens=tokens, plan=plan, lora_rank=args.lora_rank, mfu=args.mfu,
                                 context_parallel=args.context_parallel)
    for w in args.world_size:
        est = mem.estimate_memory(shape, tokens=tokens, world_size=w, activation_checkpointing=args.activation_checkpointing,
                                  **options)
        print(f"{args.preset or 'custom model'}: {shape.params / 1e9:.2f}B parameters, {what}, {args.parallel} "
              f"over {w} GPUs, per rank {args.rollout_per_rank} rollout + {args.data_per_rank} data samples, "
              f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}"
              + (f", guidance scale {args.guidance_scale:g} ({est.inputs['activation_rows']} rows in the "
                 "policy-loss forward)" if args.guidance_scale != 1.0 else ""))
        print(est.table())
        print(est.fits())
        if args.context_parallel != 1:
            comm = mem.cp_communication(shape, tokens=tokens, context_parallel=args.context_parallel,
                                        rollout_rows=args.rollout_per_rank, data_rows=args.data_per_rank,
                                        sampler_steps=args.sampler_steps, trained_steps=trained,
                                        compute_bytes=est.inputs["compute_bytes"],
                                        activation_checkpointing=args.activation_checkpointing,
                                        cp_attention=args.cp_attention)
            print(f"context parallelism {args.context_parallel} ({w // args.context_parallel} data ranks): "
                  f"{args.cp_attention} attention, {comm['per forward row'] / GIB_:.2f} GiB sent per GPU per forward "
                  f"row, {comm['per backward row'] / GIB_:.2f} GiB per backward row; per step "
                  f"{comm['rollout'] / GIB_:.1f} GiB (rollout, {args.sampler_steps} steps) + {comm['update'] / GIB_:.1f} "
                  f"GiB (update, {trained} trained steps) = {comm['step'] / GIB_:.1f} GiB")
        phases = " + ".join(f"{k} {v / 1e12:,.1f}" for k, v in tp["phases"].items() if v and k != "step")
        print(f"compute per GPU per step{'' if preset else ' (custom model: every block weight on every token)'}: "
              f"{phases} = {tp['phases']['step'] / 1e12:,.1f} TFLOP (one row's forward "
              f"{tp['forward'] / 1e12:,.2f} TFLOP, "
              f"{tp['attention'] / tp['forward']:.0%} attention); at an ASSUMED MFU of {args.mfu:g} of the "
              f"{PEAK_TFLOPS['H100 SXM']:g} TFLOP/s bf16 dense peak (H100 SXM = H200 SXM): {tp['seconds']:,.2f} s/step, "
              f"{tp['samples_per_s']:.3g} rollout samples/s per GPU ({tp['samples_per_s'] * w:.3g} over {w} GPUs)")
        tuning = (f"LoRA rank {args.lora_rank} (frozen {args.dtype} base; fp32 adapters, their gradients and AdamW "
                  "states)" if args.lora_rank else
                  "full fine-tuning (every parameter trained; fp32 master weights, gradients and AdamW states "
                  "whatever --dtype)")
        print(f"ESTIMATE from the formulas in ddrl_engine/trainer/memory.py and throughput.py (not measured), for {tuning}; "
              "CUDA context, NCCL buffers and fragmentation are not included; the time leaves out rewards, evaluation, "
              "communication and the optimizer\n")


def _add_memory_parser(sub):
    from ddrl_engine.trainer.memory import IMAGE_RESOLUTIONS, PRESETS, RESOLUTIONS
    from ddrl_engine.trainer.throughput import DEFAULT_MFU

    p = sub.add_parser("memory", help="estimated memory per GPU and time of a training step (FSDP2/DDP)",
                       description="Per-GPU memory and step-time ESTIMATES (formulas in ddrl_engine/trainer/memory.py "
                                   "and throughput.py; not measured; the time at an assumed MFU).")
    p.add_argument("--preset", "--model", dest="preset", choices=list(PRESETS),
                   help="a published model's dimensions: " + ", ".join(
                       f"{k} ({v.source}, {v.shape.params / 1e9:.1f}B)" for k, v in PRESETS.items()))
    p.add_argument("--params", type=int, help="custom model: all parameters")
    p.add_argument("--block-params", type=int, help="custom model: parameters of the largest transformer block")
    p.add_argument("--blocks", type=int, help="custom model: number of transformer blocks")
    p.add_argument("--hidden", type=int, help="custom model: token width")
    p.add_argument("--ffn-dim", type=int, help="custom model: FFN width")
    p.add_argument("--latent-per-token", type=int, default=64, help="latent values per token (default 64: 16 x 1x2x2)")
    p.add_argument("--resolution", choices=sorted(RESOLUTIONS) + sorted(IMAGE_RESOLUTIONS),
                   help="video models: an 81-frame size (default 480p); image models: a square size (default 1024px)")
    p.add_argument("--frames", type=int, help="video frames (with --height, --width)")
    p.add_argument("--height", type=int, help="video or image height in pixels")
    p.add_argument("--width", type=int, help="video or image width in pixels")
    p.add_argument("--tokens", type=int, help="transformer tokens per sample (instead of a video size)")
    p.add_argument("--world-size", type=int, nargs="+", default=[8], help="GPUs (one or more; default 8)")
    p.add_argument("--parallel", choices=("fsdp", "ddp", "none"), default="fsdp")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--rollout-per-rank", type=int, default=1, help="rollout samples per rank (default 1)")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="rollout.guidance_scale (not 1 or 0: two rows per rollout sample in the policy-loss forward)")
    p.add_argument("--micro-batch", type=int, default=0,
                   help="optim.micro_batch: rows per forward/backward in the update (default 0: all)")
    p.add_argument("--data-per-rank", type=int, default=1, help="data samples per rank (default 1; 0 without data loss)")
    p.add_argument("--kl-reference", action="store_true", help="a frozen KL reference copy (algorithm.beta_kl > 0)")
    p.add_argument("--ema", action="store_true", help="EMA weights (optim.ema_decay > 0)")
    p.add_argument("--sampler-steps", type=int, default=10, help="sampler steps K (rollout states kept: K + 1)")
    p.add_argument("--prompts", type=int, default=0, help="prompts in the policy's prompt bank on the device")
    p.add_argument("--context-parallel", type=int, default=1,
                   help="distributed.context_parallel: GPUs splitting each sample's tokens (default 1); also prints "
                        "the all-to-all volume per step")
    p.add_argument("--cp-attention", choices=("ulysses", "ring"), default="ulysses",
                   help="distributed.context_parallel_attention (default ulysses; ring needs no head divisibility "
                        "and sends each block's K/V round the cp group)")
    p.add_argument("--trained-steps", type=int,
                   help="trained sampling steps per update (algorithm.train_steps; default every other sampler step)")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="model.lora_rank: adapters on the default lora_targets over a frozen base (default 0: full)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="the policy's parameter dtype (a pipeline run's model.dtype, default there bf16; default here "
                        "fp32, the built-in DiT's)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                   help=f"ASSUMED model FLOP utilisation for the step time (default {DEFAULT_MFU})")
    p.add_argument("--data-loss-steps", choices=("all", "one"), default="all", help="algorithm.data_loss_steps")
    p.add_argument("--ppo-epochs", type=int, default=1, help="algorithm.ppo_epochs")
    p.add_argument("--recompute-old-logprobs", action="store_true", help="rollout.recompute_old_logprobs")
    p.add_argument("--summary", action="store_true",
                   help="a markdown table of totals for every preset and resolution at each --world-size")
    p.add_argument("--notes", action="store_true",
                   help="a markdown table per preset and resolution: LoRA (--lora-rank, default 32) and full "
                        "fine-tuning, memory per GPU, fits, TFLOP and seconds per step at --mfu")
    p.set_defaults(fn=cmd_memory)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="ddrl-engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the full comparison on the built-in default")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", help="TOML config (default: the packaged configs/demo.toml)")
    p.add_argument("--steps", type=int, help="training steps per method")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("study", help="every method over regulariser strengths and seeds (resumable): fronts, "
                                     "matched-reward table, report")
    p.add_argument("--out", required=True, help="study folder (rerun the same command to resume)")
    p.add_argument("--config", help="TOML config (default: the packaged configs/demo.toml)")
    p.add_argument("--grid", default="default", help="variant grids, comma-separated: default (the methods and "
                   "the references' forms), investigate (DDRL with one setting changed at a time)")
    p.add_argument("--variants", help="only these variants of the grid(s), comma-separated")
    p.add_argument("--seeds", default="0,1,2", help="run.seed values (default 0,1,2)")
    p.add_argument("--steps", type=int, help="training steps per run (default: the config's)")
    p.add_argument("--eval-every", type=int, default=40, help="evaluation (and checkpoint) period (default 40)")
    p.add_argument("--reward", help="train on this built-in reward instead of the config's (e.g. class_margin)")
    p.add_argument("--probe-steps", type=int, default=12, help="updates of the per-step gradient probe of each "
                   "DDRL variant (0 = none; default 12)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_study)

    for name, fn, help_ in (("pretrain", cmd_pretrain, "pretrain and cache the base model"),
                            ("train", cmd_train, "train one method from the config"),
                            ("eval", cmd_eval, "evaluate the base model or a checkpoint")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", help="TOML config, or a run's config.json (default: built-in defaults)")
        p.add_argument("--device", help="override run.device")
        if name == "train":
            p.add_argument("--steps", type=int, help="override run.steps (total, also when resuming)")
            p.add_argument("--out", help="override run.out_dir")
            p.add_argument("--restart", "--no-resume", dest="restart", action="store_true",
                           help="start a new run at step 0 even if checkpoints exist (they are kept; the old "
                                "metrics.jsonl is moved to metrics.jsonl.old-N)")
        if name == "eval":
            p.add_argument("--run", help="a run folder: its config.json and latest checkpoint")
            p.add_argument("--checkpoint", help="checkpoint directory, of a one-process or distributed run: its EMA "
                                                "weights when kept, else the model's; its config.json unless --config "
                                                "(default: the base model)")
            p.add_argument("--out", help="also write the evaluation's samples (PNG grid, GIF for video) here")
        p.set_defaults(fn=fn)

    p = sub.add_parser("export", help="a pipeline run's weights for diffusers: LoRA (pipe.load_lora_weights) or a "
                                      "transformer folder (from_pretrained)")
    p.add_argument("--run", required=True, help="the run folder (its config.json and latest checkpoint)")
    p.add_argument("--checkpoint", help="a checkpoint of the run other than its latest")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--device", help="override run.device")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("config", help="print the default configuration with every field documented")
    p.set_defaults(fn=cmd_config)
    _add_memory_parser(sub)

    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"ddrl-engine {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
