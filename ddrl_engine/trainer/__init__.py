"""The trainer: config, the DDRL loop, checkpoints, evaluation, distribution (torchrun/FSDP2).

The only layer that brings the others together (see docs/backend.md for the stable names).
"""
from ddrl_engine.trainer.config import TrainConfig, config_from_dict, load_config
from ddrl_engine.trainer.loop import Trainer

__all__ = ["TrainConfig", "Trainer", "config_from_dict", "load_config"]
