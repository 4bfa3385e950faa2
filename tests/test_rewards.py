"""Reward protocol, validation, weighting, image rewards and the cached digits classifier."""

import warnings

import pytest
import torch

from ddrl_engine.data import digits_classifier as dc
from ddrl_engine.rewards import (
    BrightnessReward,
    ClassConfidenceReward,
    ContrastReward,
    Reward,
    WeightedReward,
    reward_classifier,
    validate_rewards,
)


@pytest.fixture(scope="module")
def classifier(split, cache_dir):
    return reward_classifier(split, cache_dir=cache_dir)


class _Const:
    def __init__(self, name, value):
        self.name, self.value = name, value

    def __call__(self, samples, cond):
        return torch.full((samples.shape[0],), self.value)


# --- validation ------------------------------------------------------------------------------------


def test_validate_passes_finite_and_casts():
    r, ok, n = validate_rewards(torch.tensor([0.5, 1.0], dtype=torch.float64), name="x")
    assert r.dtype == torch.float32 and ok.all() and n == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_validate_non_finite_raises_naming_reward(bad):
    with pytest.raises(ValueError, match="reward 'ocr' returned 1 non-finite"):
        validate_rewards(torch.tensor([1.0, bad, 2.0]), name="ocr")


def test_validate_drop_mode_warns_and_counts():
    with pytest.warns(RuntimeWarning, match="reward 'ocr' returned 2 non-finite"):
        r, ok, n = validate_rewards(torch.tensor([1.0, float("nan"), float("inf"), 2.0]), name="ocr", on_invalid="drop")
    assert n == 2 and ok.tolist() == [True, False, False, True] and r.tolist() == [1.0, 0.0, 0.0, 2.0]


@pytest.mark.parametrize(
    "r,err",
    [(torch.ones(3, 1), "shape"), (torch.ones(3, dtype=torch.long), "dtype"), ([1.0, 2.0, 3.0], "torch.Tensor")],
)
def test_validate_shape_and_dtype(r, err):
    with pytest.raises((ValueError, TypeError), match=err):
        validate_rewards(r, name="r", batch_size=3)
    with pytest.raises(ValueError, match=r"expected \[4\]"):
        validate_rewards(torch.ones(3), name="r", batch_size=4)
    with pytest.raises(ValueError, match="on_invalid"):
        validate_rewards(torch.ones(3), on_invalid="ignore")


# --- weighting ---------------------------------------------------------------------------------------


def test_weighted_reward_sum_and_components():
    w = WeightedReward([_Const("a", 1.0), _Const("b", 3.0)], [0.5, 2.0])
    assert isinstance(w, Reward)
    x, c = torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    torch.testing.assert_close(w(x, c), torch.full((4,), 6.5))
    comps = w.components(x, c)
    assert set(comps) == {"a", "b"} and torch.equal(comps["b"], torch.full((4,), 3.0))


def test_weighted_reward_invalid_component():
    w = WeightedReward([_Const("a", 1.0), _Const("broken", float("nan"))])
    x, c = torch.randn(3, 1, 8, 8), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="'broken'"):
        w(x, c)
    with pytest.warns(RuntimeWarning, match="'broken'"):
        batch = w.evaluate(x, c, on_invalid="drop")
    assert batch.n_invalid == {"a": 0, "broken": 3} and not batch.valid.any() and torch.isfinite(batch.total).all()
    with pytest.raises(ValueError, match="unique"):
        WeightedReward([_Const("a", 1.0), _Const("a", 2.0)])
    with pytest.raises(ValueError, match="weights has 1 entries"):
        WeightedReward([_Const("a", 1.0), _Const("b", 2.0)], [1.0])


# --- image rewards ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 1, 8, 8), (2, 4, 3, 8, 8)])
def test_image_rewards_are_hackable_by_saturation(shape):
    x = torch.rand(shape) * 2 - 1
    c = torch.zeros(shape[0], dtype=torch.long)
    b, s = BrightnessReward(), ContrastReward()
    for reward in (b, s):
        r = reward(x, c)
        assert isinstance(reward, Reward) and r.shape == (shape[0],) and r.dtype == torch.float32
    saturated = torch.full(shape, 5.0)  # clamped to +1, as an image decoder would
    assert torch.allclose(b(saturated, c), torch.ones(shape[0]))
    binary = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0)
    assert (s(binary, c) > s(x, c)).all()


# --- classifier ------------------------------------------------------------------------------------


def test_classifier_accuracy_and_features(split, classifier):
    assert classifier.accuracy(split.heldout_x, split.heldout_y) > 0.9
    feats = classifier.features(split.heldout_x[:5])
    assert feats.shape == (5, classifier.config.feature_dim)
    assert classifier.logits(split.heldout_x[:5]).shape == (5, 10)


def test_classifier_cache_is_reused(split, classifier, cache_dir, monkeypatch):
    files = list(cache_dir.glob("digits_classifier-*.safetensors"))
    assert len(files) == 1 and not list(cache_dir.glob("*.tmp"))

    def fail(*args, **kwargs):
        raise AssertionError("retrained although the cache holds the weights")

    monkeypatch.setattr(dc, "train_digits_classifier", fail)
    again = reward_classifier(split, cache_dir=cache_dir)
    for k, v in classifier.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    # another training set is another cache key: it would train (and here hit the mock)
    with pytest.raises(AssertionError, match="retrained"):
        dc.load_or_train_digits_classifier(split.heldout_x, split.heldout_y, cache_dir=cache_dir)


def test_classifier_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DDRL_ENGINE_CACHE", str(tmp_path))
    assert dc.default_cache_dir() == tmp_path
    monkeypatch.delenv("DDRL_ENGINE_CACHE")
    assert dc.default_cache_dir().name == "ddrl_engine"


def test_corrupt_cache_retrains_with_warning(split, tmp_path):
    x, y = split.heldout_x[:64], split.heldout_y[:64]
    cfg = dc.DigitsClassifierConfig(epochs=1)
    path = tmp_path / f"digits_classifier-{dc.cache_key(x, y, cfg)}.safetensors"
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable classifier cache"):
        dc.load_or_train_digits_classifier(x, y, cfg, cache_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dc.load_or_train_digits_classifier(x, y, cfg, cache_dir=tmp_path)  # now a valid file


def test_class_confidence_reward(split, classifier):
    reward = ClassConfidenceReward(classifier)
    x, y = split.heldout_x[:32], split.heldout_y[:32]
    right = reward(x, y)
    assert right.shape == (32,) and right.dtype == torch.float32 and ((right >= 0) & (right <= 1)).all()
    wrong = reward(x, (y + 1) % 10)
    assert right.mean() > 0.8 and wrong.mean() < 0.2
    with pytest.raises(ValueError, match=r"class ids in \[0, 10\)"):
        reward(x, torch.full((32,), 10))  # the null class has no confidence
