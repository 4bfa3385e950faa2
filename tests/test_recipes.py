"""The peers' recipes as presets (ddrl_engine.algorithms.RECIPES): their numbers against the peers' public
configurations as read (docs/porting.md) and float64 derivations written here; the TOML expansion
(explicit values win, config.json records the expanded values); a Trainer step on each.

The reference numbers:
- Flow-GRPO pickscore_sd3 (config/grpo.py, config/base.py): 10 steps, noise_level 0.7, guidance 4.5,
  24 images per prompt, beta 0.01, clip_range 1e-4, adv_clip_max 5, timestep_fraction 0.99; levels from
  diffusers' FlowMatchEulerDiscreteScheduler(shift=3).set_timesteps(10): ..., 0.2780, 0.0089, 0.
- DanceGRPO FLUX (finetune_flux_grpo.sh): 16 steps, shift 3, eta 0.3 (std = eta sqrt(dt), flux_step),
  12 generations, clip 1e-4, adv_clip 5, group std unbiased + 1e-8, no KL, the last step not trained.
- cosmos-rl DDRL (cosmos-predict2-5-2b-720-reason-embedding-ddrl.toml over RLConfig): "2ab", 20 steps,
  train_on every other step, num_rollout 8, data_beta 0.01, kl_beta 0, clip_ratio 1e-4, adv clip 5,
  s_churn 1 (eta = min(1 / 21, sqrt(1.2) - 1)), sigma 200 .. 0.01, guidance 0, loss_scale 10.
"""
import json
import math
import tomllib
from pathlib import Path

import pytest
import torch

from ddrl_engine.algorithms import RECIPE_NAMES, RECIPES, DDRLConfig, expand_recipe, flow_match_sigmas, preset
from ddrl_engine.algorithms import with_method
from ddrl_engine.sampling import EDM2AB, RectifiedFlowSDE, make_sampler
from ddrl_engine.trainer.config import config_from_dict, load_config

ROOT = Path(__file__).resolve().parent.parent


def recipe_sampler(name, num_steps=None):
    return make_sampler(**RECIPES[name].resolve(num_steps).sampler)


def _shifted(u, shift):
    return shift * u / (1 + (shift - 1) * u)


# ---- the presets --------------------------------------------------------------------------------

def test_presets_name_their_method_and_recipe():
    fg, dg, cd = preset("flow_grpo"), preset("dance_grpo"), preset("cosmos_ddrl")
    assert (fg.method, fg.recipe, fg.kl_form, fg.adv_std) == ("grpo_kl", "flow_grpo", "flow_grpo", "population")
    assert (fg.beta_kl, fg.beta_data, fg.group_size, fg.clip_eps, fg.adv_clip) == (0.01, 0.0, 24, 1e-4, 5.0)
    assert fg.train_steps == list(range(9))  # int(10 * 0.99) = 9 first steps
    assert (dg.method, dg.recipe, dg.beta_kl, dg.beta_data, dg.adv_std, dg.adv_eps) == \
        ("grpo", "dance_grpo", 0.0, 0.0, "unbiased", 1e-8)
    assert (dg.group_size, dg.clip_eps, dg.adv_clip, dg.train_steps) == (12, 1e-4, 5.0, list(range(15)))
    assert (cd.method, cd.recipe, cd.beta_data, cd.beta_kl, cd.group_size) == ("ddrl", "cosmos_ddrl", 0.01, 0.0, 8)
    assert (cd.data_weighting, cd.logprob_form, cd.adv_std, cd.loss_scale) == ("edm", "cosmos", "unbiased", 10.0)
    assert cd.train_steps == "every_other" and cd.trained_steps(20) == list(range(0, 20, 2))  # train_on
    assert (cd.clip_eps, cd.adv_clip, cd.adv_eps, cd.data_noise, cd.data_loss_steps) == \
        (1e-4, 5.0, 1e-4, "rollout", "all")
    for name in RECIPE_NAMES:  # a recipe's preset is an ordinary, valid DDRLConfig
        assert DDRLConfig(**preset(name).__dict__) == preset(name)


def test_preset_overrides_and_num_steps():
    assert preset("flow_grpo", beta_kl=0.04).beta_kl == 0.04  # Flow-GRPO's geneval / ocr value
    assert preset("flow_grpo", num_steps=20).train_steps == list(range(19))  # int(20 * 0.99)
    assert preset("dance_grpo", num_steps=8).train_steps == list(range(7))
    other = preset("flow_grpo", method="grpo")  # another method: its own switches, the recipe's forms
    assert (other.method, other.beta_kl, other.kl_form, other.recipe) == ("grpo", 0.0, "flow_grpo", "flow_grpo")
    with pytest.raises(ValueError, match="'num_steps' only applies to a recipe"):
        preset("ddrl", num_steps=10)
    with pytest.raises(ValueError, match="or a recipe"):
        preset("flowgrpo")
    switched = with_method(preset("grpo", group_size=4, clip_eps=0.3), "cosmos_ddrl")
    assert (switched.recipe, switched.logprob_form, switched.group_size, switched.clip_eps) == \
        ("cosmos_ddrl", "cosmos", 8, 1e-4)  # the recipe's own fields come from the recipe
    back = with_method(preset("cosmos_ddrl"), "grpo")
    assert back.recipe == "" and back.method == "grpo" and back.beta_data == 0.0


def test_recipes_cite_their_sources():
    repos = {"flow_grpo": "yifan123/flow_grpo", "dance_grpo": "XueZeyue/DanceGRPO", "cosmos_ddrl": "nvidia-cosmos/cosmos-rl"}
    for name, r in RECIPES.items():
        assert repos[name] in r.source and "commit" in r.source, name


# ---- Flow-GRPO: the levels are diffusers' set_timesteps sigmas ------------------------------------

def test_flow_grpo_levels_hand_checked():
    """SD3's shift 3, 10 steps, T = 1000: set_timesteps spaces 10 values from 1 to s(1/1000) and shifts
    them again (float64 here), then appends 0."""
    levels = [float(v) for v in recipe_sampler("flow_grpo").network_levels] + [0.0]
    assert [round(v, 4) for v in levels[-3:]] == [0.2780, 0.0089, 0.0]
    lo = _shifted(1 / 1000, 3.0)
    want = [_shifted(1 + i / 9 * (lo - 1), 3.0) for i in range(10)] + [0.0]
    assert levels == pytest.approx(want, abs=1e-7)
    assert recipe_sampler("flow_grpo").noise_level == 0.7


@pytest.mark.parametrize("num_steps", [1, 4, 10, 16, 40])
def test_flow_grpo_levels_equal_diffusers_set_timesteps(num_steps):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency")
    from ddrl_engine.sampling import from_diffusers

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = recipe_sampler("flow_grpo", num_steps)
    theirs = scheduler.__class__(shift=3.0)
    theirs.set_timesteps(num_steps)
    levels = torch.stack([ours.network_level(k) for k in range(num_steps + 1)])
    assert torch.equal(levels, theirs.sigmas.float())  # bitwise: the float32 values diffusers holds
    assert flow_match_sigmas(num_steps, 3.0) == theirs.sigmas.tolist()
    built = from_diffusers(scheduler, num_steps)  # the engine's own diffusers path: the same sampler
    for k in range(num_steps):
        assert torch.equal(built.coefs(k).std, ours.coefs(k).std) and torch.equal(built.coefs(k).x_coef, ours.coefs(k).x_coef)


# ---- DanceGRPO: a constant diffusion coefficient ----------------------------------------------------

@pytest.mark.parametrize("num_steps", [16, 5])
def test_dance_grpo_step_is_flux_step_with_eta(seed, num_steps):
    """DanceGRPO's flux_step (sde_solver) in float64: mean = x + dsigma v + dsigma (-eta^2 / 2) score,
    score = -(x - (1 - sigma) x0_hat) / sigma^2, x0_hat = x - sigma v; std = eta sqrt(-dsigma), on
    sigmas sd3_time_shift(3, linspace(1, 0, K + 1))."""
    eta = 0.3
    sampler = recipe_sampler("dance_grpo", num_steps)
    sig = [_shifted(1 - i / num_steps, 3.0) for i in range(num_steps + 1)]
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    v = torch.randn(2, 3, 4, dtype=torch.float64)
    for k in range(num_steps):
        s, ds = sig[k], sig[k + 1] - sig[k]
        x0_hat = x - s * v
        score = -(x - x0_hat * (1 - s)) / s ** 2
        mean = x + ds * v + (-0.5 * eta ** 2 * score) * ds
        c = sampler.coefs(k)
        ours = c.x_coef.double() * x + c.out_coef.double() * v
        torch.testing.assert_close(ours, mean, atol=1e-6, rtol=1e-6)
        assert float(c.std) == pytest.approx(eta * math.sqrt(-ds), rel=1e-6), k
        assert float(sampler.network_level(k)) == pytest.approx(s, abs=1e-7)


# ---- cosmos-rl: its 2ab sampler ---------------------------------------------------------------------

def test_cosmos_ddrl_sampler():
    sampler = recipe_sampler("cosmos_ddrl")
    assert isinstance(sampler, EDM2AB) and sampler.num_steps == 20
    assert sampler.churn == pytest.approx(1 / 21) and sampler.churn < math.sqrt(1.2) - 1
    assert (sampler.sigma_min, sampler.sigma_max, sampler.rho, sampler.s_noise) == (0.01, 200.0, 7.0, 1.0)
    assert recipe_sampler("cosmos_ddrl", 10).churn == pytest.approx(1 / 11)  # RLConfig's default sample_steps
    assert recipe_sampler("cosmos_ddrl", 4).churn == pytest.approx(math.sqrt(1.2) - 1)  # 1/5 is over the cap
    assert RECIPES["cosmos_ddrl"].resolve().rollout == {"guidance_scale": 1.0}


# ---- the TOML expansion -----------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["top", "alias", "field"])
@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_a_recipe_fills_every_unset_field(name, how):
    data = {"top": {"recipe": name}, "alias": {"algorithm": {"method": name}},
            "field": {"algorithm": {"recipe": name}}}[how]
    cfg = config_from_dict(data)
    r = RECIPES[name].resolve()
    assert cfg.algorithm == preset(name)
    assert cfg.sampler.to_dict() == {**make_sampler_config(r.sampler)}
    assert cfg.rollout.guidance_scale == r.rollout["guidance_scale"]


def make_sampler_config(values):
    from ddrl_engine.trainer.config import SamplerConfig

    return SamplerConfig(**values).to_dict()


def test_explicit_values_win_and_steps_follow_num_steps():
    cfg = config_from_dict({"recipe": "flow_grpo", "algorithm": {"beta_kl": 0.04, "group_size": 6},
                            "sampler": {"num_steps": 6}, "rollout": {"guidance_scale": 1.0}})
    assert (cfg.algorithm.beta_kl, cfg.algorithm.group_size, cfg.rollout.guidance_scale) == (0.04, 6, 1.0)
    assert cfg.algorithm.train_steps == list(range(5))  # int(6 * 0.99)
    assert list(cfg.sampler.sigmas) == flow_match_sigmas(6, 3.0)
    assert cfg.algorithm.kl_form == "flow_grpo" and cfg.algorithm.recipe == "flow_grpo"
    dance = config_from_dict({"recipe": "dance_grpo", "sampler": {"num_steps": 6}})
    assert len(dance.sampler.noise_level) == 6 and dance.algorithm.train_steps == list(range(5))
    own = config_from_dict({"recipe": "flow_grpo", "sampler": {"shift": 3.0}})  # own levels: no recipe sigmas
    assert own.sampler.sigmas is None and own.sampler.shift == 3.0
    windowed = config_from_dict({"recipe": "flow_grpo", "sampler": {"sde_window": [0, 3]}})
    assert windowed.algorithm.train_steps == "every_other"  # the window's steps are trained, not the recipe's


def test_another_sampler_or_method_keeps_its_own_fields():
    cfg = config_from_dict({"recipe": "dance_grpo", "sampler": {"name": "rectified_flow_cps"}})
    assert cfg.sampler.name == "rectified_flow_cps" and cfg.sampler.num_steps == 16  # only num_steps
    assert cfg.algorithm.adv_std == "unbiased"
    ddrl = config_from_dict({"recipe": "flow_grpo", "algorithm": {"method": "ddrl"}})
    assert (ddrl.algorithm.method, ddrl.algorithm.beta_data, ddrl.algorithm.beta_kl) == ("ddrl", 0.01, 0.0)
    assert ddrl.algorithm.group_size == 24 and ddrl.algorithm.recipe == "flow_grpo"


def test_recipe_errors_name_the_field():
    with pytest.raises(ValueError, match=r"'recipe' \(top level\) must name a recipe.*'flowgrpo'"):
        config_from_dict({"recipe": "flowgrpo"})
    with pytest.raises(ValueError, match="two different recipes"):
        config_from_dict({"recipe": "flow_grpo", "algorithm": {"method": "dance_grpo"}})
    with pytest.raises(ValueError, match=r"config: algorithm\.kl_form = 'flow_grpo'"):
        config_from_dict({"recipe": "flow_grpo", "sampler": {"name": "ddim"}})
    with pytest.raises(ValueError, match=r"'sampler.num_steps' must be an integer"):
        config_from_dict({"recipe": "flow_grpo", "sampler": {"num_steps": "ten"}})
    assert expand_recipe({"run": {"seed": 1}}) == {"run": {"seed": 1}}  # no recipe: unchanged


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_config_json_records_the_expanded_values(name, tmp_path):
    cfg = config_from_dict({"recipe": name})
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert saved["algorithm"]["recipe"] == name and saved["algorithm"]["method"] == RECIPES[name].method
    resolved = RECIPES[name].resolve()
    for key, value in resolved.sampler.items():
        got = saved["sampler"][key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == value, key
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert load_config(tmp_path / "config.json") == cfg


def test_a_toml_file_with_a_recipe(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('recipe = "dance_grpo"\n[algorithm]\ngroup_size = 4\n[sampler]\nnum_steps = 4\n')
    cfg = load_config(path)
    assert (cfg.algorithm.recipe, cfg.algorithm.group_size, cfg.algorithm.adv_eps) == ("dance_grpo", 4, 1e-8)
    assert cfg.sampler.shift == 3.0 and len(cfg.sampler.noise_level) == 4
    assert tomllib.loads(path.read_text())["recipe"] == "dance_grpo"


# ---- each recipe trains ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_each_recipe_takes_a_training_step(name, tmp_path):
    from tests.trainer_helpers import TINY_TOML, make_trainer

    data = tomllib.loads(TINY_TOML)
    data["recipe"] = name
    data["algorithm"] = {"group_size": 4}  # a tiny group; the recipe's clip range
    data["run"].update(out_dir=str(tmp_path), progress=False)
    cfg = config_from_dict(data)
    trainer = make_trainer(cfg)
    m = trainer.train_step()
    assert math.isfinite(m["grad_norm"]) and m["ratio_dev_first"] == 0.0
    assert (trainer.forms.kl_scale is not None) == (name == "flow_grpo")
    assert (trainer.forms.log_ratio_scale is not None) == (name == "cosmos_ddrl")


def test_porting_doc_has_a_table_per_peer():
    text = (ROOT / "docs" / "porting.md").read_text()
    for peer in ("Flow-GRPO", "DanceGRPO", "DDPO", "cosmos-rl"):
        assert f"## {peer}" in text, peer
    for name in RECIPE_NAMES:
        assert f'"{name}"' in text, name
    assert text.count("\n| ") > 60  # the tables
