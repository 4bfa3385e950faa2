"""ddrl-engine: the command line over the trainer.

  ddrl-engine demo --out DIR            base vs GRPO vs GRPO+KL vs DDRL on the built-in default
  ddrl-engine pretrain --config X.toml  pretrain (and cache) the base model
  ddrl-engine train --config X.toml     train one method; resumes from DIR/checkpoints when present
  ddrl-engine eval --config X.toml [--checkpoint DIR]
  ddrl-engine config                    print the default configuration, every field documented
"""
from __future__ import annotations

import argparse
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
    return cfg


def _setup(cfg):
    from ddrl_engine.trainer.builders import (build_dataset, build_evaluator, build_rewards, build_sampler,
                                              build_training_data)
    from ddrl_engine.trainer.pretrain import pretrain_base

    dataset = build_dataset(cfg)
    base = pretrain_base(cfg, dataset, device=cfg.run.device, progress=cfg.run.progress)
    rewards = build_rewards(cfg, dataset)
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


def cmd_train(args):
    from ddrl_engine.trainer.loop import Trainer

    cfg = _load(args)
    dataset, base, sampler, rewards, evaluator = _setup(cfg)
    trainer = Trainer(cfg, base, sampler, rewards, dataset, evaluator)
    if not args.no_resume:
        trainer.resume()
    evals = trainer.train()
    if evals:
        print(json.dumps(evals[-1], indent=2))


def cmd_eval(args):
    from ddrl_engine.trainer.checkpoint import load_checkpoint

    cfg = _load(args)
    dataset, base, sampler, rewards, evaluator = _setup(cfg)
    if args.checkpoint:
        load_checkpoint(args.checkpoint, {"model": base}, map_location=cfg.run.device)
    metrics, _ = evaluator(base, sampler, tuple(cfg.model.sample_shape), cfg.run.device)
    print(json.dumps(metrics, indent=2))


def cmd_config(args):
    from ddrl_engine.trainer.config import defaults_as_toml

    print(defaults_as_toml())


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
        p.add_argument("--config", help="TOML config (default: built-in defaults)")
        p.add_argument("--device", help="override run.device")
        if name == "train":
            p.add_argument("--steps", type=int, help="override run.steps (total, also when resuming)")
            p.add_argument("--out", help="override run.out_dir")
            p.add_argument("--no-resume", action="store_true", help="start fresh even if checkpoints exist")
        if name == "eval":
            p.add_argument("--checkpoint", help="checkpoint directory (default: the base model)")
        p.set_defaults(fn=fn)

    p = sub.add_parser("config", help="print the default configuration with every field documented")
    p.set_defaults(fn=cmd_config)

    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"ddrl-engine {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
