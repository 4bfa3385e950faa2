"""The peers' recipes as presets: Flow-GRPO, DanceGRPO and cosmos-rl's DDRL (docs/porting.md).

A recipe is one table of [algorithm], [sampler] and [rollout] values, read from the peer's public
default configuration (each `source` names the repository, file and commit read). `RECIPES` is the one
place they live; three consumers read it:

- `ddrl_engine.algorithms.preset(name)`: the recipe's DDRLConfig (its `method` is the underlying method,
  its `recipe` the name);
- the TOML loader (`expand_recipe`, called by `trainer.config.config_from_dict`): a top-level
  `recipe = "flow_grpo"`, or `[algorithm] method = "flow_grpo"`, fills every [algorithm], [sampler] and
  [rollout] field the file does not set, so the saved config.json holds the expanded values;
- `Recipe.resolve(num_steps)`: plain dicts for Python users (`make_sampler(**r.sampler)`).

Values that depend on the number of sampling steps K (the schedule, the trained steps) are `PerSteps`
entries, evaluated at the file's `[sampler] num_steps` (or the recipe's own).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class PerSteps:
    """A recipe value that depends on the sampler's num_steps K: `fn(K)`; `doc` says how (docs, repr)."""

    fn: Callable[[int], Any]
    doc: str

    def __call__(self, num_steps: int):
        return self.fn(num_steps)

    def __repr__(self) -> str:
        return f"PerSteps({self.doc})"


def flow_match_sigmas(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> list[float]:
    """The K + 1 levels diffusers' FlowMatchEulerDiscreteScheduler(shift=shift) holds in `sigmas` after
    `set_timesteps(K)` (static shift, no dynamic shifting), as Python floats of its float32 values.

    The training table is t_i = i / T, i = T..1, shifted s(t) = shift t / (1 + (shift - 1) t) in float32;
    set_timesteps spaces K values evenly from its first to its last entry (in float64), shifts them
    again, rounds to float32 and appends the final 0. SD3 / SD3.5 use shift 3: for K = 10 the levels end
    ..., 0.2780, 0.0089, 0.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"flow_match_sigmas: 'num_steps' must be an int >= 1, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"flow_match_sigmas: 'shift' must be > 0, got {shift!r}")
    n = num_train_timesteps
    train = torch.arange(n, 0, -1, dtype=torch.float32) / n
    train = shift * train / (1 + (shift - 1) * train)
    hi, lo = float(train[0]), float(train[-1])
    u = torch.linspace(hi * n, lo * n, num_steps, dtype=torch.float64) / n
    levels = (shift * u / (1 + (shift - 1) * u)).float()
    return levels.tolist() + [0.0]


def shifted_levels(num_steps: int, shift: float) -> list[float]:
    """The K + 1 levels t_k = s(1 - k/K), s(t) = shift t / (1 + (shift - 1) t), in float64: those of
    RectifiedFlowSDE(num_steps=K, shift=shift) (and of DanceGRPO's sigma schedule)."""
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).tolist()


def constant_diffusion_noise_levels(eta: float, levels: list[float]) -> list[float]:
    """Per-step noise_level values a_k that make RectifiedFlowSDE's std_t = a_k sqrt(t_k / (1 - t_k)) equal
    the constant eta, i.e. a step std of eta sqrt(|dt_k|) (DanceGRPO's flux_step with sde_solver):
    a_k = eta sqrt((1 - t_k) / t_k), with 1 - t_1 in place of 1 - t_0 at t_0 = 1 (as the sampler does).

    levels: the K + 1 levels t_0 > ... > t_K = 0 of the sampler."""
    if not eta > 0:
        raise ValueError(f"constant_diffusion_noise_levels: 'eta' must be > 0, got {eta!r}")
    if len(levels) < 2:
        raise ValueError("constant_diffusion_noise_levels: 'levels' needs at least 2 values (one step)")
    out = []
    for k in range(len(levels) - 1):
        t = levels[k]
        den = 1 - levels[1] if t >= 1 else 1 - t
        out.append(eta * math.sqrt(den / t))
    return out


def _cosmos_churn(num_steps: int) -> float:
    # The sampler's own formula (one implementation): min(S_churn / (K + 1), sqrt(1.2) - 1).
    from ddrl_engine.sampling.edm_2ab import cosmos_churn

    return cosmos_churn(COSMOS_S_CHURN, num_steps)


@dataclass(frozen=True)
class ResolvedRecipe:
    """A recipe at a given num_steps: plain [algorithm] (with method and recipe), [sampler] (with name and
    num_steps) and [rollout] values."""

    name: str
    algorithm: dict
    sampler: dict
    rollout: dict


@dataclass(frozen=True)
class Recipe:
    """One peer's recipe. name: its key in RECIPES (what algorithm.recipe records). algorithm / sampler /
    rollout: field -> value (a `PerSteps` for K-dependent ones); algorithm["method"] is the underlying
    method, sampler["num_steps"] the recipe's own K. source: the public files (repository, path, commit)
    the values were read from. notes: what the recipe cannot reproduce (docs/porting.md has the full
    tables)."""

    name: str
    algorithm: dict
    sampler: dict
    rollout: dict
    source: str
    notes: str = ""

    @property
    def method(self) -> str:
        return self.algorithm["method"]

    @property
    def num_steps(self) -> int:
        return self.sampler["num_steps"]

    def resolve(self, num_steps: int | None = None) -> ResolvedRecipe:
        """The values at `num_steps` sampling steps (default: the recipe's own); algorithm["recipe"] is
        the recipe's name."""
        k = self.num_steps if num_steps is None else num_steps
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"recipe {self.name!r}: 'num_steps' must be an int >= 1, got {k!r}")

        def values(table: dict) -> dict:
            return {key: (v(k) if isinstance(v, PerSteps) else _copy(v)) for key, v in table.items()}

        sampler = values(self.sampler)
        sampler["num_steps"] = k
        algorithm = values(self.algorithm)
        algorithm["recipe"] = self.name
        return ResolvedRecipe(self.name, algorithm, sampler, values(self.rollout))


def _copy(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _first_steps(fraction: float) -> PerSteps:
    return PerSteps(lambda k: list(range(max(1, int(k * fraction)))),
                    f"steps 0..int(K * {fraction}) - 1")


FLOW_GRPO_SHIFT = 3.0
DANCE_GRPO_SHIFT = 3.0
DANCE_GRPO_ETA = 0.3
COSMOS_S_CHURN = 1.0

_RECIPES = (
    # Flow-GRPO on SD3.5-Medium with PickScore: config/grpo.py:pickscore_sd3 over config/base.py.
    Recipe(
        name="flow_grpo",
        algorithm=dict(
            method="grpo_kl",
            beta_kl=0.01,             # train.beta (pickscore_sd3; geneval_sd3 / general_ocr_sd3 use 0.04)
            beta_data=0.0,
            kl_form="flow_grpo",      # its KL divides by 2 std_dev_t^2 without |dt|
            group_size=24,            # sample.num_image_per_prompt
            clip_eps=1e-4,            # train.clip_range (base)
            adv_clip=5.0,             # train.adv_clip_max (base)
            adv_eps=1e-4,             # PerPromptStatTracker: std + 1e-4
            adv_std="population",     # np.std
            train_steps=_first_steps(0.99),  # train.timestep_fraction 0.99: int(K * 0.99) first steps
            ppo_epochs=1,             # train.num_inner_epochs
            logprob_reduction="mean",  # log_prob.mean over all but the batch dimension
        ),
        sampler=dict(
            name="rectified_flow_sde",
            num_steps=10,             # sample.num_steps
            noise_level=0.7,          # sample.noise_level (base)
            sigmas=PerSteps(lambda k: flow_match_sigmas(k, FLOW_GRPO_SHIFT),
                            "FlowMatchEulerDiscreteScheduler(shift=3).set_timesteps(K).sigmas"),
        ),
        rollout=dict(guidance_scale=4.5),  # sample.guidance_scale; train.cfg = True (training is guided too)
        source=("yifan123/flow_grpo: config/grpo.py (pickscore_sd3) and config/base.py at commit 54809b5f; "
                "scripts/train_sd3.py (kl_loss, timestep_fraction) at 1f4ca40d; "
                "flow_grpo/diffusers_patch/sd3_sde_with_logprob.py (sde_step_with_logprob) at 54809b5f; "
                "flow_grpo/stat_tracking.py at 94e23ee5"),
        notes=("sample.global_std = True (std over the whole gathered batch, not the group) is not "
               "reproduced: advantages use the group's std. Flow-GRPO takes 2 optimizer steps per epoch "
               "(gradient_accumulation_steps = num_batches_per_epoch // 2); the engine takes one per batch."),
    ),
    # DanceGRPO on FLUX.1-dev with HPSv2: scripts/finetune/finetune_flux_grpo.sh + fastvideo/train_grpo_flux.py.
    Recipe(
        name="dance_grpo",
        algorithm=dict(
            method="grpo",            # no KL term in train_grpo_flux.py
            beta_kl=0.0,
            beta_data=0.0,
            group_size=12,            # --num_generations 12 (--use_group)
            clip_eps=1e-4,            # --clip_range 1e-4
            adv_clip=5.0,             # --adv_clip_max 5.0
            adv_eps=1e-8,             # group_std = std() + 1e-8
            adv_std="unbiased",       # torch.Tensor.std (Bessel's correction)
            train_steps=PerSteps(lambda k: list(range(max(1, k - 1))),
                                 "steps 0..K-2 (the last step is dropped)"),
            ppo_epochs=1,
            logprob_reduction="mean",
        ),
        sampler=dict(
            name="rectified_flow_sde",
            num_steps=16,             # --sampling_steps 16
            shift=DANCE_GRPO_SHIFT,   # --shift 3 (sd3_time_shift of linspace(1, 0, K + 1))
            noise_level=PerSteps(
                lambda k: constant_diffusion_noise_levels(DANCE_GRPO_ETA, shifted_levels(k, DANCE_GRPO_SHIFT)),
                "a_k = 0.3 sqrt((1 - t_k) / t_k): std_t = eta = 0.3 (--eta 0.3)"),
        ),
        rollout=dict(guidance_scale=1.0),  # --cfg 0.0 (FLUX.1-dev's distilled guidance 3.5 is model.guidance)
        source=("XueZeyue/DanceGRPO: scripts/finetune/finetune_flux_grpo.sh and fastvideo/train_grpo_flux.py "
                "(flux_step, train_one_step) at commit 22b85efe"),
        notes=("DanceGRPO trains int(0.6 * (K - 1)) = 9 of the first K - 1 steps, drawn at random per sample "
               "(--timestep_fraction 0.6); the engine trains all K - 1 (the same expected loss, at 15/9 the cost). "
               "--init_same_noise (one initial noise for the whole batch) is not reproduced."),
    ),
    # cosmos-rl's DDRL on Cosmos-Predict2.5-2B:
    # configs/cosmos-predict2-5/cosmos-predict2-5-2b-720-reason-embedding-ddrl.toml over RLConfig's defaults.
    Recipe(
        name="cosmos_ddrl",
        algorithm=dict(
            method="ddrl",
            beta_data=0.01,           # model.rl.data_beta
            beta_kl=0.0,              # model.rl.kl_beta
            group_size=8,             # model.rl.num_rollout
            clip_eps=1e-4,            # model.rl.clip_ratio
            adv_clip=5.0,             # reward_config.adv_clip_max / adv_clip_min = -5
            adv_eps=1e-4,             # (r - mean) / (std + 1e-4)
            adv_std="unbiased",       # torch.Tensor.std over the rollout group
            adv_lambda=False,         # model.rl.exp_reward
            train_steps="every_other",  # model.rl.train_on = [0, 2, ..., 18]
            ppo_epochs=1,
            data_noise="rollout",     # model.rl.use_rl_sigma_and_noise
            data_loss_steps="all",    # model.rl.data_on_first_only = false
            data_weighting="edm",     # get_per_sigma_loss_weights, sigma_data = 1
            logprob_form="cosmos",    # log_prob_ratio = -(diff_current - diff_old), element mean
            logprob_reduction="mean",
            loss_scale=10.0,          # model.loss_scale (the RL loss is returned times it)
        ),
        sampler=dict(
            name="edm_2ab",           # model.rl.solver_option "2ab" (second-order multistep)
            num_steps=20,             # model.rl.sample_steps
            churn=PerSteps(_cosmos_churn, "eta = min(s_churn / (K + 1), sqrt(1.2) - 1), s_churn = 1 (model.rl.s_churn)"),
            s_noise=1.0,              # model.rl.s_noise
            sigma_min=0.01,           # model.sde.sigma_min
            sigma_max=200.0,          # model.sde.sigma_max
            rho=7.0,                  # Sampler.forward's rho
        ),
        rollout=dict(guidance_scale=1.0),  # model.rl.guidance = 0: x0 = cond + 0 (cond - uncond)
        source=("nvidia-cosmos/cosmos-rl: configs/cosmos-predict2-5/cosmos-predict2-5-2b-720-reason-embedding-ddrl.toml "
                "at commit 28dade9c; cosmos_rl/policy/config/wfm/__init__.py (RLConfig, SDEConfig, ModelConfig) at "
                "0652aae0; cosmos_rl/policy/trainer/wfm_trainer.py (rl_training_step) and "
                "cosmos_rl/policy/model/wfm/models/t2v_model.py (get_per_sigma_loss_weights, "
                "_sync_rewards_across_rollouts) at 08eadadc; cosmos_rl/rollout/wfm_rollout/wfm_rollout.py and "
                "cosmos_rl/policy/model/wfm/sampler/__init__.py (cosmos-rl 0.3.9)"),
        notes=("The optimizer (lr 1e-5, weight decay 1e-4, betas (0.9, 0.99), power EMA rate 0.1) is [optim]'s, "
               "not the recipe's. Invalid rewards are replaced by the group mean there, masked here. The "
               "sampler's departures from Cosmos's solver (its last level, its start) are edm_2ab's docstring."),
    ),
)
RECIPES: dict[str, Recipe] = {r.name: r for r in _RECIPES}
"""The recipes by name: "flow_grpo", "dance_grpo", "cosmos_ddrl"."""
RECIPE_NAMES = tuple(RECIPES)


def recipe(name: str) -> Recipe:
    """The recipe called `name` (ValueError listing the recipes otherwise)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; the recipes are {RECIPE_NAMES}")
    return RECIPES[name]


SWITCHES = ("beta_data", "beta_kl", "use_reward")  # the fields a method sets where they are not given
LEVEL_FIELDS = ("sigmas", "shift")  # a rectified-flow sampler's levels: the file's replace the recipe's


def expand_recipe(data: dict) -> dict:
    """A config dict (TOML or config.json) with its recipe expanded (a new dict; the input is not modified).

    The recipe is named by a top-level `recipe = "name"`, by `[algorithm] method = "name"` (an alias: the
    method becomes the recipe's own) or by `[algorithm] recipe = "name"` (what config.json records);
    naming two different recipes is an error. Every [algorithm], [sampler] and [rollout] field the file
    does not set is filled from the recipe at the file's [sampler] num_steps (or the recipe's), and
    `algorithm.recipe` records the name. Explicit values win, and a recipe value that would contradict
    one is left out:
      * a [sampler] of another `name` gets only num_steps from the recipe (the other fields are that
        sampler's own);
      * levels given in the file (`sigmas`, `shift`, or `schedule` other than "engine", e.g. a
        pipeline's "diffusers") replace the recipe's `sigmas` and `shift`;
      * a `[sampler] sde_window` replaces the recipe's `train_steps` (the window's steps are trained);
      * an explicit `method` other than the recipe's keeps that method's regulariser switches
        (beta_data, beta_kl, use_reward) instead of the recipe's.
    A config without a recipe comes back unchanged.
    """
    data = dict(data)
    named = {}
    top = data.pop("recipe", None)
    if top is not None:
        named["'recipe' (top level)"] = top
    algo = data.get("algorithm", {})
    if not isinstance(algo, dict):
        return data  # the loader reports the malformed section
    method = algo.get("method")
    if isinstance(method, str) and method in RECIPES:
        named["'algorithm.method'"] = method
    given = algo.get("recipe")
    if given not in (None, ""):
        named["'algorithm.recipe'"] = given
    for where, name in named.items():
        if not isinstance(name, str) or name not in RECIPES:
            raise ValueError(f"config: {where} must name a recipe, one of {RECIPE_NAMES}, got {name!r}")
    if not named:
        return data
    names = set(named.values())
    if len(names) > 1:
        raise ValueError("config: two different recipes are named: "
                         + ", ".join(f"{w} = {n!r}" for w, n in named.items()))
    (name,) = names
    r = RECIPES[name]
    sampler = data.get("sampler", {})
    rollout = data.get("rollout", {})
    if not isinstance(sampler, dict) or not isinstance(rollout, dict):
        return data
    k = sampler.get("num_steps", r.num_steps)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        k = r.num_steps  # a bad value is the loader's to report; resolve at the recipe's own K
    resolved = r.resolve(k)

    algo = dict(algo)
    if algo.get("method") == name:
        algo["method"] = r.method
    own_method = algo.get("method", r.method) == r.method
    windowed = isinstance(sampler, dict) and sampler.get("sde_window") is not None
    for key, value in resolved.algorithm.items():
        if key in algo or (not own_method and key in SWITCHES) or (windowed and key == "train_steps"):
            continue
        algo[key] = value
    algo["recipe"] = name

    sampler = dict(sampler)
    same = sampler.get("name", resolved.sampler["name"]) == resolved.sampler["name"]
    own_levels = any(k in sampler for k in LEVEL_FIELDS) or sampler.get("schedule", "engine") != "engine"
    for key, value in resolved.sampler.items():
        if key in sampler or not (same or key == "num_steps") or (own_levels and key in LEVEL_FIELDS):
            continue
        sampler[key] = value

    rollout = dict(rollout)
    for key, value in resolved.rollout.items():
        rollout.setdefault(key, value)
    data.update(algorithm=algo, sampler=sampler, rollout=rollout)
    return data
