"""A run on a local diffusers pipeline folder ([model] kind = "sd3", "flux" or "wan"), built from the
config: everything the Trainer takes, plus the bundle (VAE decode for rewards and pictures).

Order of work (cheap checks first, nothing downloaded, ever):
1. the prompt files, the captioned folder's metadata and the pipeline folder (pipelines.preflight; with
   sampler.schedule = "diffusers" also its scheduler, which gives the sampler's levels) are read and
   checked before any weight is loaded;
2. the rewards are built (their names and model folders checked first), then the pipeline (`load_bundle`);
3. every prompt text (training prompts, held-out prompts, captions, the empty prompt) is encoded once
   into the on-disk prompt cache, and the captioned images once into the latent cache (both under
   the engine's cache folder, keyed by the model), then the text encoders are freed;
4. the policy resolves prompt ids from the on-disk bank (device memory follows the batch), gets its
   LoRA adapters seeded by run.seed, and synthetic data (if asked) is drawn from it before training.
Two-expert Wan2.2 (A14B: transformer_2, boundary_ratio): the policy is a `WanExpertsPolicy` routing each
row to its expert by level; both experts get LoRA (distinct seeds derived from run.seed) or are both
fully trained; `[rollout] guidance_scale` guides both experts (WanPipeline's default when
guidance_scale_2 is not given; no separate low-noise scale is exposed); rollout.cuda_graph is refused.
Prompt ids: ids 0..len(prompts)-1 are the training prompts (the rollout conditions), then the held-out
prompts and captions not among them, then the empty prompt.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ddrl_engine.data import (Dataset, LatentCache, PromptCache, default_cache_dir, read_captioned,
                              read_prompts)
from ddrl_engine.models.trainable import upcast_trained
from ddrl_engine.rewards import build_named_rewards
from ddrl_engine.trainer.config import PipelineModelConfig, TrainConfig
from ddrl_engine.trainer.evaluate import Evaluator

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def frames_mean(image_factory, ctx):
    """An image reward's factory applied to every frame of a video, averaged (FrameAggregated "mean")."""
    from ddrl_engine.rewards import FrameAggregated

    return FrameAggregated(image_factory(ctx), "mean")


def pickscore_frames(ctx):
    """PickScore of every frame of a video, averaged (the built-in "pickscore" of a video model)."""
    from ddrl_engine.rewards.registry import pickscore_factory

    return frames_mean(pickscore_factory, ctx)


def pipeline_reward_factories(video: bool = False) -> dict:
    """The built-in rewards a pipeline run can name in [rewards] (import paths work besides): "pickscore"
    (a transformers CLIP folder), "clip_score" and "aesthetic" (open_clip folders, rewards.clip),
    "brightness", "contrast". For a video model the model-based ones score every frame and average."""
    from ddrl_engine.rewards import BrightnessReward, ContrastReward
    from ddrl_engine.rewards.registry import aesthetic_factory, clip_score_factory, pickscore_factory

    models = {"pickscore": pickscore_factory, "clip_score": clip_score_factory, "aesthetic": aesthetic_factory}
    if video:
        models = {k: pickscore_frames if k == "pickscore" else functools.partial(frames_mean, f) for k, f in models.items()}
    return {**models, "brightness": BrightnessReward, "contrast": ContrastReward}


@dataclass
class PipelineRun:
    """What `ddrl-engine train` hands the Trainer for a pipeline model."""

    bundle: object
    policy: torch.nn.Module
    sampler: object
    rewards: object
    dataset: Dataset
    evaluator: Evaluator
    conditions: torch.Tensor
    texts: list[str]

    @property
    def decode(self):
        return self.bundle.decode


def model_key(m: PipelineModelConfig) -> str:
    """The cache key of what the encoders produce: the folder, kind, dtype, text length, guidance."""
    info = dict(kind=m.kind, path=str(Path(m.path).resolve()), dtype=m.dtype, msl=m.max_sequence_length,
                guidance=m.guidance, resolution=list(m.resolution))
    return f"{m.kind}-{hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]}"


def _texts(prompts: list[str], *extra: list[str]) -> list[str]:
    """The training prompts (ids 0..n-1, duplicates kept) then the other texts not among them."""
    seen, out = set(prompts), list(prompts)
    for group in extra:
        for t in group:
            if t not in seen:
                seen.add(t)
                out.append(t)
    return out


def _ids(texts: list[str], wanted: list[str]) -> torch.Tensor:
    first: dict[str, int] = {}
    for i, t in enumerate(texts):
        first.setdefault(t, i)
    return torch.tensor([first[t] for t in dict.fromkeys(wanted)], dtype=torch.long)


def reward_factory(cfg: TrainConfig, texts: list[str]):
    """A picklable factory of the run's rewards (reward workers build them from it too)."""
    video = len(cfg.model.resolution) == 3
    return functools.partial(build_named_rewards, dict(cfg.rewards), builtins=pipeline_reward_factories(video),
                             reward_models=dict(cfg.reward_models), prompts=texts + [""], device=cfg.run.device)


def load_policy(cfg: TrainConfig, *, log=print):
    """The bundle with its trainable policy (LoRA adapters added, seeded by run.seed): what eval and
    export rebuild before loading a checkpoint's weights."""
    from ddrl_engine.pipelines import load_bundle

    m = cfg.model
    bundle = load_bundle(m.kind, m.path, resolution=m.resolution, dtype=DTYPES[m.dtype], device=cfg.run.device,
                         max_sequence_length=m.max_sequence_length or None, guidance=m.guidance or None)
    if m.lora_rank:
        n = bundle.policy.enable_lora(m.lora_rank, alpha=m.lora_alpha or None, target_modules=tuple(m.lora_targets),
                                      seed=cfg.run.seed)
        log(f"LoRA rank {m.lora_rank}: {n:,} trainable parameters (fp32 adapters on the {m.dtype} base)")
    elif n := upcast_trained(bundle.policy):  # full fine-tuning: fp32 master weights (trainable.upcast_trained)
        log(f"full fine-tuning: the transformer's {n:,} parameters are trained in fp32 (loaded in {m.dtype}; "
            f"AdamW on {m.dtype} weights would round most updates away)")
    return bundle


def build_sampler(cfg: TrainConfig, pre=None):
    """The run's sampler: `cfg.sampler.build()`, or with sampler.schedule = "diffusers" the rectified-flow
    SDE whose levels are the folder's scheduler sigmas after set_timesteps(num_steps, ...) with the
    arguments the kind's diffusers pipeline passes at [model] resolution (FLUX: its sigmas and the
    resolution-dependent mu; see ddrl_engine.pipelines.schedule). Reads only the scheduler's config:
    call it before any weight loads. `pre`: the folder's preflight (computed when not given)."""
    s = cfg.sampler
    if s.schedule != "diffusers":
        return s.build()
    m = cfg.model
    if not isinstance(m, PipelineModelConfig):
        raise ValueError("config: sampler.schedule = 'diffusers' needs a pipeline [model] (kind = 'sd3', 'flux' or 'wan')")
    from ddrl_engine.pipelines import preflight
    from ddrl_engine.pipelines.schedule import load_scheduler, set_timesteps_kwargs
    from ddrl_engine.sampling import from_diffusers

    pre = pre if pre is not None else preflight(m.kind, m.path, m.resolution)
    scheduler = load_scheduler(pre)
    kwargs = set_timesteps_kwargs(pre, scheduler, s.num_steps)
    try:
        return from_diffusers(scheduler, s.num_steps, noise_level=s.noise_level, **kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"config: sampler.schedule = 'diffusers': the folder's scheduler {type(scheduler).__name__} "
                         f"({pre.path / 'scheduler'}) gives no rectified-flow chain: {e}") from e


def build_pipeline_run(cfg: TrainConfig, *, log=print, progress: bool = True) -> PipelineRun:
    m = cfg.model
    if not isinstance(m, PipelineModelConfig):
        raise TypeError("build_pipeline_run: cfg.model must be a pipeline [model] (kind = 'sd3', 'flux' or 'wan')")
    from ddrl_engine.pipelines import preflight

    prompts = read_prompts(cfg.data.prompts)
    eval_prompts = read_prompts(cfg.data.eval_prompts) if cfg.data.eval_prompts else prompts
    items = read_captioned(cfg.data.path) if cfg.data.dataset == "captioned" and not cfg.data.synthetic else []
    if cfg.sampler.name != "rectified_flow_sde":
        raise ValueError(f"config: a {m.kind!r} model is a flow-matching model: 'sampler.name' must be "
                         f"'rectified_flow_sde', got {cfg.sampler.name!r}")
    pre = preflight(m.kind, m.path, m.resolution)
    if pre.two_experts and cfg.rollout.cuda_graph:
        raise ValueError(f"config: 'rollout.cuda_graph' = true cannot run the two-expert Wan2.2 folder {m.path!r}: "
                         "which expert a row runs depends on its level (a data-dependent split, read on the host), "
                         "which a CUDA graph cannot capture; set rollout.cuda_graph = false")
    cp = cfg.distributed.context_parallel
    if cp > 1:  # heads and tokens from the folder's config, before any weight loads
        from ddrl_engine.attention.context_parallel import check_context_parallel
        from ddrl_engine.models.diffusers import check_ring_applies
        from ddrl_engine.pipelines.bundle import policy_class

        how = cfg.distributed.context_parallel_attention
        check_ring_applies(policy_class(m.kind), how, cp)
        check_context_parallel(pre.attention_heads, pre.patch_tokens, cp, f"{m.kind} transformer ({m.path})", how)
    sampler = build_sampler(cfg, pre)  # the folder's scheduler config only (schedule = "diffusers"): no weights
    texts = _texts(prompts, eval_prompts, [c for _, c in items])
    # Reward names and model folders are checked before any reward model (then the pipeline) loads.
    rewards = reward_factory(cfg, texts)()
    bundle = load_policy(cfg, log=log)
    key = model_key(m)
    cache = PromptCache(default_cache_dir() / "prompts", key)

    def encode(batch):
        c = bundle.encode_prompts(batch)
        return {k: v for k, v in (("embeds", c.embeds), ("pooled", c.pooled), ("guidance", c.guidance)) if v is not None}

    bank = cache.bank(texts, encode, progress=progress)
    dataset = None
    if items:
        video = len(pre.latent_shape) == 4
        res = tuple(m.resolution[-2:])
        lat = LatentCache(default_cache_dir() / "latents", key).encode(
            items, bundle.encode, resolution=res, num_frames=m.resolution[0] if video else None, progress=progress)
        dataset = Dataset.split(lat.latents.float(), lat.ids_into(texts), cfg.data.heldout_fraction, seed=0)
    bundle.free_text_encoders()
    policy = bundle.policy
    policy.set_prompt_bank(bank)
    conditions = torch.arange(len(prompts))
    if cfg.data.synthetic:
        from ddrl_engine.trainer.builders import synthetic_dataset

        log(f"synthetic data: {cfg.data.synthetic_count} base-model samples of the training prompts")
        dataset = synthetic_dataset(cfg, policy, sampler, dataset, conditions=conditions,
                                    chunk=cfg.rollout.conditions_per_step * cfg.algorithm.group_size)
    features = getattr(next((r for r in rewards.rewards if hasattr(r, "image_features")), None), "image_features", None)
    evaluator = Evaluator(rewards=rewards, heldout_x=dataset.heldout_x, heldout_y=dataset.heldout_y,
                          num_classes=len(texts), conditions=_ids(texts, eval_prompts),
                          samples_per_class=cfg.eval.samples_per_class, seed=cfg.eval.seed,
                          heldout_levels=cfg.eval.heldout_loss_levels, reduction=cfg.algorithm.logprob_reduction,
                          decode=bundle.decode, features_fn=features,
                          batch_size=cfg.rollout.conditions_per_step * cfg.algorithm.group_size)
    return PipelineRun(bundle, policy, sampler, rewards, dataset, evaluator, conditions, texts)
