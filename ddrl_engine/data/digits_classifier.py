"""A small digits classifier, trained by the engine itself and cached on disk.

It lives in the data layer so that both rewards (class confidence, trained on the train split) and
monitors (realism features, trained on the held-out split) use one implementation without importing
each other. Training is a few seconds on CPU with a fixed seed; the weights are cached as
safetensors under a key that hashes the training config and the exact training data, so a changed
split or config never reuses stale weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from torch import Tensor, nn

# Bump when the architecture or training procedure changes, so old cache entries are not reused.
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class DigitsClassifierConfig:
    """Architecture and training settings (all part of the cache key).

    channels: conv widths; feature_dim: width of the penultimate layer (`features`);
    epochs/batch_size/lr/weight_decay: AdamW training; seed: init and shuffling.
    """

    channels: tuple[int, int] = (16, 32)
    feature_dim: int = 32
    num_classes: int = 10
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


class DigitsClassifier(nn.Module):
    """Conv net on [B, 1, 8, 8] in [-1, 1]: two 3x3 convs (8x8 -> 4x4), a feature layer, logits."""

    def __init__(self, config: DigitsClassifierConfig = DigitsClassifierConfig()) -> None:
        super().__init__()
        self.config = config
        c1, c2 = config.channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.GELU(),
            nn.Conv2d(c1, c2, 3, padding=1, stride=2), nn.GELU(),
            nn.Flatten(), nn.Linear(c2 * 4 * 4, config.feature_dim), nn.GELU(),
        )
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def _check(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"x must have shape [B, 1, 8, 8], got {tuple(x.shape)}")
        return x.to(self.head.weight.dtype)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features [B, feature_dim]."""
        return self.body(self._check(x))

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(x)

    @torch.no_grad()
    def accuracy(self, x: Tensor, y: Tensor) -> float:
        return (self.logits(x).argmax(-1) == y).float().mean().item()


def default_cache_dir() -> Path:
    """$DDRL_ENGINE_CACHE, else ~/.cache/ddrl_engine (read when called, not at import)."""
    env = os.environ.get("DDRL_ENGINE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ddrl_engine"


def cache_key(x: Tensor, y: Tensor, config: DigitsClassifierConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": _FORMAT_VERSION, **asdict(config)}, sort_keys=True).encode())
    for t in (x, y):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:20]


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    # The net is so small that intra-op threading only adds synchronisation; on a busy machine
    # (e.g. tests next to a compiler) two spinning OpenMP threads made training 5x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def train_digits_classifier(
    x: Tensor, y: Tensor, config: DigitsClassifierConfig = DigitsClassifierConfig()
) -> DigitsClassifier:
    """Trains on (x [N, 1, 8, 8], y [N]) on CPU, deterministically for a given config and data."""
    if x.shape[:1] != y.shape[:1] or x.shape[0] == 0:
        raise ValueError(
            f"x and y must be non-empty with one label per image: x {tuple(x.shape)}, y {tuple(y.shape)}"
        )
    x, y = x.detach().cpu().float(), y.detach().cpu().long()
    # fork_rng: a fixed seed here must not reset the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]), _single_thread():
        torch.manual_seed(config.seed)
        model = DigitsClassifier(config)
        gen = torch.Generator().manual_seed(config.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
        for _ in range(config.epochs):
            perm = torch.randperm(x.shape[0], generator=gen)
            for i in range(0, x.shape[0], config.batch_size):
                idx = perm[i : i + config.batch_size]
                # Small random shifts: the classifier must judge generated digits that are not pixel-aligned.
                xb = torch.roll(x[idx], shifts=tuple(torch.randint(-1, 2, (2,), generator=gen).tolist()), dims=(2, 3))
                loss = nn.functional.cross_entropy(model(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
    return model.eval().requires_grad_(False)


def load_or_train_digits_classifier(
    x: Tensor,
    y: Tensor,
    config: DigitsClassifierConfig = DigitsClassifierConfig(),
    cache_dir: Optional[Union[str, Path]] = None,
) -> DigitsClassifier:
    """Loads the classifier for (x, y, config) from the cache, training and caching it if absent.

    Returns a CPU model in eval mode with gradients off; move it with `.to(device)`.
    """
    from safetensors.torch import load_file, save_file

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"digits_classifier-{cache_key(x, y, config)}.safetensors"
    if path.exists():
        try:
            model = DigitsClassifier(config)
            model.load_state_dict(load_file(str(path)))
            return model.eval().requires_grad_(False)
        except Exception as e:  # a truncated or foreign file: retrain and replace it rather than fail
            warnings.warn(f"ignoring unreadable classifier cache {path} ({e}); retraining", stacklevel=2)

    model = train_digits_classifier(x, y, config)
    cache.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    # Write to a temporary file in the same directory, then rename: readers never see a partial file,
    # and concurrent trainers (several ranks) just replace each other's identical result.
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=path.stem, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"config": json.dumps(asdict(config))})
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return model
