"""Realism (Frechet distance), diversity and held-out loss monitors."""

import math
import warnings

import pytest
import torch

from ddrl_engine.monitors import (
    FrechetDistance,
    HeldoutLossMonitor,
    class_entropy,
    digits_frechet_distance,
    frechet_distance,
    label_entropy,
    mean_pairwise_distance,
    realism_classifier_features,
)
from ddrl_engine.rewards import reward_classifier


# --- Frechet distance ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d", [(500, 8), (10, 32), (2, 4)])
def test_fd_of_a_set_with_itself_is_zero(n, d):
    f = torch.randn(n, d) * 3 + 1
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-5 * d)


def test_fd_matches_closed_form_and_grows_with_shift(seed):
    a = torch.randn(20000, 4)
    for shift in (0.5, 1.0, 2.0):
        # same covariance: FD is ||shift||^2 = 4 * shift^2 (up to sampling noise)
        assert frechet_distance(a, torch.randn(20000, 4) + shift) == pytest.approx(4 * shift**2, rel=0.05, abs=0.02)
    fds = [frechet_distance(a[:200], a[200:400] + s) for s in (0.0, 0.3, 1.0, 3.0)]
    assert fds == sorted(fds)
    # scaled covariance, 1-D: FD = (sigma_a - sigma_b)^2
    assert frechet_distance(torch.randn(20000, 1), 3 * torch.randn(20000, 1)) == pytest.approx(4.0, rel=0.05)


def test_fd_errors():
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(torch.randn(1, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="feature dims differ"):
        frechet_distance(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((5, 3), float("nan")), torch.randn(5, 3))


def test_digits_realism_monitor(split, cache_dir):
    fd = digits_frechet_distance(split, cache_dir=cache_dir)
    real = fd(split.heldout_x)
    saturated = fd(torch.ones(64, 1, 8, 8) + 0.01 * torch.randn(64, 1, 8, 8))
    noise = fd(torch.rand(360, 1, 8, 8) * 2 - 1)
    assert real < noise and real < saturated
    # the realism features are not the reward classifier's (different training data)
    feats = realism_classifier_features(split, cache_dir=cache_dir)
    reward_clf = reward_classifier(split, cache_dir=cache_dir)
    assert not torch.allclose(feats(split.heldout_x[:8]), reward_clf.features(split.heldout_x[:8]))
    assert len(list(cache_dir.glob("*.safetensors"))) == 2


def test_frechet_distance_with_custom_features():
    fd = FrechetDistance(lambda x: x.flatten(1)[:, :4], torch.randn(300, 1, 2, 2), batch_size=64)
    assert fd(torch.randn(300, 1, 2, 2)) < fd(torch.randn(300, 1, 2, 2) + 2)


# --- diversity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 1, 8, 8), (3, 4, 3, 8, 8), (2, 7)])
def test_diversity_of_identical_samples_is_zero(shape):
    x = torch.randn(shape[1:]).expand(shape)
    assert mean_pairwise_distance(x) == pytest.approx(0.0, abs=1e-6)
    assert mean_pairwise_distance(torch.randn(shape)) > 0


def test_mean_pairwise_distance_value():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert mean_pairwise_distance(x) == pytest.approx(10 / 3)  # pairs: 5, 0, 5
    with pytest.raises(ValueError, match="N >= 2"):
        mean_pairwise_distance(torch.randn(1, 3))


def test_class_entropy():
    one_hot = torch.eye(10)
    assert class_entropy(one_hot, lambda x: x) == pytest.approx(math.log(10))
    assert class_entropy(one_hot[[3, 3, 3]], lambda x: x) == 0.0
    assert label_entropy(torch.tensor([0, 0, 1, 1])) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        class_entropy(one_hot, lambda x: x[0])


# --- held-out loss -------------------------------------------------------------------------------------


def test_heldout_monitor_warns_once_per_crossing():
    m = HeldoutLossMonitor()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert m.update(0, 1.0) is False
        assert m.update(1, 1.09) is False
    with pytest.warns(RuntimeWarning, match="rose 15.0%"):
        assert m.update(2, 1.15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert m.update(3, 1.2)  # still above: no second warning
        assert not m.update(4, 1.05)
    with pytest.warns(RuntimeWarning):
        m.update(5, 1.3)  # a new crossing warns again
    assert m.num_crossings == 2 and not m.should_stop and m.rise == pytest.approx(0.3)


def test_heldout_monitor_early_stop_and_resume():
    m = HeldoutLossMonitor(rise_threshold=0.2, early_stop=True)
    m.update(0, 2.0)
    m.update(10, 2.3)
    assert not m.should_stop
    state = m.state_dict()
    resumed = HeldoutLossMonitor(rise_threshold=0.2, early_stop=True)
    resumed.load_state_dict(state)
    assert resumed.start == 2.0 and resumed.last_step == 10
    with pytest.warns(RuntimeWarning):
        resumed.update(20, 2.5)
    assert resumed.should_stop
    resumed.update(30, 1.0)
    assert resumed.should_stop  # stopping is latched


def test_heldout_monitor_errors():
    with pytest.raises(ValueError, match="rise_threshold"):
        HeldoutLossMonitor(rise_threshold=-0.1)
    m = HeldoutLossMonitor()
    with pytest.raises(ValueError, match="not finite"):
        m.update(0, float("nan"))
    with pytest.raises(ValueError, match="positive"):
        m.update(0, 0.0)
    with pytest.raises(KeyError, match="missing"):
        m.load_state_dict({"start": 1.0})


def test_evaluator_runs_the_classifier_once(tmp_path):
    """class_entropy, class_accuracy and class_margin_heldout share one classifier forward, and each is
    the statistic of that forward's logits."""
    from ddrl_engine.monitors import label_entropy
    from ddrl_engine.trainer.builders import build_rewards
    from ddrl_engine.trainer.evaluate import Evaluator
    from tests.trainer_helpers import make_trainer, tiny_config

    cfg = tiny_config(tmp_path)
    tr = make_trainer(cfg)
    calls, seen = [], []
    w = torch.randn(64, tr.policy.num_classes, generator=torch.Generator().manual_seed(3))

    def logits_fn(x):
        calls.append(x.shape[0])
        seen.append(x.flatten(1) @ w)
        return seen[-1]

    ev = Evaluator(rewards=build_rewards(cfg), heldout_x=tr.dataset.heldout_x[:0], heldout_y=tr.dataset.heldout_y[:0],
                   num_classes=tr.policy.num_classes, samples_per_class=2, seed=0, heldout_levels=1, logits_fn=logits_fn)
    metrics, samples = ev(tr.policy, tr.sampler, tr.sample_shape, "cpu")
    assert calls == [samples.shape[0]]
    logits, cond = seen[0], ev.eval_conditions("cpu")
    assert metrics["class_entropy"] == pytest.approx(label_entropy(logits.argmax(1), logits.shape[1]))
    assert metrics["class_accuracy"] == pytest.approx((logits.argmax(1) == cond).float().mean().item())
