"""The trainer: config, the DDRL loop, checkpoints, evaluation, distribution (torchrun/FSDP2).

The only layer that brings the others together. The names below are the stable ones (docs/backend.md);
the built-in default's builders (DiT, digits) live in `ddrl_engine.trainer.builders`.
"""
from ddrl_engine.trainer.checkpoint import CheckpointManager, load_weights
from ddrl_engine.trainer.config import (DataConfig, DistributedConfig, EvalConfig, OptimConfig, PretrainConfig,
                                        RewardWorkersConfig, RolloutConfig, RunConfig, SamplerConfig, TrainConfig,
                                        config_from_dict, load_config)
from ddrl_engine.trainer.evaluate import Evaluator
from ddrl_engine.trainer.loop import RewardOutcome, RolloutBatch, Trainer
from ddrl_engine.trainer.optim import build_optimizer

__all__ = [
    "CheckpointManager",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "Evaluator",
    "OptimConfig",
    "PretrainConfig",
    "RewardOutcome",
    "RewardWorkersConfig",
    "RolloutBatch",
    "RolloutConfig",
    "RunConfig",
    "SamplerConfig",
    "TrainConfig",
    "Trainer",
    "build_optimizer",
    "config_from_dict",
    "load_config",
    "load_weights",
]
