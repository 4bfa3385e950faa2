"""TOML configs: validated on load with errors naming the field; defaults round-trip; the CLI."""
import tomllib

import pytest

from ddrl_engine.cli import main
from ddrl_engine.trainer.config import TrainConfig, config_from_dict, defaults_as_toml, load_config


def test_defaults_round_trip_through_documented_toml():
    text = defaults_as_toml()
    assert config_from_dict(tomllib.loads(text)) == TrainConfig()
    # Every field carries its documentation line.
    assert text.count("\n# ") >= sum(1 for line in text.splitlines() if " = " in line and not line.startswith("#")) - 2


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
    from ddrl_engine.trainer.builders import build_dataset, build_rewards

    cfg = config_from_dict({"rewards": {"aesthetic": 1.0}})
    with pytest.raises(ValueError, match="unknown reward 'rewards.aesthetic'"):
        build_rewards(cfg, build_dataset(cfg))


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
