"""TOML configs: validated on load with errors naming the field; defaults round-trip; the CLI."""
import dataclasses
import json
import tomllib

import pytest

from ddrl_engine.cli import main
from ddrl_engine.trainer.config import TrainConfig, config_from_dict, defaults_as_toml, load_config


def test_defaults_round_trip_through_documented_toml():
    text = defaults_as_toml()
    assert config_from_dict(tomllib.loads(text)) == TrainConfig()
    # Every field carries its documentation line.
    assert text.count("\n# ") >= sum(1 for line in text.splitlines() if " = " in line and not line.startswith("#")) - 2


# A value other than the default in every section (and in most fields).
NON_DEFAULT = {
    "run": {"out_dir": "runs/x", "seed": 3, "steps": 7, "eval_every": 3, "ckpt_every": 0, "keep_checkpoints": 1,
            "on_invalid_reward": "drop", "early_stop_on_heldout": True, "heldout_rise_threshold": 0.2,
            "progress": False},
    "model": {"in_channels": 2, "sample_size": [4, 6], "patch_size": [2, 3], "hidden": 32, "depth": 1, "heads": 2},
    "sampler": {"name": "ddim", "num_steps": 6, "eta": 0.5, "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "beta_end": 0.012},
    "algorithm": {"method": "grpo_kl", "group_size": 4, "beta_kl": 0.1, "clip_eps": 0.2, "train_steps": [0, 2, 5],
                  "ppo_epochs": 2, "data_noise": "fresh", "logprob_reduction": "sum"},
    "optim": {"name": "sgd", "lr": 1e-3, "weight_decay": 0.01, "beta1": 0.8, "beta2": 0.99, "schedule": "cosine",
              "warmup_steps": 2, "min_lr": 1e-5, "grad_clip": 0.0, "ema_decay": 0.9, "micro_batch": 4},
    "rollout": {"conditions_per_step": 2, "recompute_old_logprobs": True, "attention_backend": "fp8"},
    "data": {"dataset": "folder", "path": "/data", "heldout_fraction": 0.1, "batch_size": 8, "synthetic": True,
             "synthetic_count": 64},
    "eval": {"samples_per_class": 3, "seed": 5, "heldout_loss_levels": 2},
    "pretrain": {"steps": 10, "batch_size": 16, "lr": 2e-3, "ema_decay": 0.9, "cache": False},
    "distributed": {"parallel": "ddp", "activation_checkpointing": True, "grad_sync": "backward"},
    "reward_workers": {"workers": 2, "timeout_s": 10.0, "retries": 0, "on_failure": "raise", "threads": 2},
    "rewards": {"brightness": 1.0, "contrast": 0.5},
}


@pytest.mark.parametrize("which", ["defaults", "non_default"])
def test_to_dict_round_trips_every_section(which):
    cfg = TrainConfig() if which == "defaults" else config_from_dict(NON_DEFAULT)
    if which == "non_default":
        for name in NON_DEFAULT:
            assert getattr(cfg, name) != getattr(TrainConfig(), name), name
    d = cfg.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert config_from_dict(d) == cfg
    assert config_from_dict(json.loads(json.dumps(d))) == cfg  # what config.json holds
    assert all(not isinstance(v, dict) for v in d["sampler"].values())  # flat


def test_packaged_demo_config_loads():
    from ddrl_engine.trainer.demo import DEMO_CONFIG

    cfg = load_config(DEMO_CONFIG)
    assert cfg.sampler.name == "rectified_flow_sde" and cfg.rewards == {"brightness": 1.0}


@pytest.mark.parametrize("data,match", [
    ({"optim": {"lrr": 1e-3}}, "unknown field 'optim.lrr'"),
    ({"trainer": {}}, "unknown section \\[trainer\\]"),
    ({"run": {"steps": "ten"}}, "'run.steps' must be an integer"),
    ({"run": {"steps": 0}}, "'run.steps' must be > 0"),
    ({"run": {"progress": 1}}, "'run.progress' must be true or false"),
    ({"sampler": {"name": "dpm"}}, "'sampler.name' must be one of"),
    ({"algorithm": {"method": "ppo"}}, "algorithm.method"),
    ({"algorithm": {"clip_eps": 2.0}}, "algorithm.clip_eps"),
    ({"model": {"hidden": 30, "heads": 4}}, "divisible by heads"),
    ({"model": {"patch_size": [3, 3]}}, "must divide"),
    ({"rewards": {}}, "at least one reward"),
    ({"rewards": {"brightness": "high"}}, "'rewards.brightness' must be a number"),
    ({"optim": {"grad_clip": -1.0}}, "'optim.grad_clip' must be >= 0"),
    ({"sampler": {"eta": 0.5}}, "unknown field 'sampler.eta' for sampler 'rectified_flow_sde'"),
    ({"optim": {"name": "lion"}}, "'optim.name' must be one of"),
])
def test_bad_fields_are_errors_naming_them(data, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict(data)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nsteps = 3")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(bad)


def test_unknown_reward_name_fails_when_built(tmp_path):
    from ddrl_engine.trainer.builders import build_rewards

    cfg = config_from_dict({"rewards": {"aesthetic": 1.0}})
    with pytest.raises(ValueError, match="unknown reward 'rewards.aesthetic'"):
        build_rewards(cfg)


def test_cli_config_and_errors(tmp_path, capsys):
    assert main(["config"]) == 0
    assert "[algorithm]" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlrr = 1.0\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown field 'optim.lrr'" in capsys.readouterr().err


def test_cuda_graph_with_fsdp_is_refused():
    from ddrl_engine.trainer.config import check_config

    with pytest.raises(ValueError, match="cuda_graph.*fsdp"):
        check_config(config_from_dict({"run": {"device": "cuda"}, "rollout": {"cuda_graph": True},
                                       "distributed": {"parallel": "fsdp"}}))


@pytest.mark.parametrize("method,want", [("ddrl", (0.01, 0.0, True)), ("grpo", (0.0, 0.0, True)),
                                         ("grpo_kl", (0.0, 0.04, True)), ("sft", (1.0, 0.0, False))])
def test_method_in_a_config_switches_its_regulariser(method, want):
    """`[algorithm] method = "grpo_kl"` alone trains GRPO+KL (not DDRL's data term without a KL)."""
    from ddrl_engine.algorithms import DDRLConfig, preset

    algo = config_from_dict({"algorithm": {"method": method}}).algorithm
    assert (algo.beta_data, algo.beta_kl, algo.use_reward) == want
    assert algo == preset(method) == DDRLConfig(method=method)
    given = config_from_dict({"algorithm": {"method": method, "beta_kl": 0.5}}).algorithm
    assert given.beta_kl == 0.5 and given.beta_data == want[0]  # a given value wins


@pytest.mark.parametrize("name", ["sd35_lora.toml", "flux_dev_lora.toml", "wan21_t2v_lora.toml"])
def test_example_pipeline_configs_load(name):
    """The README's complete TOML files for real models are valid configs (their paths are the user's)."""
    from pathlib import Path

    from ddrl_engine.trainer.config import PipelineModelConfig

    cfg = load_config(Path(__file__).resolve().parent.parent / "examples" / name)
    assert isinstance(cfg.model, PipelineModelConfig) and cfg.model.lora_rank == 32 and cfg.data.prompts
