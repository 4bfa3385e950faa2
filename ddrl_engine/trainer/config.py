"""The training configuration: dataclasses, one per TOML section, validated on load.

Each field is documented once, in its dataclass docstring; `ddrl-engine config` prints the defaults
as TOML with those docs. Unknown sections or fields and wrongly typed values are errors that name
the field (e.g. "config: unknown field 'optim.lrr'").
"""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ddrl_engine.algorithms import DDRLConfig
from ddrl_engine.models.dit import DiTConfig


@dataclass
class RunConfig:
    """How the run is driven.

    out_dir: where metrics.jsonl, checkpoints and pictures go.
    seed: seeds the rollouts, data order and initialisation.
    device: "cpu", "cuda" or "cuda:N".
    steps: training steps (one rollout batch each).
    eval_every: evaluate every N steps (and at step 0 and the end).
    ckpt_every: checkpoint every N steps (and at the end, and on SIGTERM); 0 = only at the end.
    keep_checkpoints: how many recent checkpoints to keep.
    on_invalid_reward: "error" (stop on a NaN/inf reward) or "drop" (drop the sample, warn, count).
    early_stop_on_heldout: stop when the held-out data loss rises more than heldout_rise_threshold.
    heldout_rise_threshold: relative rise of the held-out data loss that raises the hacking warning.
    progress: show progress bars.
    """

    out_dir: str = "runs/ddrl"
    seed: int = 0
    device: str = "cpu"
    steps: int = 120
    eval_every: int = 20
    ckpt_every: int = 50
    keep_checkpoints: int = 2
    on_invalid_reward: str = "error"
    early_stop_on_heldout: bool = False
    heldout_rise_threshold: float = 0.10
    progress: bool = True


@dataclass
class SamplerConfig:
    """The stochastic sampler whose transitions are the policy's actions.

    name: "rectified_flow_sde" (flow-matching SDE), "ddim" (eta > 0) or "edm_churn" (EDM with churn).
    num_steps: sampling steps K.
    noise_level: rectified_flow_sde's SDE noise level a (std_t = a sqrt(t / (1 - t))).
    shift: rectified_flow_sde's time shift (1 = none).
    eta: ddim's eta.
    churn: edm_churn's churn (sigma_hat = (1 + churn) sigma).
    """

    name: str = "rectified_flow_sde"
    num_steps: int = 10
    noise_level: float = 0.7
    shift: float = 1.0
    eta: float = 1.0
    churn: float = 0.2


@dataclass
class OptimConfig:
    """Optimiser and weight averaging.

    lr: AdamW learning rate.
    weight_decay: AdamW weight decay.
    beta1: AdamW beta1.
    beta2: AdamW beta2.
    grad_clip: clip the global gradient norm to this (0 = off).
    ema_decay: decay of the EMA weights (0 = no EMA).
    micro_batch: rows per forward/backward in the update (0 = all of the rank's rows at once); the
        gradients of the micro-batches accumulate, weighted by their share of the rows, so the update
        is the same up to rounding while activation memory follows the micro-batch.
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    micro_batch: int = 0


@dataclass
class RolloutConfig:
    """The rollout batch of each step.

    conditions_per_step: conditions (classes) sampled per step; each is rolled out group_size times.
    recompute_old_logprobs: recompute the old log-probs with the training forward (exact on-policy
        ratios even when rollouts use another attention backend).
    cuda_graph: capture the K-step sampling loop in a CUDA graph once per batch shape and replay it
        (fresh noise each replay, weights updated in place); needs run.device = "cuda". A request that
        cannot be honoured is an error, never a silent eager fallback.
    attention_backend: attention backend of the rollout's forwards, "sdpa" or "fp8" (checked against
        ddrl_engine.attention.available_backends() when the trainer starts); training uses "sdpa".
    """

    conditions_per_step: int = 4
    recompute_old_logprobs: bool = False
    cuda_graph: bool = False
    attention_backend: str = "sdpa"


@dataclass
class DataConfig:
    """Off-policy data for the data loss (and the held-out evaluation).

    dataset: "digits" (scikit-learn's bundled handwritten digits) or "folder".
    path: the folder for dataset = "folder" (tensors or images; see ddrl_engine.data.folder).
    heldout_fraction: share of the data kept out of training, for evaluation.
    batch_size: data samples per trained step (0 = the rollout batch size).
    synthetic: regularise with samples of the base model instead of real data (METHOD.md allows
        either); `synthetic_count` samples are drawn once at the start.
    synthetic_count: how many base-model samples to draw when synthetic = true.
    """

    dataset: str = "digits"
    path: str = ""
    heldout_fraction: float = 0.2
    batch_size: int = 0
    synthetic: bool = False
    synthetic_count: int = 512


@dataclass
class EvalConfig:
    """The held-out evaluation (reward, realism, diversity, held-out data loss).

    samples_per_class: generated samples per class.
    seed: fixed seed of the evaluation rollouts and noise, the same for every method.
    heldout_loss_levels: noise levels at which the held-out data loss is averaged.
    """

    samples_per_class: int = 20
    seed: int = 1234
    heldout_loss_levels: int = 8


@dataclass
class PretrainConfig:
    """Supervised pretraining of the base model (flow matching on the training split).

    steps: optimiser steps.
    batch_size: batch size.
    lr: AdamW learning rate.
    ema_decay: the base model is the EMA of the pretraining weights.
    cache: reuse a cached base model with the same configuration.
    """

    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    ema_decay: float = 0.995
    cache: bool = True


@dataclass
class DistributedConfig:
    """Multi-process training under torchrun (one process per device; gloo on CPU, NCCL on CUDA).

    parallel: "none" (one process), "ddp" (replicated weights, averaged gradients) or "fsdp" (FSDP2
        fully_shard per DiT block and the root; on CUDA bf16 compute, fp32 gradient reduction). With
        "ddp"/"fsdp" the rollout batch and the data batch are split across ranks by sample index, each
        rank drawing the global noise and keeping its rows, so a run reproduces the one-process run at
        any world size that divides both batches; checkpoints use torch.distributed.checkpoint.
    activation_checkpointing: recompute each DiT block's activations in backward (less memory).
    grad_sync: when gradients are reduced across ranks within one update (K trained steps, each with a
        backward for the data loss and one for the policy loss): "update" (once, at the last backward;
        least communication; under FSDP2 each rank then holds unsharded gradients until then, the
        full model's gradient memory), "backward" (at every backward; FSDP2 keeps gradients sharded),
        or "auto" ("update" for ddp, "backward" for fsdp).
    shard_size: with fsdp, shard each model over groups of this many ranks and replicate across the
        groups (HSDP: e.g. the GPUs of one node, so parameter all-gathers stay inside a node and only
        gradients cross nodes); 0 = shard over all ranks. Must divide the world size.
    """

    parallel: str = "none"
    activation_checkpointing: bool = False
    grad_sync: str = "auto"
    shard_size: int = 0


@dataclass
class RewardWorkersConfig:
    """Reward computation in worker processes (ddrl_engine.rewards.AsyncReward), overlapping the
    data-loss pass of each step; the step logs time_reward_wait and reward_batches_dropped.

    workers: reward worker processes (0 = compute the rewards in the trainer's process).
    timeout_s: seconds one attempt may take before its worker is killed and replaced.
    retries: extra attempts of a failed batch (a raise, a timeout, a dead worker).
    on_failure: after the retries, "drop" the batch (its samples are masked out of the step, counted)
        or "raise" (stop the run).
    threads: torch threads per worker.
    """

    workers: int = 0
    timeout_s: float = 300.0
    retries: int = 1
    on_failure: str = "drop"
    threads: int = 1


@dataclass
class TrainConfig:
    """A whole run. [rewards] maps reward names to weights: brightness, contrast, class_confidence."""

    run: RunConfig = field(default_factory=RunConfig)
    model: DiTConfig = field(default_factory=DiTConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    algorithm: DDRLConfig = field(default_factory=DDRLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    reward_workers: RewardWorkersConfig = field(default_factory=RewardWorkersConfig)
    rewards: dict[str, float] = field(default_factory=lambda: {"brightness": 1.0})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    "run.on_invalid_reward": ("error", "drop"),
    "sampler.name": ("rectified_flow_sde", "ddim", "edm_churn"),
    "data.dataset": ("digits", "folder"),
    "rollout.attention_backend": ("sdpa", "fp8"),
    "distributed.parallel": ("none", "ddp", "fsdp"),
    "distributed.grad_sync": ("auto", "update", "backward"),
    "reward_workers.on_failure": ("drop", "raise"),
}
_POSITIVE = {"run.steps", "run.eval_every", "sampler.num_steps", "rollout.conditions_per_step", "optim.lr",
             "eval.samples_per_class", "eval.heldout_loss_levels", "pretrain.batch_size", "pretrain.lr",
             "run.keep_checkpoints", "reward_workers.timeout_s", "reward_workers.threads"}
_NON_NEGATIVE = {"run.ckpt_every", "optim.weight_decay", "optim.grad_clip", "data.batch_size", "pretrain.steps",
                 "reward_workers.workers", "reward_workers.retries", "optim.micro_batch",
                 "distributed.shard_size"}


def _check_value(where: str, value, hint):
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config: '{where}' must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config: '{where}' must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config: '{where}' must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"config: '{where}' must be a string, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config: '{where}' must be a list, got {value!r}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return type(value)(_check_value(f"{where}[{i}]", v, item) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _check_value(where, value, option)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"config: '{where}' has an invalid value {value!r}")
    raise TypeError(f"config: no validator for {where} ({hint})")


def _build_section(name: str, cls, values: dict):
    if not isinstance(values, dict):
        raise ValueError(f"config: [{name}] must be a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = f"{name}.{key}"
        if key not in known:
            raise ValueError(f"config: unknown field '{where}' (known: {', '.join(sorted(known))})")
        value = _check_value(where, value, hints[key])
        if where in _CHOICES and value not in _CHOICES[where]:
            raise ValueError(f"config: '{where}' must be one of {_CHOICES[where]}, got {value!r}")
        kwargs[key] = value
    defaults = cls()
    for f in dataclasses.fields(cls):
        where = f"{name}.{f.name}"
        v = kwargs.get(f.name, getattr(defaults, f.name))
        if where in _POSITIVE and v <= 0:
            raise ValueError(f"config: '{where}' must be > 0, got {v}")
        if where in _NON_NEGATIVE and v < 0:
            raise ValueError(f"config: '{where}' must be >= 0, got {v}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"config: [{name}] {e}") from e


def config_from_dict(data: dict) -> TrainConfig:
    sections = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    kwargs = {}
    for name, values in data.items():
        if name not in sections:
            raise ValueError(f"config: unknown section [{name}] (known: {', '.join(sorted(sections))})")
        if name == "rewards":
            if not isinstance(values, dict) or not values:
                raise ValueError("config: [rewards] must map at least one reward name to a weight")
            kwargs[name] = {k: _check_value(f"rewards.{k}", v, float) for k, v in values.items()}
        else:
            kwargs[name] = _build_section(name, hints[name], values)
    cfg = TrainConfig(**kwargs)
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """Checks that span sections (also run by the Trainer on configs built in code)."""
    if cfg.rollout.cuda_graph and not cfg.run.device.startswith("cuda"):
        raise ValueError(f"config: 'rollout.cuda_graph' = true needs a CUDA device, but run.device = "
                         f"{cfg.run.device!r}; set run.device = 'cuda' or rollout.cuda_graph = false")
    if cfg.distributed.activation_checkpointing and cfg.distributed.parallel == "none":
        raise ValueError("config: 'distributed.activation_checkpointing' = true needs distributed.parallel = "
                         "'ddp' or 'fsdp'")
    if cfg.rollout.cuda_graph and cfg.distributed.parallel == "fsdp":
        # A captured FSDP2 forward would hold its all-gathers, side streams and storage resizes: never
        # tried, so refused rather than risked. DDP rolls out with the unwrapped module: fine.
        raise ValueError("config: 'rollout.cuda_graph' = true is not supported with distributed.parallel = 'fsdp' "
                         "(untested: the capture would contain FSDP2's all-gathers); use 'ddp' or cuda_graph = false")


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config: {path} is not valid TOML: {e}") from e
    return config_from_dict(data)


def defaults_as_toml() -> str:
    """The default configuration as TOML, each field preceded by its documentation."""
    lines = []
    hints = typing.get_type_hints(TrainConfig)
    cfg = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "rewards":
            lines += ["[rewards]", "# reward name = weight; names: brightness, contrast, class_confidence"]
            lines += [f"{k} = {v}" for k, v in cfg.rewards.items()] + [""]
            continue
        cls = hints[f.name]
        docs = _field_docs(cls)
        lines.append(f"[{f.name}]")
        section = getattr(cfg, f.name)
        for sf in dataclasses.fields(cls):
            if sf.name in docs:
                lines.append(f"# {docs[sf.name]}")
            lines.append(f"{sf.name} = {_toml_value(getattr(section, sf.name))}")
        lines.append("")
    return "\n".join(lines)


def _field_docs(cls) -> dict[str, str]:
    docs, current = {}, None
    names = {f.name for f in dataclasses.fields(cls)}
    for line in (cls.__doc__ or "").splitlines():
        stripped = line.strip()
        head = stripped.split(":", 1)[0]
        if ":" in stripped and head in names:
            current = head
            docs[current] = stripped.split(":", 1)[1].strip()
        elif current and stripped:
            docs[current] += " " + stripped
        else:
            current = None
    return docs


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)
