"""Rewards by import path (load_reward), by name (build_named_rewards), and image rewards on video
frames (FrameAggregated)."""

import functools
import pickle

import pytest
import torch

from ddrl_engine.rewards import (
    BrightnessReward,
    FrameAggregated,
    RewardContext,
    WeightedReward,
    build_named_rewards,
    load_reward,
)
from ddrl_engine.rewards.async_rewards import AsyncReward
from ddrl_engine.rewards.registry import pickscore_factory
from ddrl_engine.rewards.video import frame_aggregated

SELF = __name__  # "tests.test_reward_registry": import paths into this module


# --- rewards importable from here -----------------------------------------------------------------------


class ConstReward:
    """A reward class taking arguments."""

    def __init__(self, value: float = 1.0, name: str = "const") -> None:
        self.value, self.name = value, name

    def __call__(self, samples, cond):
        return torch.full((samples.shape[0],), float(self.value))


def frame_index_reward(samples, cond):
    """A function reward: the first pixel of each image (frames below are constant images)."""
    return samples[:, 0, 0, 0].float()


frame_index_reward.name = "pixel"

INSTANCE = ConstReward(2.0, name="instance")
NOT_A_REWARD = 42


def plain_function(samples, cond):  # callable, but no `name`
    return samples.flatten(1).mean(1)


class Namespace:
    nested = ConstReward(3.0, name="nested")


def brightness_builtin(ctx):
    return BrightnessReward()


def prompt_count_builtin(ctx):
    """A built-in using the context: scores the number of prompts, needs a model folder."""
    ctx.model_path()
    return ConstReward(len(ctx.require_prompts()), name=ctx.name)


class Ones:
    """A zero-argument reward class: a built-in factory called with no context."""

    name = "ones"

    def __call__(self, samples, cond):
        return torch.ones(samples.shape[0])


BUILTINS = {"brightness": brightness_builtin, "ones": Ones, "needs_model": prompt_count_builtin}


def _x(n=3):
    return torch.rand(n, 3, 8, 8) * 2 - 1, torch.zeros(n, dtype=torch.long)


# --- load_reward -------------------------------------------------------------------------------------------


def test_load_reward_classes_instances_functions():
    r = load_reward(f"{SELF}:ConstReward", value=5.0, name="five")
    assert isinstance(r, ConstReward) and r.name == "five" and r(*_x())[0] == 5.0
    assert load_reward(f"{SELF}:INSTANCE") is INSTANCE
    assert load_reward(f"{SELF}:frame_index_reward") is frame_index_reward
    assert load_reward(f"{SELF}:Namespace.nested").name == "nested"
    assert isinstance(load_reward("ddrl_engine.rewards:BrightnessReward"), BrightnessReward)


@pytest.mark.parametrize("spec", ["ConstReward", f"{SELF}:", f":ConstReward", f"{SELF}:Const Reward", f"{SELF}:a:b"])
def test_load_reward_bad_format(spec):
    with pytest.raises(ValueError, match="must look like 'package.module:Name'"):
        load_reward(spec)


def test_load_reward_errors_name_the_cause():
    with pytest.raises(ModuleNotFoundError, match="no module named 'no_such_pkg'"):
        load_reward("no_such_pkg.rewards:X")
    with pytest.raises(ModuleNotFoundError, match="no module named 'tests.no_such_module'"):
        load_reward("tests.no_such_module:X")
    with pytest.raises(AttributeError, match=f"'{SELF}' has no attribute 'Missing'"):
        load_reward(f"{SELF}:Missing")
    with pytest.raises(AttributeError, match=f"'{SELF}.Namespace' has no attribute 'missing'"):
        load_reward(f"{SELF}:Namespace.missing")
    with pytest.raises(TypeError, match="not a reward \\(not callable\\)"):
        load_reward(f"{SELF}:NOT_A_REWARD")
    with pytest.raises(TypeError, match="not a reward \\(has no str `name`\\)"):
        load_reward(f"{SELF}:plain_function")
    with pytest.raises(TypeError, match="not a class.*takes no arguments"):
        load_reward(f"{SELF}:INSTANCE", value=3)
    with pytest.raises(TypeError, match="could not instantiate ConstReward"):
        load_reward(f"{SELF}:ConstReward", colour="red")
    with pytest.raises(TypeError, match="must be a str"):
        load_reward(ConstReward)


def test_load_reward_module_with_a_missing_dependency(tmp_path, monkeypatch):
    (tmp_path / "needs_missing_dep.py").write_text("import not_installed_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="imports 'not_installed_dependency_xyz', which is not installed"):
        load_reward("needs_missing_dep:Reward")


# --- build_named_rewards -------------------------------------------------------------------------------------


def test_build_named_rewards_builtins_and_import_paths(tmp_path):
    weights = {"brightness": 0.5, f"{SELF}:ConstReward": 2.0, "ones": 1.0, "needs_model": 0.25}
    rewards = build_named_rewards(weights, builtins=BUILTINS, reward_models={"needs_model": tmp_path},
                                  prompts=["a", "b", ""], reward_kwargs={f"{SELF}:ConstReward": {"value": 3.0}})
    assert isinstance(rewards, WeightedReward)
    assert [r.name for r in rewards.rewards] == ["brightness", "const", "ones", "needs_model"]
    assert rewards.weights == [0.5, 2.0, 1.0, 0.25]
    x, c = _x()
    comps = rewards.components(x, c)
    torch.testing.assert_close(comps["const"], torch.full((3,), 3.0))
    torch.testing.assert_close(comps["needs_model"], torch.full((3,), 3.0))  # 3 prompts
    torch.testing.assert_close(rewards(x, c), 0.5 * BrightnessReward()(x, c) + 2.0 * 3.0 + 1.0 * 1.0 + 0.25 * 3.0)


def test_build_named_rewards_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown reward\(s\) 'rewards.aesthetics'.*built-in: brightness, needs_model, "
                                         r"ones; or an import path"):
        build_named_rewards({"brightness": 1.0, "aesthetics": 1.0}, builtins=BUILTINS)
    with pytest.raises(ValueError, match="set 'reward_models.needs_model' to a local folder"):
        build_named_rewards({"needs_model": 1.0}, builtins=BUILTINS, prompts=["a"])
    with pytest.raises(FileNotFoundError, match="'reward_models.needs_model' = .*missing.* is not a folder"):
        build_named_rewards({"needs_model": 1.0}, builtins=BUILTINS, prompts=["a"],
                            reward_models={"needs_model": tmp_path / "missing"})
    with pytest.raises(ValueError, match="needs the prompt texts"):
        build_named_rewards({"needs_model": 1.0}, builtins=BUILTINS, reward_models={"needs_model": tmp_path})
    with pytest.raises(ValueError, match="no rewards given"):
        build_named_rewards({}, builtins=BUILTINS)
    with pytest.raises(ModuleNotFoundError, match="no_such_pkg"):
        build_named_rewards({"no_such_pkg:R": 1.0}, builtins=BUILTINS)
    with pytest.raises(ValueError, match="reward_kwargs for rewards not in the weights"):
        build_named_rewards({"brightness": 1.0}, builtins=BUILTINS, reward_kwargs={f"{SELF}:ConstReward": {}})
    with pytest.raises(ValueError, match="unique"):
        build_named_rewards({"brightness": 1.0, "ddrl_engine.rewards:BrightnessReward": 1.0}, builtins=BUILTINS)
    with pytest.raises(TypeError, match="factory of built-in reward 'bad' returned a int"):
        build_named_rewards({"bad": 1.0}, builtins={"bad": _returns_int})


def _returns_int(ctx):
    return 3


def test_typos_are_reported_before_any_reward_is_built():
    built = []

    def tracking(ctx):
        built.append(ctx.name)
        return BrightnessReward()

    with pytest.raises(ValueError, match="unknown reward"):
        build_named_rewards({"brightness": 1.0, "typo": 1.0}, builtins={"brightness": tracking})
    assert built == []


def test_pickscore_factory_needs_its_folder_and_prompts(tmp_path):
    with pytest.raises(ValueError, match="reward_models.pickscore"):
        build_named_rewards({"pickscore": 1.0}, builtins={"pickscore": pickscore_factory}, prompts=["a"])
    ctx = RewardContext("pickscore", ["a"], {"pickscore": tmp_path})
    with pytest.raises(FileNotFoundError, match="no config.json"):  # the folder exists but is no CLIP folder
        pickscore_factory(ctx)


def test_pickscore_by_name_matches_the_direct_reward(tmp_path):
    pytest.importorskip("transformers")
    from ddrl_engine.rewards import PickScoreReward
    from tests.test_pickscore import PROMPTS, save_tiny_clip

    folder = str(save_tiny_clip(tmp_path / "clip"))
    rewards = build_named_rewards({"pickscore": 1.0, "brightness": 0.1}, builtins={**BUILTINS, "pickscore": pickscore_factory},
                                  reward_models={"pickscore": folder}, prompts=PROMPTS)
    x, c = torch.rand(3, 3, 32, 32) * 2 - 1, torch.tensor([0, 3, 2])
    torch.testing.assert_close(rewards.components(x, c)["pickscore"], PickScoreReward(folder, PROMPTS)(x, c))


def test_named_rewards_factory_is_picklable_and_runs_in_workers(tmp_path):
    weights = {"brightness": 0.5, f"{SELF}:ConstReward": 2.0}
    factory = functools.partial(build_named_rewards, weights, builtins=BUILTINS, reward_kwargs={f"{SELF}:ConstReward": {"value": 4.0}})
    pickle.dumps(factory)
    x, c = _x(4)
    with AsyncReward(factory, workers=1, timeout_s=60, retries=0, on_failure="raise") as rewards:
        got = rewards.evaluate(x, c)
    torch.testing.assert_close(got.total, factory()(x, c), rtol=0, atol=0)


# --- FrameAggregated ------------------------------------------------------------------------------------------


def _video(b=2, t=4):
    """Videos whose frame f of video i is the constant image (i + 1) * 0.1 * (f + 1) - 0.5 (varying in f)."""
    vals = torch.tensor([[(i + 1) * 0.1 * (f + 1) - 0.5 for f in range(t)] for i in range(b)])
    vals[1] = vals[1].flip(0)  # another frame order, so min/max/mean are not all at the same frame
    return vals.view(b, 1, t, 1, 1).expand(b, 3, t, 8, 8).clone(), vals


@pytest.mark.parametrize("reduce", ["mean", "min", "max"])
def test_frame_aggregated_reduces_over_frames(reduce):
    video, vals = _video()
    cond = torch.tensor([0, 1])
    agg = FrameAggregated(frame_index_reward, reduce)
    assert agg.name == f"pixel/frames_{reduce}"
    want = {"mean": vals.mean(1), "min": vals.amin(1), "max": vals.amax(1)}[reduce]
    torch.testing.assert_close(agg(video, cond), want)
    sub = FrameAggregated(frame_index_reward, reduce, frames=[0, -1])
    picked = vals[:, [0, 3]]
    torch.testing.assert_close(sub(video, cond), {"mean": picked.mean(1), "min": picked.amin(1), "max": picked.amax(1)}[reduce])
    assert sub.frame_indices(4) == [0, 3]


def test_frame_aggregated_passes_each_frame_its_videos_condition():
    seen = []

    class Recorder:
        name = "recorder"

        def __call__(self, samples, cond):
            seen.append((samples.shape, cond.clone()))
            return cond.float()

    video, _ = _video(b=3, t=2)
    out = FrameAggregated(Recorder(), "mean")(video, torch.tensor([5, 6, 7]))
    assert seen[0][0] == (6, 3, 8, 8) and seen[0][1].tolist() == [5, 5, 6, 6, 7, 7]
    torch.testing.assert_close(out, torch.tensor([5.0, 6.0, 7.0]))


def test_frame_aggregated_validates_inner_outputs_and_inputs():
    video, _ = _video()
    cond = torch.tensor([0, 1])

    class Bad:
        def __init__(self, out):
            self.out, self.name = out, "bad"

        def __call__(self, samples, cond):
            return self.out(samples)

    with pytest.raises(ValueError, match=r"inner reward 'bad' returned shape \(2,\) for 8 frames"):
        FrameAggregated(Bad(lambda s: torch.zeros(2)))(video, cond)
    with pytest.raises(TypeError, match="returned dtype torch.int64"):
        FrameAggregated(Bad(lambda s: torch.zeros(s.shape[0], dtype=torch.long)))(video, cond)
    with pytest.raises(TypeError, match="returned list"):
        FrameAggregated(Bad(lambda s: [0.0] * s.shape[0]))(video, cond)
    nan = FrameAggregated(Bad(lambda s: torch.where(s[:, 0, 0, 0] > 0, float("nan"), 0.0)), "min")(video, cond)
    assert torch.isnan(nan).any()  # a non-finite frame is not hidden from the outer validation
    with pytest.raises(ValueError, match=r"videos \[B, C, T, H, W\]"):
        FrameAggregated(frame_index_reward)(video[:, :, 0], cond)
    with pytest.raises(ValueError, match=r"frame indices \[4\] are out of range"):
        FrameAggregated(frame_index_reward, frames=[0, 4])(video, cond)
    with pytest.raises(ValueError, match="reduce must be one of"):
        FrameAggregated(frame_index_reward, "median")
    with pytest.raises(TypeError, match="must be a Reward"):
        FrameAggregated(plain_function)
    with pytest.raises(ValueError, match="non-empty list of ints"):
        FrameAggregated(frame_index_reward, frames=[])
    with pytest.raises(ValueError, match="leading dimension of B=2"):
        FrameAggregated(frame_index_reward)(video, torch.tensor([0, 1, 2]))


def test_frame_aggregated_factory_is_picklable():
    factory = functools.partial(frame_aggregated, functools.partial(ConstReward, 2.0, "two"), "max", [1])
    agg = pickle.loads(pickle.dumps(factory))()
    assert isinstance(agg, FrameAggregated) and agg.name == "two/frames_max"
    torch.testing.assert_close(agg(*_video()[:1], torch.tensor([0, 1])), torch.full((2,), 2.0))
