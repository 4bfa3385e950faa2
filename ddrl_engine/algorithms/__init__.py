"""The DDRL algorithm as pure functions of tensors and a DDRLConfig."""
from ddrl_engine.algorithms.advantages import group_advantages
from ddrl_engine.algorithms.config import METHODS, DDRLConfig, preset, with_method
from ddrl_engine.algorithms.losses import (PolicyLossStats, clipped_policy_loss, combine, data_loss, gaussian_kl,
                                          policy_data_loss)

__all__ = ["DDRLConfig", "METHODS", "preset", "with_method", "group_advantages", "clipped_policy_loss",
           "gaussian_kl", "data_loss", "policy_data_loss", "combine", "PolicyLossStats"]
