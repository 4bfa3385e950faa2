"""Frechet distance between feature distributions (the FID recipe, with pluggable features).

For the digits default, features come from a classifier trained on the HELD-OUT split: a different
network from the reward's classifier (train split), so a policy that games the reward network does
not also game its own realism measure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ..data.digits import DigitsSplit, digits_split
from ..data.digits_classifier import DigitsClassifierConfig, load_or_train_digits_classifier

FeatureFn = Callable[[Tensor], Tensor]


def _mean_cov(feats: Tensor, arg: str) -> tuple[Tensor, Tensor]:
    if not isinstance(feats, Tensor) or feats.dim() != 2:
        raise ValueError(f"{arg} must be a [N, D] feature tensor, got {getattr(feats, 'shape', type(feats))}")
    if feats.shape[0] < 2:
        raise ValueError(f"{arg} needs at least 2 samples for a covariance, got {feats.shape[0]}")
    f = feats.detach().to("cpu", torch.float64)
    if not torch.isfinite(f).all():
        raise ValueError(f"{arg} contains NaN/inf features")
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _sqrtm_psd(a: Tensor) -> Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(feats_a: Tensor, feats_b: Tensor, *, ridge: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two [N, D] feature sets.

    In float64. tr((S_a S_b)^(1/2)) is computed as the sum of sqrt-eigenvalues of the symmetric
    S_a^(1/2) S_b S_a^(1/2), which has the same spectrum and avoids a non-symmetric sqrtm. With fewer
    samples than dimensions the covariances are singular; `ridge` * I added to both keeps it stable.
    """
    if feats_a.dim() == 2 and feats_b.dim() == 2 and feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature dims differ: feats_a {tuple(feats_a.shape)}, feats_b {tuple(feats_b.shape)}")
    mu_a, cov_a = _mean_cov(feats_a, "feats_a")
    mu_b, cov_b = _mean_cov(feats_b, "feats_b")
    eye = torch.eye(cov_a.shape[0], dtype=torch.float64)
    cov_a, cov_b = cov_a + ridge * eye, cov_b + ridge * eye
    s_a = _sqrtm_psd(cov_a)
    m = s_a @ cov_b @ s_a
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt
    return max(float(fd), 0.0)  # rounding can give a tiny negative for identical sets


class FrechetDistance:
    """FD of samples to a fixed reference set, in the space of `feature_fn` ([B, ...] -> [B, D])."""

    def __init__(self, feature_fn: FeatureFn, reference: Tensor, *, batch_size: int = 512, ridge: float = 1e-6):
        self.feature_fn, self.batch_size, self.ridge = feature_fn, int(batch_size), ridge
        self.reference_features = self.features(reference)

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        return torch.cat([self.feature_fn(x[i : i + self.batch_size]) for i in range(0, x.shape[0], self.batch_size)])

    def __call__(self, samples: Tensor) -> float:
        return frechet_distance(self.features(samples), self.reference_features, ridge=self.ridge)


def realism_classifier_features(
    split: Optional[DigitsSplit] = None,
    config: DigitsClassifierConfig = DigitsClassifierConfig(),
    cache_dir: Optional[Union[str, Path]] = None,
) -> FeatureFn:
    """Penultimate features of a digits classifier trained on the HELD-OUT split (cached)."""
    split = digits_split() if split is None else split
    clf = load_or_train_digits_classifier(split.heldout_x, split.heldout_y, config, cache_dir)

    def features(x: Tensor) -> Tensor:
        clf.to(x.device)
        return clf.features(x.float().clamp(-1, 1))

    return features


def digits_frechet_distance(
    split: Optional[DigitsSplit] = None, cache_dir: Optional[Union[str, Path]] = None
) -> FrechetDistance:
    """The default realism monitor: FD to the train-split digits (the data p~ the policy is regularised
    towards; the larger split, so the reference covariance is well estimated) in held-out-classifier features."""
    split = digits_split() if split is None else split
    return FrechetDistance(realism_classifier_features(split, cache_dir=cache_dir), split.train_x)
