"""The training configuration: dataclasses, one per TOML section, validated on load.

Each field is documented once, in its dataclass docstring; `ddrl-engine config` prints the defaults
as TOML with those docs. Unknown sections or fields and wrongly typed values are errors that name
the field (e.g. "config: unknown field 'optim.lrr'").
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ddrl_engine.algorithms import BaselineForms, DDRLConfig, expand_recipe
from ddrl_engine.attention.context_parallel import CP_ATTENTION
from ddrl_engine.models.dit import DiTConfig
from ddrl_engine.sampling.factory import SAMPLERS, make_sampler, sampler_fields


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


@dataclass(init=False)
class SamplerConfig:
    """The stochastic sampler whose transitions are the policy's actions.

    name: a registered sampler: "rectified_flow_sde" (flow-matching SDE), "rectified_flow_cps"
        (coefficients-preserving sampling), "ddim" (eta > 0), "edm_churn" (EDM with churn), "edm_2ab"
        (cosmos-rl's second-order multistep EDM solver with churn), or one added with
        ddrl_engine.sampling.register_sampler.
    num_steps: sampling steps K.
    schedule: where the levels come from: "engine" (the sampler's own fields, e.g. shift or sigmas) or
        "diffusers" (rectified_flow_sde with a pipeline [model] only: the levels are the folder's
        scheduler's sigmas after set_timesteps(num_steps), with the pipeline's own arguments, e.g.
        FLUX's resolution-dependent mu; leave shift and sigmas unset).
    sde_window: which steps are SDE steps (Flow-GRPO-Fast / MixGRPO): unset (every step, the default),
        [first, size] (steps first..first+size-1), "random" (a fresh window of sde_window_size steps
        per rollout batch, its start uniform over the valid starts, from a generator seeded by run.seed)
        or "sliding" (start = starts[(step // sde_window_every) % len(starts)], starts the valid starts
        ascending: the window moves one step towards t = 0 every sde_window_every training steps and
        wraps around). Outside the window the chain takes the sampler's deterministic ODE step
        (rectified flow: Euler, x + (t' - t) v; samplers without one refuse windows); only the window's
        steps are trained (algorithm.train_steps must then be "all" or "every_other", which the window
        replaces). A valid window holds only stochastic steps (not rectified_flow_cps's last).
    sde_window_size: the window's steps with "random" / "sliding" (unset otherwise).
    sde_window_every: training steps per move of a "sliding" window (unset: 1; unset otherwise).

    The other fields of [sampler] are exactly the chosen sampler's dataclass fields, with its defaults
    (documented in its docstring, under "Fields:"; `ddrl-engine config` prints those of the default).

    In Python: SamplerConfig(name="ddim", num_steps=10, eta=0.5) (or options={"eta": 0.5}); the
    sampler's fields live in `options` (filled with the sampler's defaults) and read and write as
    attributes too (cfg.sampler.eta). Construction validates like loading a TOML file; build() makes
    the Sampler. to_dict() is flat: {"name": ..., "num_steps": ..., **options} (plus "schedule" when it
    is not "engine"). With schedule = "diffusers", build() is an error: the pipeline run builds the
    sampler from the model folder (ddrl_engine.trainer.pipeline_run.build_sampler).
    """

    name: str = "rectified_flow_sde"
    num_steps: int = 10
    options: dict = field(default_factory=dict)
    schedule: str = "engine"
    sde_window: list[int] | str | None = None
    sde_window_size: int | None = None
    sde_window_every: int | None = None

    def __init__(self, name: str = "rectified_flow_sde", num_steps: int = 10, options: dict | None = None,
                 schedule: str = "engine", sde_window: list[int] | str | None = None,
                 sde_window_size: int | None = None, sde_window_every: int | None = None, **fields) -> None:
        given = dict(options or {})
        both = sorted(set(given) & set(fields))
        if both:
            raise TypeError(f"SamplerConfig: {both} given both in options and as keyword arguments")
        given.update(fields)
        name = _check_value("sampler.name", name, str)
        if name not in SAMPLERS:
            raise ValueError(f"config: 'sampler.name' must be one of the registered samplers "
                             f"({', '.join(sorted(SAMPLERS))}), got {name!r}")
        num_steps = _check_value("sampler.num_steps", num_steps, int)
        own = sampler_fields(name)
        hints = typing.get_type_hints(SAMPLERS[name])
        known = {f.name for f in own}
        for key in given:
            if key not in known:
                raise ValueError(f"config: unknown field 'sampler.{key}' for sampler {name!r} "
                                 f"(its fields: {', '.join(f.name for f in own) or 'none'})")
        values = {}
        for f in own:
            if f.name in given:
                values[f.name] = _check_value(f"sampler.{f.name}", given[f.name], hints[f.name])
            else:
                values[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "num_steps", num_steps)
        object.__setattr__(self, "options", values)
        object.__setattr__(self, "schedule", _check_sampler_schedule(name, _check_value("sampler.schedule", schedule, str),
                                                                     values))
        if num_steps <= 0:
            raise ValueError(f"config: 'sampler.num_steps' must be > 0, got {num_steps}")
        try:
            make_sampler(name, num_steps=num_steps, **values)  # the sampler's own value checks (its __post_init__)
        except (ValueError, TypeError) as e:
            raise ValueError(f"config: [sampler] {e}") from e
        for key, value in _check_sde_window(name, num_steps, values, sde_window, sde_window_size,
                                            sde_window_every).items():
            object.__setattr__(self, key, value)

    def __getattr__(self, key: str):
        # Only reached when normal lookup fails: the sampler's own fields read as attributes.
        options = self.__dict__.get("options")
        if options is not None and key in options:
            return options[key]
        raise AttributeError(f"SamplerConfig: sampler {self.__dict__.get('name')!r} has no field {key!r}"
                             + (f" (its fields: {', '.join(options)})" if options is not None else ""))

    def __setattr__(self, key: str, value) -> None:
        options = self.__dict__.get("options")
        if key in ("name", "num_steps", "options", "schedule") + SDE_WINDOW_KEYS or options is None:
            object.__setattr__(self, key, value)
        elif key in options:
            options[key] = value
        else:
            raise AttributeError(f"SamplerConfig: sampler {self.name!r} has no field {key!r} "
                                 f"(its fields: {', '.join(options) or 'none'})")

    def build(self):
        """The Sampler this configures (a fresh instance, tables on the CPU)."""
        if self.schedule == "diffusers":
            raise ValueError("config: sampler.schedule = 'diffusers' takes its levels from the model folder's "
                             "scheduler: the pipeline run builds this sampler "
                             "(ddrl_engine.trainer.pipeline_run.build_sampler), not SamplerConfig.build()")
        return make_sampler(self.name, num_steps=self.num_steps, **self.options)

    def to_dict(self) -> dict:
        """Flat: {"name": ..., "num_steps": ..., **the sampler's fields} (what config_from_dict reads), and
        "schedule" when it is not the default "engine" (so default configs write what they always wrote)."""
        extra = {} if self.schedule == "engine" else {"schedule": self.schedule}
        extra.update({k: copy.deepcopy(getattr(self, k)) for k in SDE_WINDOW_KEYS if getattr(self, k) is not None})
        return {"name": self.name, "num_steps": self.num_steps, **extra, **copy.deepcopy(self.options)}


SDE_WINDOW_KEYS = ("sde_window", "sde_window_size", "sde_window_every")
SDE_WINDOW_MODES = ("random", "sliding")


def _check_sde_window(name: str, num_steps: int, options: dict, window, size, every) -> dict:
    """sampler.sde_window / sde_window_size / sde_window_every, checked against each other and against
    the sampler they configure (its ODE step, its stochastic steps); returns the values to store."""
    if window is not None and not isinstance(window, str):
        if not isinstance(window, (list, tuple)) or len(window) != 2:
            raise ValueError(f"config: 'sampler.sde_window' must be [first, size], 'random' or 'sliding' (or unset), "
                             f"got {window!r}")
        window = list(_check_value("sampler.sde_window", window, list[int]))
    if size is not None:
        size = _check_value("sampler.sde_window_size", size, int)
    if every is not None:
        every = _check_value("sampler.sde_window_every", every, int)
    mode = window if isinstance(window, str) else None
    if isinstance(window, str) and window not in SDE_WINDOW_MODES:
        raise ValueError(f"config: 'sampler.sde_window' must be [first, size], 'random' or 'sliding' (or unset), "
                         f"got {window!r}")
    if size is not None and mode is None:
        raise ValueError(f"config: 'sampler.sde_window_size' is the size of a 'random' or 'sliding' window; "
                         f"sampler.sde_window is {window!r} (a fixed window is [first, size])")
    if every is not None and mode != "sliding":
        raise ValueError(f"config: 'sampler.sde_window_every' needs sampler.sde_window = 'sliding', got {window!r}")
    if mode is not None and size is None:
        raise ValueError(f"config: sampler.sde_window = {mode!r} needs 'sampler.sde_window_size' (an int >= 1)")
    if every is not None and every < 1:
        raise ValueError(f"config: 'sampler.sde_window_every' must be >= 1, got {every}")
    if window is not None:
        sampler = make_sampler(name, num_steps=num_steps, **options)
        try:
            if mode is None:
                sampler.check_window(window, "sampler.sde_window")
            else:
                sampler.window_starts(size, "sampler.sde_window_size")
        except (ValueError, TypeError) as e:
            raise ValueError(f"config: {e}") from e
    return {"sde_window": window, "sde_window_size": size, "sde_window_every": every}


SAMPLER_SCHEDULES = ("engine", "diffusers")


def _check_sampler_schedule(name: str, schedule: str, options: dict) -> str:
    """sampler.schedule, checked against the sampler and its fields."""
    if schedule not in SAMPLER_SCHEDULES:
        raise ValueError(f"config: 'sampler.schedule' must be one of {SAMPLER_SCHEDULES}, got {schedule!r}")
    if schedule == "diffusers":
        if name != "rectified_flow_sde":
            raise ValueError(f"config: sampler.schedule = 'diffusers' (a flow-matching pipeline's scheduler sigmas) "
                             f"needs sampler.name = 'rectified_flow_sde', got {name!r}")
        set_here = [k for k, default in (("shift", 1.0), ("sigmas", None)) if options.get(k, default) != default]
        if set_here:
            raise ValueError(f"config: {', '.join('sampler.' + k for k in set_here)} set with sampler.schedule = "
                             "'diffusers': the levels come from the model folder's scheduler (they already include "
                             "its shift); remove them, or use schedule = 'engine'")
    return schedule


@dataclass
class OptimConfig:
    """Optimiser, learning-rate schedule and weight averaging (built by trainer.optim.build_optimizer).

    name: "adamw" (decoupled weight decay; fused on CUDA), "adam" (weight decay added to the gradient,
        L2; fused on CUDA) or "sgd" (momentum = beta1, no dampening or Nesterov, L2 weight decay;
        beta2 is unused).
    lr: peak learning rate (the whole run's with schedule = "constant").
    weight_decay: weight decay (decoupled for adamw, L2 for adam and sgd).
    beta1: Adam(W) beta1; sgd's momentum.
    beta2: Adam(W) beta2.
    schedule: learning rate per training step s = 0..run.steps - 1 (the scheduler steps once per
        training step): "constant" (lr), "linear_warmup" (lr (s + 1) / (warmup_steps + 1) for the first
        warmup_steps steps, then lr) or "cosine" (the same warm-up, then a cosine decay from lr at step
        warmup_steps to min_lr at the last step, run.steps - 1).
    warmup_steps: warm-up steps of "linear_warmup" and "cosine" (0 = none); must be < run.steps.
    min_lr: the learning rate "cosine" decays to (0 <= min_lr <= lr).
    grad_clip: clip the global gradient norm to this (0 = off).
    ema_decay: decay of the EMA weights (0 = no EMA).
    micro_batch: rows per forward/backward in the update (0 = all of the rank's rows at once); the
        gradients of the micro-batches accumulate, weighted by their share of the rows, so the update
        is the same up to rounding while activation memory follows the micro-batch.
    """

    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
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
        ddrl_engine.attention.available_backends(run.device) when the trainer starts); training uses "sdpa".
    guidance_scale: classifier-free guidance of the rollouts (ddrl_engine.sampling.Guided): a finite
        number >= 0; 1 = none (the default: the plain conditional policy, bitwise), 0 = the unconditional
        model, s > 1 = uncond + s (cond - uncond) with the policy's null condition (the DiT's null class,
        a pipeline's empty prompt), both branches in one batched forward. The transition is the guided
        one and its log-prob the guided step's density; the policy loss, the KL's reference forward, the
        old-log-prob recomputation and the evaluation's samples use the same guidance; the data loss and
        the held-out data loss always use the unguided conditional model.
    """

    conditions_per_step: int = 4
    recompute_old_logprobs: bool = False
    cuda_graph: bool = False
    attention_backend: str = "sdpa"
    guidance_scale: float = 1.0


MODEL_KINDS = ("dit", "sd3", "flux", "wan")


@dataclass
class PipelineModelConfig:
    """[model] of a local diffusers pipeline folder (kind = "sd3", "flux" or "wan"). With kind = "dit"
    (the default, also when kind is absent) [model] takes the built-in DiT's fields instead
    (ddrl_engine.models.DiTConfig: in_channels, sample_size, patch_size, hidden, depth, heads, ...).

    kind: "sd3" (SD3 / SD3.5), "flux" (FLUX.1) or "wan" (Wan2.1 / 2.2 text-to-video); "dit" = built-in.
    path: the pipeline folder (model_index.json, transformer/, vae/, text encoders, tokenizers,
        scheduler/), read locally; nothing is ever downloaded.
    lora_rank: rank of the LoRA adapters on the transformer (0 = full fine-tuning).
    lora_alpha: LoRA alpha (0 = lora_rank).
    lora_targets: the transformer's modules that get adapters.
    resolution: pixels [H, W]; for video [frames, H, W].
    dtype: "fp32", "bf16" or "fp16": the dtype the folder loads in: the frozen parts (text encoders, VAE),
        a LoRA run's base and adapters; a full fine-tune (lora_rank = 0) keeps the trained transformer in
        fp32 (master weights: AdamW on bf16 weights rounds most updates away; FSDP2 computes in bf16 on
        CUDA, one process and DDP in fp32).
    guidance: the distilled guidance value of a guidance-distilled FLUX (FLUX.1-dev; 0 = FluxPipeline's
        default 3.5); must stay 0 for other models.
    max_sequence_length: text tokens per prompt (0 = the pipeline's default).
    """

    kind: str = "sd3"
    path: str = ""
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    resolution: list[int] = field(default_factory=lambda: [512, 512])
    dtype: str = "bf16"
    guidance: float = 0.0
    max_sequence_length: int = 0


@dataclass
class DataConfig:
    """Off-policy data for the data loss (and the held-out evaluation).

    dataset: "digits" (scikit-learn's bundled handwritten digits), "folder" (tensors or images; see
        ddrl_engine.data.folder) or, for a pipeline [model], "captioned" (a folder of images or videos
        with metadata.jsonl lines {"file_name", "text"}, encoded once through the VAE into a latent
        cache; each datum is conditioned on its own caption).
    path: the folder for dataset = "folder" or "captioned".
    prompts: for a pipeline [model]: the training prompts, a .txt file (one a line) or .jsonl
        ({"prompt": ...} a line); encoded once into the on-disk prompt cache.
    eval_prompts: held-out prompts for the evaluation (same formats; "" = the training prompts).
    heldout_fraction: share of the data kept out of training, for evaluation.
    batch_size: data samples per trained step (0 = the rollout batch size).
    synthetic: regularise with samples of the base model instead of real data (the method allows
        either); `synthetic_count` samples are drawn once at the start.
    synthetic_count: how many base-model samples to draw when synthetic = true.
    """

    dataset: str = "digits"
    path: str = ""
    prompts: str = ""
    eval_prompts: str = ""
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
    save_samples: write each evaluation's samples to out_dir/samples/step_N.png (.gif for video), a
        row per evaluated condition.
    """

    samples_per_class: int = 20
    seed: int = 1234
    heldout_loss_levels: int = 8
    save_samples: bool = True


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
    context_parallel: ranks per context-parallel group (1 = off). With N > 1 the N consecutive ranks of
        a group hold the same samples and split each sample's tokens (the DiT's, Wan's, SD3's,
        FLUX's; attention by a Ulysses all-to-all, so heads and tokens must be divisible by N); the
        batches are split over the world size / N data ranks; the run reproduces the one-process run
        and its checkpoints resume at any N (docs/distributed.md). Needs parallel = "ddp" or "fsdp".
    context_parallel_attention: how attention crosses the shards: "ulysses" (all-to-all sequence <->
        heads, every backend; heads divisible by N) or "ring" (PyTorch's ring: keys / values travel
        round the group; any head count, the 'sdpa' backend only, self-attention without text tokens:
        the DiT and Wan, not SD3 / FLUX).
    """

    parallel: str = "none"
    activation_checkpointing: bool = False
    grad_sync: str = "auto"
    shard_size: int = 0
    context_parallel: int = 1
    context_parallel_attention: str = "ulysses"


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
    """A whole run. [rewards] maps reward names to weights: the built-in brightness, contrast,
    class_confidence, class_margin (digits), pickscore, clip_score, aesthetic (a pipeline [model]), or
    "package.module:Name" for your own. [reward_models] maps reward names to the local folders of their
    models (pickscore = "/models/pickscore": a transformers CLIP folder; clip_score, aesthetic: open_clip folders, the
    aesthetic one with its head file; see ddrl_engine.rewards.clip).
    A top-level `recipe = "flow_grpo"` ("dance_grpo", "cosmos_ddrl"; or [algorithm] method = that name)
    fills the [algorithm], [sampler] and [rollout] fields the file does not set with that peer's recipe
    (ddrl_engine.algorithms.RECIPES, docs/porting.md); config.json records the expanded values."""

    run: RunConfig = field(default_factory=RunConfig)
    model: DiTConfig | PipelineModelConfig = field(default_factory=DiTConfig)
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
    reward_models: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain nested dicts, one per section (what config_from_dict reads back; config.json)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {name: value.to_dict() if isinstance(value, SamplerConfig)
                else dataclasses.asdict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
                for name, value in data.items()}


_CHOICES = {
    "run.on_invalid_reward": ("error", "drop"),
    "optim.name": ("adamw", "adam", "sgd"),
    "optim.schedule": ("constant", "linear_warmup", "cosine"),
    "data.dataset": ("digits", "folder", "captioned"),
    "model.kind": MODEL_KINDS,
    "model.dtype": ("fp32", "bf16", "fp16"),
    "rollout.attention_backend": ("sdpa", "fp8"),
    "distributed.parallel": ("none", "ddp", "fsdp"),
    "distributed.grad_sync": ("auto", "update", "backward"),
    "distributed.context_parallel_attention": CP_ATTENTION,
    "reward_workers.on_failure": ("drop", "raise"),
}
_POSITIVE = {"run.steps", "run.eval_every", "rollout.conditions_per_step", "optim.lr",
             "eval.samples_per_class", "eval.heldout_loss_levels", "pretrain.batch_size", "pretrain.lr",
             "run.keep_checkpoints", "reward_workers.timeout_s", "reward_workers.threads"}
_NON_NEGATIVE = {"run.ckpt_every", "optim.weight_decay", "optim.grad_clip", "data.batch_size", "pretrain.steps",
                 "reward_workers.workers", "reward_workers.retries", "optim.micro_batch",
                 "distributed.shard_size", "optim.warmup_steps", "optim.min_lr"}


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
    if hint is type(None):  # the None of an `X | None` field (unset; JSON null, absent from TOML)
        if value is not None:
            raise ValueError(f"config: '{where}' must be unset, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config: '{where}' must be a list, got {value!r}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        container = tuple if origin is tuple else type(value)  # a TOML/JSON list -> a tuple field's tuple
        return container(_check_value(f"{where}[{i}]", v, item) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _check_value(where, value, option)
            except ValueError as e:
                errors.append((option, str(e)))
        # The error of the option of the value's kind (a list for a list, else a scalar) says most.
        is_list = isinstance(value, (list, tuple))
        for option, message in errors:
            if option is not type(None) and (typing.get_origin(option) in (tuple, list)) == is_list:
                raise ValueError(message)
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


def _build_sampler_section(values: dict) -> SamplerConfig:
    # name and num_steps are SamplerConfig's; every other key must be a field of the named sampler
    # (passed as options, so even a key called "options" is checked against the sampler's fields).
    if not isinstance(values, dict):
        raise ValueError(f"config: [sampler] must be a table, got {values!r}")
    rest = dict(values)
    head = {k: rest.pop(k) for k in ("name", "num_steps", "schedule") + SDE_WINDOW_KEYS if k in rest}
    return SamplerConfig(**head, options=rest)


def _build_model_section(values: dict):
    """[model]: the DiT's fields (kind "dit", the default) or a pipeline folder's (PipelineModelConfig)."""
    if not isinstance(values, dict):
        raise ValueError(f"config: [model] must be a table, got {values!r}")
    kind = _check_value("model.kind", values.get("kind", "dit"), str)
    if kind not in MODEL_KINDS:
        raise ValueError(f"config: 'model.kind' must be one of {MODEL_KINDS}, got {kind!r}")
    if kind == "dit":
        return _build_section("model", DiTConfig, {k: v for k, v in values.items() if k != "kind"})
    cfg = _build_section("model", PipelineModelConfig, values)
    if not cfg.path:
        raise ValueError(f"config: 'model.path' must name the local {kind} pipeline folder")
    return cfg


def config_from_dict(data: dict) -> TrainConfig:
    if not isinstance(data, dict):
        raise ValueError(f"config: a config must be a table of sections, got {type(data).__name__}")
    data = expand_recipe(data)  # a recipe (top-level `recipe`, or [algorithm] method/recipe) fills unset fields
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
        elif name == "sampler":
            kwargs[name] = _build_sampler_section(values)
        elif name == "reward_models":
            if not isinstance(values, dict):
                raise ValueError(f"config: [reward_models] must map reward names to folders, got {values!r}")
            kwargs[name] = {k: _check_value(f"reward_models.{k}", v, str) for k, v in values.items()}
        elif name == "model":
            kwargs[name] = _build_model_section(values)
        else:
            kwargs[name] = _build_section(name, hints[name], values)
    cfg = TrainConfig(**kwargs)
    check_config(cfg)
    try:  # the baseline forms against the configured sampler (the Trainer checks the one it is given)
        BaselineForms.make(cfg.algorithm, make_sampler(cfg.sampler.name, num_steps=cfg.sampler.num_steps,
                                                       **cfg.sampler.options))
    except ValueError as e:
        raise ValueError(f"config: {e}") from e
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """Checks that span fields or sections (also run by the Trainer on configs built in code)."""
    from ddrl_engine.trainer.validate import check_values

    check_optim(cfg.optim, cfg.run.steps)
    check_values(cfg)
    if cfg.eval.samples_per_class < 2:  # the evaluation's diversity is a distance between a condition's samples
        raise ValueError(f"config: 'eval.samples_per_class' must be >= 2 (the diversity metric compares samples of "
                         f"one condition), got {cfg.eval.samples_per_class}")
    pipeline = isinstance(cfg.model, PipelineModelConfig)
    if pipeline:
        if not cfg.data.prompts:
            raise ValueError(f"config: a {cfg.model.kind!r} [model] needs 'data.prompts' (a .txt or .jsonl prompt file)")
        if cfg.data.dataset not in ("captioned",) and not cfg.data.synthetic:
            raise ValueError(f"config: 'data.dataset' = {cfg.data.dataset!r} is for the built-in DiT; a {cfg.model.kind!r} "
                             "[model] regularises with dataset = 'captioned' (with data.path) or data.synthetic = true")
        if cfg.model.lora_rank < 0 or cfg.model.lora_alpha < 0:
            raise ValueError("config: 'model.lora_rank' and 'model.lora_alpha' must be >= 0")
        if cfg.model.guidance and cfg.model.kind != "flux":
            raise ValueError(f"config: 'model.guidance' is FLUX.1-dev's distilled guidance; it must be 0 for kind = {cfg.model.kind!r}")
    elif cfg.sampler.schedule == "diffusers":
        raise ValueError("config: sampler.schedule = 'diffusers' reads a diffusers pipeline folder's scheduler: it "
                         "needs a pipeline [model] (kind = 'sd3', 'flux' or 'wan'), not the built-in DiT (kind = "
                         "'dit'); use schedule = 'engine' (shift or sigmas)")
    elif cfg.data.dataset == "captioned" or cfg.data.prompts or cfg.data.eval_prompts:
        raise ValueError("config: 'data.prompts', 'data.eval_prompts' and data.dataset = 'captioned' need a pipeline "
                         "[model] (kind = 'sd3', 'flux' or 'wan')")
    if cfg.data.dataset == "captioned" and not cfg.data.synthetic and not cfg.data.path:
        raise ValueError("config: data.dataset = 'captioned' needs 'data.path' (the captioned folder)")
    g = cfg.rollout.guidance_scale
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
        raise ValueError(f"config: 'rollout.guidance_scale' must be a finite number >= 0 (1 = no guidance, "
                         f"0 = unconditional), got {g!r}")
    if cfg.rollout.cuda_graph and not cfg.run.device.startswith("cuda"):
        raise ValueError(f"config: 'rollout.cuda_graph' = true needs a CUDA device, but run.device = "
                         f"{cfg.run.device!r}; set run.device = 'cuda' or rollout.cuda_graph = false")
    if cfg.distributed.activation_checkpointing and cfg.distributed.parallel == "none":
        raise ValueError("config: 'distributed.activation_checkpointing' = true needs distributed.parallel = "
                         "'ddp' or 'fsdp'")
    cp = cfg.distributed.context_parallel
    if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1:
        raise ValueError(f"config: 'distributed.context_parallel' must be an integer >= 1, got {cp!r}")
    if cp > 1 and cfg.distributed.parallel == "none":
        raise ValueError("config: 'distributed.context_parallel' > 1 needs distributed.parallel = 'ddp' or 'fsdp' "
                         "(a torchrun launch)")
    if cp > 1 and cfg.distributed.context_parallel_attention == "ring" and cfg.rollout.attention_backend != "sdpa":
        raise ValueError(f"config: 'distributed.context_parallel_attention' = 'ring' needs rollout.attention_backend "
                         f"= 'sdpa' (the ring runs torch's own attention kernels), got "
                         f"{cfg.rollout.attention_backend!r}; use context_parallel_attention = 'ulysses' for fp8")
    if cp > 1 and cfg.rollout.cuda_graph:
        raise ValueError("config: 'rollout.cuda_graph' = true is not supported with distributed.context_parallel > 1 "
                         "(untested: the capture would contain the all-to-alls)")
    if cfg.rollout.cuda_graph and cfg.distributed.parallel == "fsdp":
        # A captured FSDP2 forward would hold its all-gathers, side streams and storage resizes: never
        # tried, so refused rather than risked. DDP rolls out with the unwrapped module: fine.
        raise ValueError("config: 'rollout.cuda_graph' = true is not supported with distributed.parallel = 'fsdp' "
                         "(untested: the capture would contain FSDP2's all-gathers); use 'ddp' or cuda_graph = false")


def check_optim(o: OptimConfig, total_steps: int) -> None:
    """[optim] as build_optimizer needs it, for a run of total_steps training steps."""
    for key in ("name", "schedule"):
        value = getattr(o, key)
        if value not in _CHOICES[f"optim.{key}"]:
            raise ValueError(f"config: 'optim.{key}' must be one of {_CHOICES[f'optim.{key}']}, got {value!r}")
    if isinstance(o.warmup_steps, bool) or not isinstance(o.warmup_steps, int) or o.warmup_steps < 0:
        raise ValueError(f"config: 'optim.warmup_steps' must be an integer >= 0, got {o.warmup_steps!r}")
    for key, low in (("lr", "> 0"), ("min_lr", ">= 0")):
        value = getattr(o, key)
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if not ok or not (value > 0 if key == "lr" else value >= 0):
            raise ValueError(f"config: 'optim.{key}' must be a finite number {low}, got {value!r}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(o, key) < 1:
            raise ValueError(f"config: 'optim.{key}' must be in [0, 1), got {getattr(o, key)}")
    if o.warmup_steps and o.schedule == "constant":
        raise ValueError(f"config: optim.warmup_steps needs optim.schedule = 'linear_warmup' or 'cosine' "
                         f"(got warmup_steps = {o.warmup_steps} with schedule = 'constant')")
    if o.warmup_steps >= total_steps > 0:
        raise ValueError(f"config: optim.warmup_steps = {o.warmup_steps} must be < run.steps = {total_steps} "
                         "(the warm-up must end within the run)")
    if o.min_lr and o.schedule != "cosine":
        raise ValueError(f"config: optim.min_lr needs optim.schedule = 'cosine' (got min_lr = {o.min_lr} with "
                         f"schedule = {o.schedule!r})")
    if o.min_lr > o.lr:
        raise ValueError(f"config: optim.min_lr = {o.min_lr} must be <= optim.lr = {o.lr}")


def load_config(path: str | Path) -> TrainConfig:
    """A TOML file, or the config.json a run writes (run folder and checkpoints)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"config: {path} is not valid JSON: {e}") from e
    else:
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config: {path} is not valid TOML: {e}") from e
    return config_from_dict(data)


def defaults_as_toml() -> str:
    """The default configuration as TOML, each field preceded by its documentation."""
    lines = []
    cfg = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "rewards":
            lines += ["[rewards]", "# reward name = weight: brightness, contrast, class_confidence, class_margin (digits), pickscore, "
                      "clip_score, aesthetic (a pipeline [model]), or \"package.module:Name\" = weight for your own reward class"]
            lines += [f"{k} = {v}" for k, v in cfg.rewards.items()] + [""]
            continue
        if f.name == "reward_models":
            lines += ["[reward_models]", "# reward name = the local folder of its model, e.g. pickscore = \"/models/pickscore\"", ""]
            continue
        if f.name == "sampler":
            lines += _sampler_toml(cfg.sampler) + [""]
            continue
        cls = type(getattr(cfg, f.name))
        if f.name == "model":
            lines.append("# kind = \"dit\" (the built-in DiT, these fields) or \"sd3\" / \"flux\" / \"wan\" with "
                         "path, lora_rank, lora_alpha, lora_targets, resolution, dtype, guidance, max_sequence_length "
                         "(PipelineModelConfig)")
        docs = _field_docs(cls.__doc__, [sf.name for sf in dataclasses.fields(cls)])
        lines.append(f"[{f.name}]")
        section = getattr(cfg, f.name)
        for sf in dataclasses.fields(cls):
            if sf.name in docs:
                lines.append(f"# {docs[sf.name]}")
            lines.append(f"{sf.name} = {_toml_value(getattr(section, sf.name))}")
        lines.append("")
    return "\n".join(lines)


def _sampler_toml(s: SamplerConfig) -> list[str]:
    """[sampler]: name and num_steps documented by SamplerConfig, the sampler's own fields by the
    "Fields:" block of its docstring."""
    # every documented SamplerConfig field is named, so each entry ends where the next begins
    docs = _field_docs(SamplerConfig.__doc__, ["name", "num_steps", "schedule", *SDE_WINDOW_KEYS])
    fields_doc = (SAMPLERS[s.name].__doc__ or "").partition("Fields:")[2]
    own = _field_docs(fields_doc, list(s.options))
    lines = ["[sampler]", f"# {docs['name']}",
             f"# registered samplers: {', '.join(sorted(SAMPLERS))}; the fields after num_steps are "
             f"those of {s.name!r} (each sampler takes its own)",
             f"name = {_toml_value(s.name)}", f"# {docs['num_steps']}", f"num_steps = {s.num_steps}"]
    for key, value in s.options.items():
        if key in own:
            lines.append(f"# {own[key]}")
        # TOML has no null: an unset (None) field is shown commented out.
        lines.append(f"# {key} = (unset)" if value is None else f"{key} = {_toml_value(value)}")
    return lines


def _field_docs(doc: str | None, names) -> dict[str, str]:
    """"name: text" entries of a docstring (continued on the following indented lines, ended by a
    blank line or the next entry); "a, b: text" documents a and b together."""
    docs, current = {}, []
    names = set(names)
    for line in (doc or "").splitlines():
        stripped = line.strip()
        heads = [h.strip() for h in stripped.split(":", 1)[0].split(",")]
        if ":" in stripped and all(h in names for h in heads):
            current = heads
            for h in heads:
                docs[h] = stripped.split(":", 1)[1].strip()
        elif current and stripped:
            for h in current:
                docs[h] += " " + stripped
        else:
            current = []
    return docs


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)
