"""DDRLConfig: the coefficients of the DDRL loss; the baselines are presets of the same code."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ddrl_engine.algorithms.recipes import RECIPE_NAMES, RECIPES, SWITCHES

METHODS = ("ddrl", "grpo", "grpo_kl", "sft")
# Each method's regulariser switches: the values of the fields left unset (None) for that method.
PRESETS = {
    "ddrl": dict(beta_data=0.01, beta_kl=0.0, use_reward=True),
    "grpo": dict(beta_data=0.0, beta_kl=0.0, use_reward=True),
    "grpo_kl": dict(beta_data=0.0, beta_kl=0.04, use_reward=True),
    "sft": dict(beta_data=1.0, beta_kl=0.0, use_reward=False),
}
# The baseline forms (docs/method.md section 13): field -> its values, the first the default (today's).
FORMS = {
    "kl_form": ("exact", "flow_grpo"),
    "adv_std": ("population", "unbiased"),
    "data_weighting": ("none", "edm"),
    "logprob_form": ("density", "cosmos"),
}


@dataclass
class DDRLConfig:
    """Everything the loss needs to know. Field docs are the single reference (configs/*.toml).

    method: one of "ddrl" (data regulariser), "grpo" (no regulariser), "grpo_kl" (reverse KL to the
        reference, Flow-GRPO style), "sft" (data loss only, no reward). It sets beta_data, beta_kl and
        use_reward where they are not given (ddrl: 0.01, 0, true; grpo: 0, 0, true; grpo_kl: 0, 0.04,
        true; sft: 1, 0, false); given values win. A recipe name ("flow_grpo", "dance_grpo",
        "cosmos_ddrl") is accepted by `preset` and, in TOML, as an alias of `recipe = "..."`.
    group_size: rollouts per condition (G); advantages are normalised within each group.
    beta_data: weight of the diffusion loss on off-policy data (the forward-KL regulariser); default:
        the method's.
    beta_kl: weight of the closed-form reverse KL ||mu - mu_ref||^2 / (2 s^2) to the frozen base;
        default: the method's.
    clip_eps: PPO clip range of the likelihood ratio.
    adv_eps: added to the group std when normalising rewards.
    adv_clip: advantages are clamped to [-adv_clip, adv_clip].
    adv_lambda: apply A <- -exp(-A) (the DDRL objective's lambda) after normalisation.
    train_steps: which of the K sampling steps are trained: "all", "every_other", or a list of
        step indices.
    ppo_epochs: passes over one rollout batch (the ratio differs from 1 after the first).
    data_noise: "rollout" (the data loss uses each trained step's noise level and the rollout's
        initial noise, the reference default) or "fresh" (random level and noise).
    data_loss_steps: "all" (the data loss at every trained step, the reference default) or "one" (at
        one trained step per update, drawn uniformly, weighted as the mean over the trained steps: an
        unbiased estimate of the same term at 1/|trained steps| of the cost; the paper's ablation
        "data loss once per data item" found it works as well).
    logprob_reduction: "mean" or "sum" over the elements of a transition's log-density.
    use_reward: False only for "sft" (default: the method's).
    kl_form: "exact" (the closed-form KL of the two Gaussian steps, default) or "flow_grpo" (Flow-GRPO's
        value: the exact KL times |dt_k| = t_k - t_{k+1} of the rectified-flow time, since it divides
        by 2 std_t^2 instead of 2 std_t^2 |dt|); "flow_grpo" needs sampler.name = "rectified_flow_sde".
    adv_std: the group std of the advantages: "population" (divide by n, default) or "unbiased"
        (Bessel's correction, n - 1 over the valid members; DanceGRPO, cosmos-rl).
    data_weighting: "none" (the plain per-element mean, default) or "edm" (the data loss at noise level
        s weighted by (s^2 + 1) / s^2, cosmos-rl's EDM weighting with sigma_data = 1); "edm" needs an EDM
        sampler (forward process x = x0 + s eps, target x0).
    logprob_form: the log-likelihood ratio of the policy loss: "density" (the step log-density, default)
        or "cosmos" (cosmos-rl's -mean_j (x_next - mu)^2, without 1/(2 s^2): the ratio's log is
        2 s_k^2 (lp - lp_old)); "cosmos" needs logprob_reduction = "mean".
    loss_scale: every backward's loss is multiplied by this (1 = none, default; cosmos-rl returns its RL
        loss times model.loss_scale = 10). With AdamW it matters through optim.grad_clip and Adam's eps.
    recipe: the peer recipe this configuration comes from ("" = none; ddrl_engine.algorithms.RECIPES,
        docs/porting.md). In a config file it expands like a top-level recipe = "..." (the fields the file
        does not set come from the recipe; config.json records the name this way); on a DDRLConfig built
        in Python it is only a record (use preset(name)).
    """

    method: str = "ddrl"
    group_size: int = 8
    beta_data: float | None = None
    beta_kl: float | None = None
    clip_eps: float = 1e-4
    adv_eps: float = 1e-4
    adv_clip: float = 5.0
    adv_lambda: bool = False
    train_steps: str | list[int] = "every_other"
    ppo_epochs: int = 1
    data_noise: str = "rollout"
    data_loss_steps: str = "all"
    logprob_reduction: str = "mean"
    use_reward: bool | None = None
    kl_form: str = "exact"
    adv_std: str = "population"
    data_weighting: str = "none"
    logprob_form: str = "density"
    loss_scale: float = 1.0
    recipe: str = ""

    def __post_init__(self):
        if self.method in RECIPES:
            raise ValueError(f"algorithm.method {self.method!r} is a recipe, not a method: use "
                             f"ddrl_engine.algorithms.preset({self.method!r}) in Python, or recipe = "
                             f"{self.method!r} in a TOML file")
        for name, value in PRESETS.get(self.method, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.validate()

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"algorithm.method must be one of {METHODS} (or a recipe {RECIPE_NAMES} in preset() "
                             f"or TOML), got {self.method!r}")
        if self.group_size < 2:
            raise ValueError(f"algorithm.group_size must be >= 2 (advantages are normalised per group), got {self.group_size}")
        for name in ("beta_data", "beta_kl", "adv_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"algorithm.{name} must be a finite number >= 0, got {v!r}")
        if not 0 < self.clip_eps < 1:  # NaN fails this too
            raise ValueError(f"algorithm.clip_eps must be in (0, 1), got {self.clip_eps}")
        if not 0 < self.adv_clip <= math.inf or self.adv_clip != self.adv_clip:
            raise ValueError(f"algorithm.adv_clip must be > 0, got {self.adv_clip}")
        if self.ppo_epochs < 1:
            raise ValueError(f"algorithm.ppo_epochs must be >= 1, got {self.ppo_epochs}")
        if self.data_noise not in ("rollout", "fresh"):
            raise ValueError(f"algorithm.data_noise must be 'rollout' or 'fresh', got {self.data_noise!r}")
        if self.data_loss_steps not in ("all", "one"):
            raise ValueError(f"algorithm.data_loss_steps must be 'all' or 'one', got {self.data_loss_steps!r}")
        if self.logprob_reduction not in ("mean", "sum"):
            raise ValueError(f"algorithm.logprob_reduction must be 'mean' or 'sum', got {self.logprob_reduction!r}")
        for name, choices in FORMS.items():
            value = getattr(self, name)
            if not isinstance(value, str) or value not in choices:
                raise ValueError(f"algorithm.{name} must be one of {choices}, got {value!r}")
        if self.logprob_form == "cosmos" and self.logprob_reduction != "mean":
            raise ValueError("algorithm.logprob_form = 'cosmos' (cosmos-rl's element-mean log-ratio) needs "
                             f"algorithm.logprob_reduction = 'mean', got {self.logprob_reduction!r}")
        ls = self.loss_scale
        if isinstance(ls, bool) or not isinstance(ls, (int, float)) or not math.isfinite(ls) or ls <= 0:
            raise ValueError(f"algorithm.loss_scale must be a finite number > 0, got {ls!r}")
        if not isinstance(self.recipe, str) or self.recipe not in ("",) + RECIPE_NAMES:
            raise ValueError(f"algorithm.recipe must be '' (none) or one of {RECIPE_NAMES}, got {self.recipe!r}")
        ts = self.train_steps
        if isinstance(ts, str):
            if ts not in ("all", "every_other"):
                raise ValueError(f"algorithm.train_steps must be 'all', 'every_other' or a list of step indices, got {ts!r}")
        elif not (isinstance(ts, list) and ts and all(isinstance(k, int) and k >= 0 for k in ts)):
            raise ValueError(f"algorithm.train_steps must be a non-empty list of step indices >= 0, got {ts!r}")
        if self.method == "sft" and self.use_reward:
            raise ValueError("algorithm.method 'sft' trains on data only: set use_reward = false (or use the preset)")
        if self.method != "sft" and not self.use_reward:
            raise ValueError(f"algorithm.use_reward = false is only meaningful with method 'sft', not {self.method!r}")

    def trained_steps(self, num_steps: int) -> list[int]:
        ts = self.train_steps
        if ts == "all":
            return list(range(num_steps))
        if ts == "every_other":
            return list(range(0, num_steps, 2))
        bad = [k for k in ts if k >= num_steps]
        if bad:
            raise ValueError(f"algorithm.train_steps {bad} out of range for {num_steps} sampling steps")
        return sorted(set(ts))


def preset(method: str, /, *, num_steps: int | None = None, **overrides) -> DDRLConfig:
    """The named method with its regulariser switched the paper's way; overrides apply on top.

    `method` may also be a recipe ("flow_grpo", "dance_grpo", "cosmos_ddrl"): the DDRLConfig of that
    peer's recipe (ddrl_engine.algorithms.RECIPES) at `num_steps` sampling steps (default: the
    recipe's own; it sets the K-dependent train_steps), with `method` the underlying method and
    `recipe` the name. The recipe's sampler and rollout values are `RECIPES[name].resolve(num_steps)`.
    An override `method` other than the recipe's keeps that method's beta_data, beta_kl, use_reward.
    """
    if method in RECIPES:
        fields = RECIPES[method].resolve(num_steps).algorithm
        if overrides.get("method", fields["method"]) != fields["method"]:
            fields = {k: v for k, v in fields.items() if k not in SWITCHES}
        return DDRLConfig(**{**fields, **overrides})
    if method not in PRESETS:
        raise ValueError(f"algorithm.method must be one of {METHODS} or a recipe {RECIPE_NAMES}, got {method!r}")
    if num_steps is not None:
        raise ValueError(f"preset: 'num_steps' only applies to a recipe {RECIPE_NAMES}, not to method {method!r}")
    return DDRLConfig(method=method, **overrides)


def with_method(cfg: DDRLConfig, method: str) -> DDRLConfig:
    """cfg with another method's regulariser switches, keeping every other field (a recipe's own fields
    come from the recipe)."""
    drop = {"method", "recipe", *SWITCHES}
    if method in RECIPES:
        drop |= set(RECIPES[method].algorithm)
    fields = {k: v for k, v in cfg.__dict__.items() if k not in drop}
    return preset(method, **fields)
