"""Rewards by name: built-ins (factories the caller passes) and import paths ("package.module:Name").

    rewards = build_named_rewards(
        {"pickscore": 1.0, "brightness": 0.1, "my_pkg.rewards:OCRReward": 0.5},
        builtins={"brightness": brightness_factory, "pickscore": pickscore_factory},
        reward_models={"pickscore": "/models/PickScore_v1"},
        prompts=prompt_texts,
    )                                                   # -> WeightedReward, weights in that order

A built-in factory is called with one `RewardContext` (the reward's name, the prompts, the reward
model folders, the device), or with nothing if it has no parameters at all (e.g. the class
`BrightnessReward`), and returns the reward; `ctx.model_path()` gives its folder from
`reward_models`, or raises an error naming `reward_models.<name>`. Factories must be top-level
functions (or classes, functools.partials) so that the whole call can be a picklable AsyncReward
factory: `functools.partial(build_named_rewards, weights, builtins=..., reward_models=..., prompts=...)`.
`pickscore_factory` is the built-in factory of `PickScoreReward`, `clip_score_factory` and
`aesthetic_factory` those of the open_clip rewards (`rewards.clip`: an open_clip folder each).
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from .base import WeightedReward

__all__ = ["RewardContext", "aesthetic_factory", "build_named_rewards", "clip_score_factory", "is_reward", "load_reward",
           "pickscore_factory"]


def is_reward(obj: Any) -> bool:
    """True for objects following the Reward protocol: callable with a str `name`."""
    return callable(obj) and isinstance(getattr(obj, "name", None), str)


def load_reward(spec: str, **kwargs: Any):
    """The reward at import path "package.module:Name" ("Name" may be dotted: "module:Outer.attr").

    A class is instantiated with kwargs; any other object (a reward instance, a function carrying a
    `name`) is used as is, and then kwargs must be empty. Errors: ValueError (bad format),
    ModuleNotFoundError (no such module, or the module imports a missing one: both are named),
    AttributeError (no such attribute), TypeError (kwargs for a non-class; the result is not a
    reward: not callable or no str `name`).
    """
    if not isinstance(spec, str):
        raise TypeError(f"reward import path must be a str 'package.module:Name', got {type(spec).__name__}")
    module_name, sep, attr = spec.partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if not sep or not module_name or not attr or ":" in attr or any(not p.isidentifier() for p in attr.split(".")):
        raise ValueError(f"reward import path must look like 'package.module:Name', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise ModuleNotFoundError(f"reward {spec!r}: no module named {missing!r} (is it installed / on sys.path?)",
                                      name=missing) from None
        raise ModuleNotFoundError(f"reward {spec!r}: module {module_name!r} imports {missing!r}, which is not installed",
                                  name=missing) from e
    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = module_name + "".join("." + p for p in attr.split(".")[:i])
            raise AttributeError(f"reward {spec!r}: {where!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    if inspect.isclass(obj):
        try:
            reward = obj(**kwargs)
        except TypeError as e:
            raise TypeError(f"reward {spec!r}: could not instantiate {obj.__name__} with {sorted(kwargs)}: {e}") from e
    else:
        if kwargs:
            raise TypeError(f"reward {spec!r} is a {type(obj).__name__}, not a class: it is used as is and takes no "
                            f"arguments (got {sorted(kwargs)})")
        reward = obj
    if not is_reward(reward):
        what = "not callable" if not callable(reward) else "has no str `name`"
        raise TypeError(f"reward {spec!r} gives a {type(reward).__name__} that is not a reward ({what}); a reward is "
                        "callable(samples, cond) -> [B] with a str `name`")
    return reward


@dataclass
class RewardContext:
    """What a built-in reward factory gets: its `name` (the key in the weights), the prompt texts
    (cond ids index them; the last may be the empty prompt), the reward model folders by name, the device."""

    name: str
    prompts: Optional[Sequence[str]] = None
    reward_models: Mapping[str, Union[str, os.PathLike]] = field(default_factory=dict)
    device: Union[str, torch.device] = "cpu"

    def model_path(self, key: Optional[str] = None) -> str:
        """reward_models[key or name], checked to be an existing folder; errors name `reward_models.<key>`."""
        key = self.name if key is None else key
        if key not in self.reward_models or self.reward_models[key] in (None, ""):
            known = ", ".join(sorted(self.reward_models)) or "none"
            raise ValueError(f"config: reward {self.name!r} needs a model folder: set 'reward_models.{key}' to a local "
                             f"folder (reward_models given: {known})")
        path = os.fspath(self.reward_models[key])
        if not os.path.isdir(path):
            raise FileNotFoundError(f"config: 'reward_models.{key}' = {path!r} is not a folder; reward models are "
                                    "read from local folders only (nothing is downloaded)")
        return path

    def require_prompts(self) -> list[str]:
        """The prompts, or an error: this reward scores images against their prompt texts."""
        if not self.prompts:
            raise ValueError(f"config: reward {self.name!r} needs the prompt texts (prompts=), got none")
        return list(self.prompts)


def pickscore_factory(ctx: RewardContext):
    """The built-in "pickscore": PickScoreReward(reward_models["pickscore"], prompts, device=ctx.device)."""
    from .pickscore import PickScoreReward

    path = ctx.model_path()
    try:
        return PickScoreReward(path, ctx.require_prompts(), device=ctx.device, name=ctx.name)
    except (FileNotFoundError, ValueError) as e:  # the folder is the config's: name the field
        raise type(e)(f"reward_models.{ctx.name}: {e}") from e


def clip_score_factory(ctx: RewardContext):
    """The built-in "clip_score": CLIPScoreReward(prompts, path=reward_models["clip_score"]), the cosine
    similarity of CLIP image and prompt embeddings from a local open_clip folder (rewards.clip)."""
    from .clip import CLIPScoreReward

    path = ctx.model_path()
    try:
        return CLIPScoreReward(ctx.require_prompts(), path=path, device=ctx.device, name=ctx.name)
    except (FileNotFoundError, ValueError) as e:  # the folder is the config's: name the field
        raise type(e)(f"reward_models.{ctx.name}: {e}") from e


def aesthetic_factory(ctx: RewardContext):
    """The built-in "aesthetic": AestheticReward(path=reward_models["aesthetic"]), the LAION aesthetic head
    on CLIP image embeddings, from a local open_clip folder holding the head file too (rewards.clip)."""
    from .clip import AestheticReward

    path = ctx.model_path()
    try:
        return AestheticReward(path=path, device=ctx.device, name=ctx.name)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"reward_models.{ctx.name}: {e}") from e


def _call_factory(factory: Callable, ctx: RewardContext):
    """factory(ctx), or factory() when it has no parameters at all (e.g. a reward class like
    BrightnessReward). A factory with parameters always gets the context as its one argument."""
    try:
        takes_nothing = not inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no introspectable signature: assume it takes the context
        takes_nothing = False
    return factory() if takes_nothing else factory(ctx)


def build_named_rewards(weights: Mapping[str, float], *, builtins: Mapping[str, Callable[[RewardContext], Any]],
                        reward_models: Optional[Mapping[str, Union[str, os.PathLike]]] = None,
                        prompts: Optional[Sequence[str]] = None, device: Union[str, torch.device] = "cpu",
                        reward_kwargs: Optional[Mapping[str, Mapping[str, Any]]] = None) -> WeightedReward:
    """A WeightedReward of the rewards named in `weights` ({name: weight}, in that order).

    Names in `builtins` are built by their factory, called with a RewardContext. Names containing
    ":" are import paths loaded by `load_reward(name, **reward_kwargs.get(name, {}))`. Any other name
    is an error listing the known ones. All names are checked before any reward is built, so a typo
    is reported before a reward model loads.
    """
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("config: no rewards given ([rewards] must name at least one reward with its weight)")
    reward_models = dict(reward_models or {})
    reward_kwargs = dict(reward_kwargs or {})
    unknown = [n for n in weights if n not in builtins and ":" not in n]
    if unknown:
        known = ", ".join(sorted(builtins)) or "none"
        raise ValueError(f"config: unknown reward(s) {', '.join(repr('rewards.' + n) for n in unknown)} (built-in: "
                         f"{known}; or an import path 'package.module:Name')")
    stray = [k for k in reward_kwargs if k not in weights]
    if stray:
        raise ValueError(f"config: reward_kwargs for rewards not in the weights: {stray}")
    rewards = []
    for name in weights:
        if name in builtins:
            if name in reward_kwargs:
                raise ValueError(f"config: reward_kwargs are for import-path rewards, not the built-in {name!r}")
            reward = _call_factory(builtins[name], RewardContext(name, prompts, reward_models, device))
            if not is_reward(reward):
                raise TypeError(f"config: the factory of built-in reward {name!r} returned a {type(reward).__name__}, "
                                "not a reward (callable with a str `name`)")
        else:
            reward = load_reward(name, **dict(reward_kwargs.get(name, {})))
        rewards.append(reward)
    return WeightedReward(rewards, [float(w) for w in weights.values()])
