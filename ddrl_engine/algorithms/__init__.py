"""The DDRL algorithm as pure functions of tensors and a DDRLConfig; the peers' recipes as presets."""
from ddrl_engine.algorithms.advantages import group_advantages
from ddrl_engine.algorithms.config import METHODS, DDRLConfig, preset, with_method
from ddrl_engine.algorithms.losses import (BaselineForms, PolicyLossStats, clipped_policy_loss, combine, data_loss,
                                          edm_weight, gaussian_kl, policy_data_loss)
from ddrl_engine.algorithms.recipes import RECIPE_NAMES, RECIPES, Recipe, expand_recipe, flow_match_sigmas

__all__ = ["DDRLConfig", "METHODS", "preset", "with_method", "group_advantages", "clipped_policy_loss",
           "gaussian_kl", "data_loss", "policy_data_loss", "combine", "PolicyLossStats", "BaselineForms",
           "edm_weight", "RECIPES", "RECIPE_NAMES", "Recipe", "expand_recipe", "flow_match_sigmas"]
