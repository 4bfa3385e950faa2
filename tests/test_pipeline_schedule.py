"""[sampler] schedule = "diffusers": the pipeline folder's own scheduler gives the sampler's levels.

The levels (`network_level(k)`, k = 0..K) must be exactly `scheduler.sigmas` after the kind's pipeline
call of `set_timesteps`, checked against a fresh scheduler built here and against float64 formulas
written here: FLUX's exponential time shift with mu linear in the packed image sequence length, SD3's
static shift. Then: a 2-step `ddrl-engine train` with the folder's schedule, the config round trip,
and the errors (unsupported scheduler, DiT model, shift or sigmas set, build() without the folder)."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (pip install ddrl-engine[diffusers])")
pytest.importorskip("peft", reason="peft is an optional dependency (pip install ddrl-engine[diffusers])")
pytest.importorskip("transformers", reason="transformers is an optional dependency")

from ddrl_engine.sampling import RectifiedFlowSDE  # noqa: E402
from ddrl_engine.trainer.config import SamplerConfig, TrainConfig, config_from_dict, load_config  # noqa: E402
from ddrl_engine.trainer.pipeline_run import build_sampler  # noqa: E402
from tests.test_pipeline_run import assets, check_run, cli, config, write  # noqa: E402,F401  (assets: a fixture)


def levels(sampler) -> list[float]:
    return [float(sampler.network_level(k)) for k in range(sampler.num_steps + 1)]


def run_config(assets, kind, resolution, num_steps, **sampler):
    """A TrainConfig of `kind` on the tiny folder with schedule = "diffusers" (only the sampler is built)."""
    c = config(assets, "/nonexistent", kind, model__resolution=resolution)
    c["sampler"] = {"num_steps": num_steps, "schedule": "diffusers", **sampler}
    return config_from_dict(c)


def fresh_scheduler(folder):
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return getattr(diffusers, cfg["_class_name"]).from_pretrained(folder, subfolder="scheduler", local_files_only=True)


def flux_mu_float64(resolution, vae_scale=2) -> float:
    """mu of FluxPipeline for the tiny folder's scheduler config (base 256 -> 0.5, max 4096 -> 1.15):
    tokens = (H / vae_scale / 2) x (W / vae_scale / 2) after 2x2 packing."""
    tokens = (resolution[0] // vae_scale // 2) * (resolution[1] // vae_scale // 2)
    return 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)


@pytest.mark.parametrize("num_steps", [1, 4, 7])
@pytest.mark.parametrize("resolution", [[16, 16], [128, 64]])
def test_flux_levels_are_the_schedulers_sigmas_with_the_resolutions_mu(assets, resolution, num_steps):
    sampler = build_sampler(run_config(assets, "flux", resolution, num_steps))
    assert isinstance(sampler, RectifiedFlowSDE) and sampler.num_steps == num_steps
    mu = flux_mu_float64(resolution)
    sched = fresh_scheduler(assets["flux"])
    assert sched.config.use_dynamic_shifting  # the tiny FLUX folder shifts by resolution, as FLUX.1-dev does
    sched.set_timesteps(num_steps, sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=mu)
    assert levels(sampler) == [float(s) for s in sched.sigmas]  # exactly the scheduler's (float32) sigmas
    # our own float64 derivation: the exponential time shift e^mu / (e^mu + 1/s - 1) of s = 1 .. 1/K, then 0
    want = [math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in np.linspace(1.0, 1.0 / num_steps, num_steps)] + [0.0]
    np.testing.assert_allclose(levels(sampler), want, rtol=1e-6, atol=1e-7)


def test_flux_levels_depend_on_the_resolution(assets):
    small, large = (build_sampler(run_config(assets, "flux", r, 4)) for r in ([16, 16], [128, 128]))
    assert flux_mu_float64([128, 128]) > flux_mu_float64([16, 16])
    # a larger image shifts more: every inner level higher
    assert all(b > a for a, b in zip(levels(small)[1:-1], levels(large)[1:-1]))


@pytest.mark.parametrize("num_steps", [2, 5])
def test_sd3_levels_are_the_schedulers_sigmas(assets, num_steps):
    sampler = build_sampler(run_config(assets, "sd3", [16, 16], num_steps))
    sched = fresh_scheduler(assets["sd3"])
    sched.set_timesteps(num_steps)
    assert levels(sampler) == [float(s) for s in sched.sigmas]
    # float64: timesteps evenly spaced from 1000 down to 1000 s_min, s_min = shifted 1/1000, each / 1000 and shifted
    shift = lambda s: 3.0 * s / (1 + 2.0 * s)  # noqa: E731  (the tiny folder's shift = 3)
    ts = np.linspace(1000.0, 1000.0 * shift(1 / 1000), num_steps) / 1000.0
    np.testing.assert_allclose(levels(sampler), [shift(t) for t in ts] + [0.0], rtol=1e-5, atol=1e-6)
    # sd3 passes no mu: the same levels at any resolution
    assert levels(build_sampler(run_config(assets, "sd3", [32, 32], num_steps))) == levels(sampler)


def test_sd3_with_dynamic_shifting_uses_its_patch_sequence_length(assets, tmp_path):
    folder = tmp_path / "sd3_dynamic"
    shutil.copytree(assets["sd3"] / "scheduler", folder / "scheduler")
    for name in ("model_index.json",):
        shutil.copy(assets["sd3"] / name, folder / name)
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                "tokenizer_3"):
        (folder / sub).symlink_to(assets["sd3"] / sub)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"use_dynamic_shifting": True, "max_shift": 1.2}))
    c = config(assets, "/nonexistent", "sd3", folder=None, model__path=str(folder), model__resolution=[64, 32])
    c["sampler"] = {"num_steps": 3, "schedule": "diffusers"}
    sampler = build_sampler(config_from_dict(c))
    tokens = (64 // 2 // 2) * (32 // 2 // 2)  # latents 32 x 16 (VAE 2x), patch 2
    mu = 0.5 + (1.2 - 0.5) * (tokens - 256) / (4096 - 256)
    sched = fresh_scheduler(folder)
    sched.set_timesteps(3, mu=mu)
    assert levels(sampler) == [float(s) for s in sched.sigmas]


@pytest.mark.parametrize("num_steps", [2, 6])
def test_wan_levels_are_the_unipc_flow_sigmas(assets, num_steps):
    sampler = build_sampler(run_config(assets, "wan", [5, 16, 16], num_steps))
    sched = fresh_scheduler(assets["wan"])
    assert type(sched).__name__ == "UniPCMultistepScheduler" and sched.config.use_flow_sigmas
    sched.set_timesteps(num_steps)
    got = levels(sampler)
    assert got == [float(s) for s in sched.sigmas]
    assert got[-1] == 0.0 and got[0] <= 1.0 and all(a > b for a, b in zip(got, got[1:]))


def test_noise_level_is_kept_and_the_default_is_the_engines(assets):
    sampler = build_sampler(run_config(assets, "sd3", [16, 16], 3, noise_level=0.5))
    assert sampler.noise_level == 0.5
    plain = config(assets, "/nonexistent", "sd3")
    plain["sampler"] = {"num_steps": 4, "shift": 3.0}
    cfg = config_from_dict(plain)
    assert cfg.sampler.schedule == "engine"
    assert build_sampler(cfg) == RectifiedFlowSDE(num_steps=4, shift=3.0) == cfg.sampler.build()


def test_schedule_round_trips_through_config_json(assets):
    cfg = run_config(assets, "flux", [16, 16], 4)
    d = cfg.to_dict()
    assert d["sampler"]["schedule"] == "diffusers"
    assert config_from_dict(json.loads(json.dumps(d))) == cfg
    assert "schedule" not in TrainConfig().to_dict()["sampler"]  # default configs write what they always wrote
    assert SamplerConfig(schedule="diffusers") != SamplerConfig()


@pytest.mark.parametrize("case,sampler,needles", [
    ("unknown", {"schedule": "karras"}, ["'sampler.schedule' must be one of", "karras"]),
    ("shift", {"schedule": "diffusers", "shift": 3.0}, ["sampler.shift", "schedule = 'diffusers'"]),
    ("sigmas", {"schedule": "diffusers", "num_steps": 2, "sigmas": [1.0, 0.5, 0.0]}, ["sampler.sigmas"]),
    ("ddim", {"schedule": "diffusers", "name": "ddim"}, ["sampler.name = 'rectified_flow_sde'", "'ddim'"]),
    ("not_a_string", {"schedule": 1}, ["'sampler.schedule' must be a string"]),
])
def test_bad_schedule_settings_name_the_field(assets, case, sampler, needles):
    c = config(assets, "/nonexistent", "sd3")
    c["sampler"] = sampler
    with pytest.raises(ValueError) as e:
        config_from_dict(c)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_diffusers_schedule_with_the_dit_is_an_error():
    with pytest.raises(ValueError, match=r"sampler.schedule = 'diffusers'.*pipeline \[model\].*kind = 'dit'"):
        config_from_dict({"sampler": {"schedule": "diffusers"}})
    with pytest.raises(ValueError, match="the pipeline run builds this sampler"):
        SamplerConfig(schedule="diffusers").build()


@pytest.mark.parametrize("change,needles", [
    ({"use_flow_sigmas": False}, ["UniPCMultistepScheduler", "use_flow_sigmas is false"]),
    ({"final_sigmas_type": "sigma_min"}, ["UniPCMultistepScheduler", "final_sigmas_type"]),
    ({"_class_name": "EulerDiscreteScheduler"}, ["EulerDiscreteScheduler", "is not supported"]),
])
def test_unsupported_schedulers_are_a_clear_error_before_loading(assets, tmp_path, change, needles, capsys, monkeypatch):
    folder = tmp_path / "wan_other"
    shutil.copytree(assets["wan"], folder, symlinks=True)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | change))
    refuse = classmethod(lambda *a, **k: (_ for _ in ()).throw(AssertionError("a model was loaded before the check")))
    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", refuse)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)
    c = config(assets, tmp_path / "run", "wan", synthetic=True, model__path=str(folder))
    c["sampler"] = {"num_steps": 2, "schedule": "diffusers"}
    rc, out, err = cli(capsys, "train", "--config", write(tmp_path / "run.toml", c))
    assert rc == 2 and not out
    for needle in needles + ["sampler.schedule = 'diffusers'", str(folder / "scheduler")]:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("kind", ["flux", "wan"])
def test_two_step_train_on_the_folders_schedule(assets, kind, tmp_path, capsys):
    video = kind == "wan"
    c = config(assets, tmp_path / "run", kind, synthetic=video)
    c["sampler"] = {"num_steps": 3, "schedule": "diffusers", "noise_level": 0.6}
    path = write(tmp_path / "run.toml", c)
    rc, out, err = cli(capsys, "train", "--config", path)
    assert rc == 0, err
    assert json.loads(out)["step"] == 2
    check_run(tmp_path / "run", ".gif" if video else ".png")
    saved = load_config(tmp_path / "run" / "config.json")  # what eval / export / resume read back
    assert saved.sampler.schedule == "diffusers" and saved == load_config(path)
    want = fresh_scheduler(assets[kind])
    if kind == "flux":
        want.set_timesteps(3, sigmas=np.linspace(1.0, 1 / 3, 3), mu=flux_mu_float64([16, 16]))
    else:
        want.set_timesteps(3)
    assert levels(build_sampler(saved)) == [float(s) for s in want.sigmas]
    assert torch.isfinite(torch.tensor(levels(build_sampler(saved)))).all()
