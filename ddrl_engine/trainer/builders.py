"""The built-in default's pieces from a TrainConfig: the DiT, digits (or a folder), the named
rewards, the digits evaluation. The Trainer itself needs none of this: it takes any policy, sampler,
rewards and dataset (see docs/backend.md); these builders are what `ddrl-engine` runs by default.
"""
from __future__ import annotations

import functools

import torch

from ddrl_engine.data import Dataset, digits_split, load_folder
from ddrl_engine.models.dit import DiT
from ddrl_engine.rewards import (BrightnessReward, ClassConfidenceReward, ClassMarginReward, ContrastReward, WeightedReward,
                                 reward_classifier)
from ddrl_engine.trainer.config import TrainConfig

REWARD_NAMES = ("brightness", "contrast", "class_confidence", "class_margin")


def build_dataset(cfg: TrainConfig) -> Dataset:
    if cfg.data.dataset == "digits":
        split = digits_split(seed=0, heldout_fraction=cfg.data.heldout_fraction)
        return Dataset(split.train_x, split.train_y, split.heldout_x, split.heldout_y)
    if not cfg.data.path:
        raise ValueError("config: 'data.path' must name a folder when data.dataset = 'folder'")
    x, y = load_folder(cfg.data.path)
    return Dataset.split(x, y, cfg.data.heldout_fraction, seed=0)


def build_model(cfg: TrainConfig) -> DiT:
    return DiT(cfg.model)


def build_sampler(cfg: TrainConfig):
    return cfg.sampler.build()


def build_rewards(cfg: TrainConfig) -> WeightedReward:
    """The run's [rewards], computed in this process."""
    return named_rewards(cfg.rewards, cfg.data.dataset == "digits")


def check_reward_names(weights: dict[str, float], digits: bool) -> None:
    """The built-in reward names are known and usable with this data (also checked at config load)."""
    for name in weights:
        if name not in REWARD_NAMES:
            raise ValueError(f"config: unknown reward 'rewards.{name}' (known: {', '.join(REWARD_NAMES)})")
        if name in ("class_confidence", "class_margin") and not digits:
            raise ValueError(f"config: reward '{name}' uses the digits classifier; it needs data.dataset = 'digits'")


def named_rewards(weights: dict[str, float], digits: bool) -> WeightedReward:
    """The built-in rewards by name (a top-level function: reward workers build them from it)."""
    check_reward_names(weights, digits)
    make = {"brightness": BrightnessReward, "contrast": ContrastReward,
            "class_confidence": lambda: ClassConfidenceReward(reward_classifier()),
            "class_margin": lambda: ClassMarginReward(reward_classifier())}
    return WeightedReward([make[name]() for name in weights], list(weights.values()))


def build_trainer_rewards(cfg: TrainConfig, in_process: WeightedReward):
    """What the Trainer computes rewards with: `in_process` (reward_workers.workers = 0), or an
    AsyncReward whose workers build the same rewards (close it when done: it is a context manager)."""
    w = cfg.reward_workers
    if w.workers == 0:
        return in_process
    from ddrl_engine.rewards.async_rewards import AsyncReward

    return AsyncReward(functools.partial(named_rewards, dict(cfg.rewards), cfg.data.dataset == "digits"),
                       workers=w.workers, timeout_s=w.timeout_s, retries=w.retries, on_invalid=cfg.run.on_invalid_reward,
                       on_failure=w.on_failure, worker_threads=w.threads)


def build_evaluator(cfg: TrainConfig, dataset: Dataset, rewards: WeightedReward):
    """The default evaluation; on digits, realism and class entropy use the held-out digits classifier."""
    from ddrl_engine.monitors import FrechetDistance, realism_classifier_features
    from ddrl_engine.trainer.evaluate import Evaluator

    fd = logits_fn = None
    if cfg.data.dataset == "digits":
        split = digits_split(seed=0, heldout_fraction=cfg.data.heldout_fraction)
        features = realism_classifier_features(split)
        fd = FrechetDistance(features, dataset.heldout_x)
        from ddrl_engine.data import load_or_train_digits_classifier

        clf = load_or_train_digits_classifier(split.heldout_x, split.heldout_y)
        logits_fn = lambda x: clf.to(x.device).logits(x.float().clamp(-1, 1))  # noqa: E731
    return Evaluator(rewards=rewards, heldout_x=dataset.heldout_x, heldout_y=dataset.heldout_y,
                     num_classes=cfg.model.num_classes, samples_per_class=cfg.eval.samples_per_class,
                     seed=cfg.eval.seed, heldout_levels=cfg.eval.heldout_loss_levels, fd=fd, logits_fn=logits_fn,
                     reduction=cfg.algorithm.logprob_reduction)


@torch.no_grad()
def synthetic_dataset(cfg: TrainConfig, base, sampler, dataset: Dataset | None, *, conditions: torch.Tensor | None = None,
                      chunk: int = 256) -> Dataset:
    """Regularisation data drawn once from the base model (the method allows real data or base samples).

    data.synthetic_count samples with conditions drawn uniformly from `conditions` (default: the base
    policy's 0..num_classes - 1), from a fixed seed, `chunk` per rollout, in the policy's own state space
    as sampled (never clamped: for a latent model, latents). The held-out split is `dataset`'s (real
    data), or without one a `data.heldout_fraction` share of the samples.
    """
    from ddrl_engine.sampling import rollout

    device = cfg.run.device
    n = cfg.data.synthetic_count
    if n < 1:
        raise ValueError(f"config: 'data.synthetic_count' must be >= 1, got {n}")
    ids = torch.arange(base.num_classes) if conditions is None else conditions.cpu()
    labels = ids[torch.randint(0, ids.numel(), (n,), generator=torch.Generator().manual_seed(cfg.run.seed + 7))]
    gen = torch.Generator(device).manual_seed(cfg.run.seed + 7)
    was_training = base.training
    base.eval()
    chunks = [rollout(base, sampler, y.to(device), generator=gen, sample_shape=base.sample_shape).samples.cpu()
              for y in labels.split(chunk)]
    base.train(was_training)
    x = torch.cat(chunks)
    if dataset is None:
        return Dataset.split(x, labels, cfg.data.heldout_fraction, seed=cfg.run.seed)
    return Dataset(x, labels, dataset.heldout_x, dataset.heldout_y)


def build_training_data(cfg: TrainConfig, base, sampler, dataset: Dataset) -> Dataset:
    """The dataset the trainer regularises towards: real data, or base-model samples."""
    return synthetic_dataset(cfg, base, sampler, dataset) if cfg.data.synthetic else dataset
