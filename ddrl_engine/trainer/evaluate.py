"""The held-out evaluation shared by every method: reward, realism, diversity, held-out data loss.

Everything is drawn from a fixed seed, so two methods (or two evaluations of one method) see the
same conditions and noise and differ only by their weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from ddrl_engine.algorithms import policy_data_loss
from ddrl_engine.monitors import FrechetDistance, class_entropy, mean_pairwise_distance
from ddrl_engine.rewards import WeightedReward, class_margin
from ddrl_engine.sampling import Guided, RolloutRunner, rollout


def decode(samples: Tensor) -> Tensor:
    """Samples as images: the model's [-1, 1] range, clipped as any image writer would."""
    return samples.clamp(-1, 1)


@dataclass
class Evaluator:
    """The default evaluation: samples of every evaluated condition (`conditions`, default
    0..num_classes - 1; samples_per_class each, fixed seed) scored by `rewards`, their diversity (per
    condition, in `features_fn`'s space when given, else on the decoded samples), realism (`fd`) and
    class statistics (`logits_fn`) when given, and the held-out data loss at `heldout_levels` levels.
    decode: what rewards and monitors see of the samples (default: clamped to the [-1, 1] image range;
    a latent model passes its VAE decode: latents are never clamped). Given a `sampling.Guided` policy
    (rollout.guidance_scale != 1), the samples use its guidance and the held-out data loss its unguided
    `.inner` (the data loss is always the conditional model's). The evaluation's decoded samples
    are returned; `save_samples` writes them as a PNG grid (a GIF for video). batch_size bounds the rows
    of each rollout and held-out forward (0 = all at once)."""

    rewards: WeightedReward
    heldout_x: Tensor
    heldout_y: Tensor
    num_classes: int
    samples_per_class: int
    seed: int
    heldout_levels: int
    fd: Optional[FrechetDistance] = None
    logits_fn: Optional[Callable[[Tensor], Tensor]] = None
    reduction: str = "mean"
    decode: Callable[[Tensor], Tensor] = decode
    conditions: Optional[Tensor] = None
    features_fn: Optional[Callable[[Tensor], Tensor]] = None
    batch_size: int = 0

    def _chunks(self, n: int) -> list[slice]:
        """Rows per forward: all at once (batch_size = 0) or batch_size at a time (real models)."""
        size = n if self.batch_size <= 0 else self.batch_size
        return [slice(i, min(n, i + size)) for i in range(0, n, size)]

    def condition_ids(self) -> Tensor:
        return torch.arange(self.num_classes) if self.conditions is None else self.conditions.cpu()

    def eval_conditions(self, device) -> Tensor:
        return self.condition_ids().to(device).repeat_interleave(self.samples_per_class)

    @torch.no_grad()
    def samples(self, policy, sampler, sample_shape, device) -> Tensor:
        cond = self.eval_conditions(device)
        parts = self._chunks(cond.shape[0])
        if len(parts) == 1:
            gen = torch.Generator(device).manual_seed(self.seed)
            return self.decode(rollout(policy, sampler, cond, generator=gen, sample_shape=sample_shape,
                                       reduction=self.reduction).samples)
        # In chunks: each chunk replays the whole batch's draws and keeps its rows (the noise of a
        # sample does not depend on batch_size).
        runner = RolloutRunner(policy, sampler, sample_shape=sample_shape, reduction=self.reduction)
        n, out = cond.shape[0], []
        for part in parts:
            gen = torch.Generator(device).manual_seed(self.seed)
            out.append(self.decode(runner(cond[part], generator=gen, shard=(part.start, n)).samples))
        return torch.cat(out)

    @torch.no_grad()
    def heldout_data_loss(self, policy, sampler, device) -> float:
        """The diffusion loss on held-out data at fixed levels and noise: the forward-KL estimate."""
        gen = torch.Generator(device).manual_seed(self.seed + 1)
        x0, y = self.heldout_x.to(device), self.heldout_y.to(device)
        ks = torch.linspace(0, sampler.num_steps - 1, self.heldout_levels).round().long().unique().tolist()
        total = 0.0
        sampler.to(device)
        for k in ks:
            eps = torch.randn(x0.shape, generator=gen, device=device)
            parts = self._chunks(x0.shape[0])
            losses = [policy_data_loss(policy, x0[p], y[p], eps[p], sampler.level(k)).item() for p in parts]
            # The mean over all rows: the chunks' means weighted by their shares (one chunk: as it is).
            total += losses[0] if len(parts) == 1 else sum(
                v * (p.stop - p.start) for v, p in zip(losses, parts)) / x0.shape[0]
        return total / len(ks)

    @torch.no_grad()
    def __call__(self, policy, sampler, sample_shape, device) -> tuple[dict, Tensor]:
        was_training = policy.training
        policy.eval()
        samples = self.samples(policy, sampler, sample_shape, device)
        cond = self.eval_conditions(device)
        batch = self.rewards.evaluate(samples, cond, on_invalid="drop")
        metrics = {"reward": batch.total[batch.valid].mean().item()}
        for name, value in batch.components.items():
            metrics[f"reward/{name}"] = value[batch.valid].mean().item()
        n_cond = self.condition_ids().numel()
        feats = samples if self.features_fn is None else self.features_fn(samples)
        per_class = feats.reshape(n_cond, self.samples_per_class, -1)
        metrics["diversity"] = sum(mean_pairwise_distance(c) for c in per_class) / n_cond
        if self.fd is not None:
            metrics["fd"] = self.fd(samples)
        if self.logits_fn is not None:
            logits = self.logits_fn(samples)  # once, for every class statistic
            metrics["class_entropy"] = class_entropy(samples, lambda _: logits)  # (it checks the logits' shape)
            metrics["class_accuracy"] = (logits.argmax(-1) == cond).float().mean().item()
            # The learned class_margin reward's quantity under this (independent) classifier.
            metrics["class_margin_heldout"] = class_margin(logits, cond).float().mean().item()
        if self.heldout_x.shape[0]:
            plain = policy.inner if isinstance(policy, Guided) else policy
            metrics["heldout_data_loss"] = self.heldout_data_loss(plain, sampler, device)
        policy.train(was_training)
        return metrics, samples

    def save_samples(self, samples: Tensor, path) -> Path:
        """The evaluation's decoded samples as one grid, a row per condition: `path`.png for images
        [N, C, H, W], `path`.gif for video [N, C, T, H, W] (one grid per frame)."""
        from PIL import Image

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.condition_ids().numel()
        x = ((samples.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        video = x.dim() == 5
        if not video:
            x = x.unsqueeze(2)  # [N, C, 1, H, W]
        n, c, t, h, w = x.shape
        x = x.reshape(rows, n // rows, c, t, h, w).permute(3, 0, 4, 1, 5, 2).reshape(t, rows * h, (n // rows) * w, c)
        frames = [Image.fromarray(f.squeeze(-1).numpy() if c == 1 else f.numpy()) for f in x]
        if video:
            out = path.with_suffix(".gif")
            frames[0].save(out, save_all=True, append_images=frames[1:], duration=125, loop=0)
        else:
            out = path.with_suffix(".png")
            frames[0].save(out)
        return out
