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
        if trainer._is_writer():
            _plot_run(trainer.out, cfg.algorithm.method)
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

    GIB_ = mem.GIB

    custom = {k: getattr(args, k) for k in ("params", "block_params", "blocks", "hidden", "ffn_dim")}
    if args.preset and any(v is not None for v in custom.values()):
        raise ValueError("give --preset or the model's numbers (--params, --block-params, --blocks, "
                         "--hidden, --ffn-dim), not both")
    options = dict(rollout_per_rank=args.rollout_per_rank, data_per_rank=args.data_per_rank, parallel=args.parallel,
                   kl_reference=args.kl_reference, ema=args.ema, sampler_steps=args.sampler_steps, prompts=args.prompts,
                   micro_batch=args.micro_batch, guidance_scale=args.guidance_scale)
    if args.context_parallel != 1:
        options["context_parallel"] = args.context_parallel
    if args.summary:
        print(mem.summary_table(tuple(args.world_size), **options))
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
                                        sampler_steps=args.sampler_steps, trained_steps=args.trained_steps,
                                        compute_bytes=est.inputs["compute_bytes"],
                                        activation_checkpointing=args.activation_checkpointing)
            print(f"context parallelism {args.context_parallel} ({w // args.context_parallel} data ranks): "
                  f"{comm['per forward row'] / GIB_:.2f} GiB sent per GPU per forward row; per step "
                  f"{comm['rollout'] / GIB_:.1f} GiB (rollout, {args.sampler_steps} steps) + {comm['update'] / GIB_:.1f} "
                  f"GiB (update, {args.trained_steps} trained steps) = {comm['step'] / GIB_:.1f} GiB")
        print("ESTIMATE from the formula in ddrl_engine/trainer/memory.py (not measured), for full fine-tuning "
              "(every parameter trained, fp32 master weights and AdamW states; LoRA runs are not modelled); CUDA "
              "context, NCCL buffers and fragmentation are not included\n")


def _add_memory_parser(sub):
    from ddrl_engine.trainer.memory import IMAGE_RESOLUTIONS, PRESETS, RESOLUTIONS

    p = sub.add_parser("memory", help="estimated memory per GPU of a training step (FSDP2/DDP)",
                       description="Per-GPU memory ESTIMATE (formula in ddrl_engine/trainer/memory.py; not measured).")
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
    p.add_argument("--trained-steps", type=int, default=5,
                   help="trained sampling steps per update (for the context-parallel volume; default 5)")
    p.add_argument("--summary", action="store_true",
                   help="a markdown table of totals for every preset and resolution at each --world-size")
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
