"""DDRLConfig: the coefficients of the DDRL loss; the baselines are presets of the same code."""
from __future__ import annotations

from dataclasses import dataclass

METHODS = ("ddrl", "grpo", "grpo_kl", "sft")
# Each method's regulariser switches: the values of the fields left unset (None) for that method.
PRESETS = {
    "ddrl": dict(beta_data=0.01, beta_kl=0.0, use_reward=True),
    "grpo": dict(beta_data=0.0, beta_kl=0.0, use_reward=True),
    "grpo_kl": dict(beta_data=0.0, beta_kl=0.04, use_reward=True),
    "sft": dict(beta_data=1.0, beta_kl=0.0, use_reward=False),
}


@dataclass
class DDRLConfig:
    """Everything the loss needs to know. Field docs are the single reference (configs/*.toml).

    method: one of "ddrl" (data regulariser), "grpo" (no regulariser), "grpo_kl" (reverse KL to the
        reference, Flow-GRPO style), "sft" (data loss only, no reward). It sets beta_data, beta_kl and
        use_reward where they are not given (ddrl: 0.01, 0, true; grpo: 0, 0, true; grpo_kl: 0, 0.04,
        true; sft: 1, 0, false); given values win.
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

    def __post_init__(self):
        for name, value in PRESETS.get(self.method, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.validate()

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"algorithm.method must be one of {METHODS}, got {self.method!r}")
        if self.group_size < 2:
            raise ValueError(f"algorithm.group_size must be >= 2 (advantages are normalised per group), got {self.group_size}")
        for name in ("beta_data", "beta_kl", "adv_eps"):
            if getattr(self, name) < 0:
                raise ValueError(f"algorithm.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"algorithm.clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.adv_clip <= 0:
            raise ValueError(f"algorithm.adv_clip must be > 0, got {self.adv_clip}")
        if self.ppo_epochs < 1:
            raise ValueError(f"algorithm.ppo_epochs must be >= 1, got {self.ppo_epochs}")
        if self.data_noise not in ("rollout", "fresh"):
            raise ValueError(f"algorithm.data_noise must be 'rollout' or 'fresh', got {self.data_noise!r}")
        if self.data_loss_steps not in ("all", "one"):
            raise ValueError(f"algorithm.data_loss_steps must be 'all' or 'one', got {self.data_loss_steps!r}")
        if self.logprob_reduction not in ("mean", "sum"):
            raise ValueError(f"algorithm.logprob_reduction must be 'mean' or 'sum', got {self.logprob_reduction!r}")
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


def preset(method: str, **overrides) -> DDRLConfig:
    """The named method with its regulariser switched the paper's way; overrides apply on top."""
    if method not in PRESETS:
        raise ValueError(f"algorithm.method must be one of {METHODS}, got {method!r}")
    return DDRLConfig(method=method, **overrides)


def with_method(cfg: DDRLConfig, method: str) -> DDRLConfig:
    """cfg with another method's regulariser switches, keeping every other field."""
    fields = {k: v for k, v in cfg.__dict__.items() if k not in ("method", "beta_data", "beta_kl", "use_reward")}
    return preset(method, **fields)


