"""`ddrl-engine train / eval / export` on tiny random diffusers pipeline folders (SD3, FLUX, Wan), end to end
in-process: prompt files, a captioned image folder (or synthetic base-model data), a PickScore-style CLIP
reward, checkpoints of the LoRA adapters only, exact resume, export loaded by diffusers' own
`load_lora_weights`, and the errors of bad input raised before any model is loaded."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (pip install ddrl-engine[diffusers])")
pytest.importorskip("peft", reason="peft is an optional dependency (pip install ddrl-engine[diffusers])")
pytest.importorskip("transformers", reason="transformers is an optional dependency")

from safetensors.torch import load_file  # noqa: E402

from ddrl_engine.cli import main  # noqa: E402
from ddrl_engine.models.diffusers import TextCondition  # noqa: E402
from ddrl_engine.trainer.checkpoint import latest_checkpoint, load_weights  # noqa: E402
from ddrl_engine.trainer.config import load_config  # noqa: E402
from ddrl_engine.trainer.pipeline_run import build_pipeline_run, load_policy  # noqa: E402
from tests.trainer_helpers import torchrun_train  # noqa: E402
from tests.test_pickscore import save_tiny_clip  # noqa: E402
from tests.tiny_pipelines import (make_flux_pipeline, make_sd3_pipeline, make_wan22_ti2v_pipeline,  # noqa: E402
                                  make_wan_pipeline)

TRAIN_PROMPTS = ["a red car", "a blue bird", "a green tree"]
EVAL_PROMPTS = ["a yellow sun"]
CAPTIONS = ["a red car", "a cat"]  # one caption among the training prompts, one not
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "wan": "WanPipeline"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The tiny model folders, the reward model, prompt files and a captioned image folder (built once)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("pipeline_run")
    a = {"root": root, "sd3": make_sd3_pipeline(root / "models"), "flux": make_flux_pipeline(root / "models"),
         "flux_dev": make_flux_pipeline(root / "models", guidance_embeds=True), "wan": make_wan_pipeline(root / "models"),
         "clip": save_tiny_clip(root / "pickscore")}
    (root / "train.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n\n")
    (root / "test.txt").write_text("\n".join(EVAL_PROMPTS) + "\n")
    (root / "train.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in TRAIN_PROMPTS))
    (root / "test.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in EVAL_PROMPTS))
    images = root / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    with open(images / "metadata.jsonl", "w") as f:
        for i in range(6):
            pixels = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(images / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": CAPTIONS[i % 2]}) + "\n")
    a["images"] = images
    return a


def _toml(sections: dict) -> str:
    # json.dumps of str / int / float / bool / lists of those is valid TOML
    return "".join(f"[{name}]\n" + "".join(f"{json.dumps(k) if ':' in k else k} = {json.dumps(v)}\n" for k, v in body.items())
                   + "\n" for name, body in sections.items())


def config(assets, out, kind="sd3", *, folder=None, prompts="txt", synthetic=False, rewards=None, **over):
    """A 2-step LoRA run of `kind` on the tiny folder: held-out prompts, captioned images (or synthetic data)."""
    video = kind == "wan"
    c = {
        "run": {"out_dir": str(out), "steps": 2, "eval_every": 2, "ckpt_every": 1, "progress": False},
        "model": {"kind": kind, "path": str(assets[folder or kind]), "lora_rank": 4, "dtype": "fp32",
                  "resolution": [5, 16, 16] if video else [16, 16]},
        "sampler": {"num_steps": 4, "shift": 3.0},
        "algorithm": {"group_size": 2},
        "rollout": {"conditions_per_step": 2},
        "data": {"prompts": str(assets["root"] / f"train.{prompts}"), "eval_prompts": str(assets["root"] / f"test.{prompts}")},
        "eval": {"samples_per_class": 2, "heldout_loss_levels": 2},
        "rewards": rewards or {"pickscore": 1.0},  # video: PickScore of every frame, averaged
        "reward_models": {"pickscore": str(assets["clip"])},
    }
    if synthetic:
        c["data"].update(dataset="captioned", synthetic=True, synthetic_count=4)
    else:
        c["data"].update(dataset="captioned", path=str(assets["images"]))
    for key, value in over.items():  # section__field=value
        section, name = key.split("__")
        if value is None:
            c[section].pop(name, None)
        else:
            c[section][name] = value
    return c


def write(path, cfg) -> str:
    Path(path).write_text(_toml(cfg))
    return str(path)


def cli(capsys, *argv):
    """(return code, stdout, stderr) of `ddrl-engine ARGV` run in this process."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def metrics(run, kind):
    return [m for m in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines()) if m["kind"] == kind]


def untimed(m):
    return {k: v for k, v in m.items() if not k.startswith("time_")}


def assert_same_metrics(got: dict, want: dict) -> None:
    """A run's step metrics equal another run's to float rounding (another world size, sharding or
    reduction order): rel 1e-4, abs 1e-6. The policy loss is a mean of +-A r terms that cancels to ~0
    (group-normalised advantages, ratios ~1), so its error is the advantages' own, not a fraction of the
    loss: its absolute tolerance is the advantages' relative one, 1e-4 adv_abs (seen on an AMD EPYC:
    1.6e-5 apart at adv_abs 0.35, the advantages 4e-5 apart relatively; below 1e-6 on the machines of
    earlier sessions)."""
    for k, v in untimed(want).items():
        if isinstance(v, str):
            continue
        atol = max(1e-6, 1e-4 * abs(want.get("adv_abs", 0.0))) if k == "policy_loss" else 1e-6
        assert got[k] == pytest.approx(v, rel=1e-4, abs=atol), (got["step"], k, got[k], v)


def check_run(run, sample_suffix):
    """What every finished 2-step LoRA run must have written."""
    train = metrics(run, "train")
    assert [m["step"] for m in train] == [1, 2]
    for m in train:
        for key in ("reward", "policy_loss", "data_loss", "grad_norm"):
            assert math.isfinite(m[key]), (key, m)
        assert m["grad_norm"] > 0
    # the first optimisation step of each update sees the rollout's own policy: ratio exactly 1
    assert train[0]["ratio_dev_first"] == 0.0
    assert [m["step"] for m in metrics(run, "eval")] == [0, 2]
    ckpts = sorted(p.name for p in (Path(run) / "checkpoints").glob("step_*"))
    assert ckpts == ["step_0000001", "step_0000002"]
    for name in ckpts:
        keys = load_file(Path(run) / "checkpoints" / name / "model.safetensors").keys()
        assert keys and all("lora_" in k for k in keys), [k for k in keys if "lora_" not in k][:3]
    assert (Path(run) / "samples" / f"step_0000002{sample_suffix}").is_file()


def text_condition(kind, folder, batch=2, tokens=5):
    """Fixed random text embeddings of the tiny folder's widths (and guidance for FLUX.1-dev)."""
    tcfg = json.loads((Path(folder) / "transformer" / "config.json").read_text())
    g = torch.Generator().manual_seed(3)
    if kind == "wan":
        return TextCondition(torch.randn(batch, tokens, tcfg["text_dim"], generator=g))
    embeds = torch.randn(batch, tokens, tcfg["joint_attention_dim"], generator=g)
    pooled = torch.randn(batch, tcfg["pooled_projection_dim"], generator=g)
    guidance = torch.full((batch,), 4.0) if tcfg.get("guidance_embeds") else None
    return TextCondition(embeds, pooled, guidance)


def trained_policy(run):
    """The run's policy rebuilt as eval / export rebuild it: base folder + LoRA, then the latest checkpoint."""
    cfg = load_config(Path(run) / "config.json")
    policy = load_policy(cfg, log=lambda *_: None).policy
    load_weights(latest_checkpoint(Path(run) / "checkpoints"), policy)
    return cfg, policy.eval()


def check_export_loads(capsys, run, kind, folder, tmp_path):
    """export -> <Pipeline>.from_pretrained(folder) + load_lora_weights gives the trained policy's output."""
    rc, out, err = cli(capsys, "export", "--run", run, "--out", tmp_path / "lora")
    assert rc == 0, err
    assert Path(out.strip()).is_file()
    cfg, policy = trained_policy(run)
    pipe = getattr(diffusers, PIPELINES[kind]).from_pretrained(folder, local_files_only=True)
    base = type(policy)(pipe.transformer, policy.sample_shape, ddrl_attention=False).eval()
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, *policy.sample_shape, generator=g), torch.tensor([0.3, 0.8])
    cond = text_condition(kind, folder)
    with torch.no_grad():
        before = base(x, t, cond)
        pipe.load_lora_weights(tmp_path / "lora")
        config = next(iter(pipe.transformer.peft_config.values()))
        assert config.r == cfg.model.lora_rank
        theirs = base(x, t, cond)  # diffusers' own attention, diffusers' own LoRA loading
        ours = policy(x, t, cond)  # the trained policy (ddrl attention)
    assert policy.ddrl_attention and not base.ddrl_attention
    assert not torch.equal(before, ours)  # training changed the adapters
    # Bit-exact: the same fp32 base and adapter tensors, the same LoRA scaling; on CPU the sdpa route of
    # ddrl_engine.attention is diffusers' own attention call.
    assert torch.equal(theirs, ours)
    assert (theirs - ours).abs().max() < 1e-2 * (before - ours).abs().max()


# ----------------------------------------------------------------------------------------------- SD3


@pytest.fixture(scope="module")
def sd3_run(assets, tmp_path_factory):
    """One uninterrupted 2-step SD3 run (.txt prompts, captioned images, PickScore)."""
    d = tmp_path_factory.mktemp("sd3_run")
    cfg = write(d / "run.toml", config(assets, d / "run"))
    assert main(["train", "--config", cfg]) == 0
    return d / "run", cfg


def test_sd3_train_writes_a_complete_run(sd3_run):
    run, _ = sd3_run
    check_run(run, ".png")
    # the held-out prompt and the caption not among the training prompts are evaluated / trained on too
    assert json.loads((run / "config.json").read_text())["model"]["kind"] == "sd3"


def test_sd3_resume_matches_the_uninterrupted_run(assets, sd3_run, tmp_path, capsys):
    run, cfg = sd3_run
    assert load_config(cfg).optim.schedule == "constant"  # so --steps 1 is the same run's first step
    rc, _, err = cli(capsys, "train", "--config", cfg, "--out", tmp_path / "run", "--steps", 1)
    assert rc == 0, err
    assert [m["step"] for m in metrics(tmp_path / "run", "train")] == [1]
    rc, _, err = cli(capsys, "train", "--config", cfg, "--out", tmp_path / "run")
    assert rc == 0, err
    assert "resumed from" in err and "at step 1" in err
    resumed = [untimed(m) for m in metrics(tmp_path / "run", "train")]
    assert resumed == [untimed(m) for m in metrics(run, "train")]


def test_sd3_export_loads_into_the_diffusers_pipeline(assets, sd3_run, tmp_path, capsys):
    check_export_loads(capsys, sd3_run[0], "sd3", assets["sd3"], tmp_path)


def test_sd3_eval_repeats_the_last_eval(sd3_run, tmp_path, capsys):
    run, _ = sd3_run
    rc, out, err = cli(capsys, "eval", "--run", run, "--out", tmp_path / "x")
    assert rc == 0, err
    printed = json.loads(out)
    last = metrics(run, "eval")[-1]
    assert printed and printed.keys() <= last.keys()
    assert {k: last[k] for k in printed} == printed
    assert (tmp_path / "x" / "samples.png").is_file()


def test_sd3_synthetic_latents_are_base_samples_unclamped(assets, tmp_path):
    from ddrl_engine.sampling import rollout

    cfg = load_config(write(tmp_path / "run.toml", config(assets, tmp_path / "run", synthetic=True,
                                                          data__synthetic_count=6)))
    run = build_pipeline_run(cfg, log=lambda *_: None, progress=False)
    ds = run.dataset
    assert ds.train_x.shape[1:] == run.policy.sample_shape and len(ds.train_x) + len(ds.heldout_x) == 6
    # fresh rollouts of the base model (LoRA B = 0: the policy is the base) of every training prompt
    ids = torch.arange(len(TRAIN_PROMPTS)).repeat_interleave(4)
    with torch.no_grad():
        base = torch.cat([rollout(run.policy.eval(), run.sampler, ids[i:i + 4], generator=torch.Generator().manual_seed(s),
                                  sample_shape=run.policy.sample_shape).samples for s, i in enumerate(range(0, 12, 4))])
    assert base.abs().max() > 1.0  # the base's latents leave [-1, 1] ...
    assert ds.train_x.abs().max() > 1.0  # ... and so do the synthetic data: never clamped
    # same statistics as the base's samples (these are small samples: loose bounds)
    assert abs(ds.train_x.std().item() - base.std().item()) < 0.5 * base.std().item()
    # exactly base rollouts: redraw them as synthetic_dataset documents it (labels and noise from run.seed + 7)
    n = cfg.data.synthetic_count
    labels = run.conditions[torch.randint(0, len(run.conditions), (n,), generator=torch.Generator().manual_seed(cfg.run.seed + 7))]
    gen = torch.Generator().manual_seed(cfg.run.seed + 7)
    chunk = cfg.rollout.conditions_per_step * cfg.algorithm.group_size
    with torch.no_grad():
        redrawn = torch.cat([rollout(run.policy, run.sampler, y, generator=gen, sample_shape=run.policy.sample_shape).samples
                             for y in labels.split(chunk)])
    everything = torch.cat([ds.train_x, ds.heldout_x])
    for row in everything:
        assert any(torch.equal(row, r) for r in redrawn)
    assert sorted(torch.cat([ds.train_y, ds.heldout_y]).tolist()) == sorted(labels.tolist())


# ----------------------------------------------------------------------------------------------- FLUX, Wan


@pytest.mark.parametrize("folder", ["flux", "flux_dev"])
def test_flux_train_and_export(assets, folder, tmp_path, capsys):
    over = {"model__guidance": 4.0} if folder == "flux_dev" else {}
    cfg = write(tmp_path / "run.toml", config(assets, tmp_path / "run", "flux", folder=folder, prompts="jsonl", **over))
    rc, out, err = cli(capsys, "train", "--config", cfg)
    assert rc == 0, err
    assert json.loads(out)["step"] == 2
    check_run(tmp_path / "run", ".png")
    check_export_loads(capsys, tmp_path / "run", "flux", assets[folder], tmp_path)


def test_wan_train_and_export(assets, tmp_path, capsys):
    cfg = write(tmp_path / "run.toml", config(assets, tmp_path / "run", "wan", synthetic=True))
    rc, out, err = cli(capsys, "train", "--config", cfg)
    assert rc == 0, err
    check_run(tmp_path / "run", ".gif")
    for m in metrics(tmp_path / "run", "eval"):  # the built-in "pickscore" of a video model: per frame, averaged
        assert math.isfinite(m["reward/pickscore/frames_mean"]) and m["reward"] == m["reward/pickscore/frames_mean"]
    check_export_loads(capsys, tmp_path / "run", "wan", assets["wan"], tmp_path)


def test_wan_with_a_captioned_video_folder(assets, tmp_path, capsys):
    """Regularisation data from real videos (MPEG-4, decoded by PyAV): each clip's first frames are encoded
    through the Wan VAE into the latent cache and paired with its caption; a 2-step run trains on them."""
    pytest.importorskip("av")
    from tests.test_captioned import write_video

    videos = tmp_path / "videos"
    videos.mkdir()
    with open(videos / "metadata.jsonl", "w") as f:
        for i in range(3):
            write_video(videos / f"{i}.mp4", 6)
            f.write(json.dumps({"file_name": f"{i}.mp4", "text": CAPTIONS[i % 2]}) + "\n")
    cfg = write(tmp_path / "run.toml", config(assets, tmp_path / "run", "wan", data__path=str(videos)))
    rc, out, err = cli(capsys, "train", "--config", cfg)
    assert rc == 0, err
    check_run(tmp_path / "run", ".gif")
    assert all(math.isfinite(m["data_loss"]) and m["data_loss"] > 0 for m in metrics(tmp_path / "run", "train"))


def test_wan22_ti2v_text_to_video_trains_and_exports(assets, tmp_path, capsys):
    """A Wan2.2-TI2V-5B-like folder (its VAE: 16x spatial, patchified pixels; expand_timesteps = true) in
    text-to-video: trains, evaluates, exports, and the export loads into diffusers' WanPipeline bit-exact;
    a per-sample timestep gives the transformer's per-token-timestep output (what the pipeline passes under
    expand_timesteps without an image) to float rounding: the time embedding's matmuls run on B rows
    against B x tokens, and the CPU GEMM may round the same row differently by batch (one ulp seen on an
    AVX2 AMD EPYC; earlier sessions' CI, on machines not recorded, saw it bitwise)."""
    assets = dict(assets, wan22=make_wan22_ti2v_pipeline(assets["root"] / "models"))
    pipe = diffusers.WanPipeline.from_pretrained(assets["wan22"], local_files_only=True)
    assert pipe.config.expand_timesteps
    g = torch.Generator().manual_seed(3)
    x, emb = torch.randn(2, 8, 2, 2, 2, generator=g), torch.randn(2, 5, 32, generator=g)
    t = torch.tensor([800.0, 150.0])
    with torch.no_grad():
        per_sample = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]
        per_token = pipe.transformer(hidden_states=x, timestep=t[:, None].expand(2, 2).contiguous(),
                                     encoder_hidden_states=emb, return_dict=False)[0]
    torch.testing.assert_close(per_sample, per_token, atol=2e-6, rtol=1e-6)
    cfg = write(tmp_path / "run.toml", config(assets, tmp_path / "run", "wan", folder="wan22", synthetic=True,
                                              model__resolution=[5, 32, 32]))
    rc, out, err = cli(capsys, "train", "--config", cfg)
    assert rc == 0, err
    check_run(tmp_path / "run", ".gif")
    check_export_loads(capsys, tmp_path / "run", "wan", assets["wan22"], tmp_path)


@pytest.mark.parametrize("kind", ["flux", "wan"])
def test_guided_rollouts_train_end_to_end(assets, kind, tmp_path, capsys, monkeypatch):
    """[rollout] guidance_scale > 1 on FLUX (no guidance embedding, as FLUX.1-schnell: true CFG against the
    empty prompt) and Wan: 2 steps from the CLI, every rollout forward guided with the empty prompt's id,
    the first trained step exactly on-policy (ratio 1), and the guided run differs from the unguided one."""
    from ddrl_engine.sampling.guidance import Guided

    seen = []
    call = Guided.__call__

    def spy(self, x, t, cond):
        seen.append((self.scale, self.null_cond))
        return call(self, x, t, cond)

    monkeypatch.setattr(Guided, "__call__", spy)
    video = kind == "wan"
    runs = {}
    for scale in (1.0, 3.0):
        out_dir = tmp_path / f"run_{scale}"
        cfg = write(tmp_path / f"{scale}.toml", config(assets, out_dir, kind, synthetic=video, rollout__guidance_scale=scale))
        rc, _, err = cli(capsys, "train", "--config", cfg)
        assert rc == 0, err
        check_run(out_dir, ".gif" if video else ".png")  # includes ratio_dev_first == 0: the guided ratio is 1
        runs[scale] = metrics(out_dir, "train")
        if scale == 1.0:
            assert not seen  # no guidance: the plain policy, never the wrapper
    # the null condition is the empty prompt, the id after every text of the run (prompts, held-out, captions)
    texts = set(TRAIN_PROMPTS) | set(EVAL_PROMPTS) | (set() if video else set(CAPTIONS))
    assert seen and set(seen) == {(3.0, len(texts))}
    assert load_config(tmp_path / "3.0.toml").model.guidance == 0.0  # FLUX: no distilled guidance input here
    assert runs[3.0][0]["reward"] != runs[1.0][0]["reward"]  # the guided rollouts are other samples


# ----------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: errors must come before."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))


def _bad_cases(assets, tmp: Path):
    no_vae = tmp / "no_vae"
    if not no_vae.exists():
        import shutil

        shutil.copytree(assets["sd3"], no_vae)
        shutil.rmtree(no_vae / "vae")
        (tmp / "empty.txt").write_text("\n\n")
        (tmp / "uncaptioned").mkdir()
        (tmp / "uncaptioned" / "0.png").write_bytes((assets["images"] / "0.png").read_bytes())
    return {
        "kind": (dict(model__kind="flux"), ["model.kind", "FluxPipeline", "StableDiffusion3Pipeline"]),
        "no_vae": (dict(model__path=str(no_vae)), ["model.path", "vae/"]),
        "empty_prompts": (dict(data__prompts=str(tmp / "empty.txt")), ["empty.txt", "no prompt"]),
        "missing_prompts": (dict(data__eval_prompts=str(tmp / "nope.txt")), ["nope.txt", "does not exist"]),
        "no_metadata": (dict(data__path=str(tmp / "uncaptioned")), ["uncaptioned", "metadata.jsonl"]),
        "resolution": (dict(model__resolution=[18, 16]), ["model.resolution", "divisible by 4"]),
        "reward_folder": (dict(reward_models__pickscore=str(assets["sd3"] / "text_encoder_3")),
                          [str(assets["sd3"] / "text_encoder_3"), "not a CLIP model"]),
        "one_eval_sample": (dict(eval__samples_per_class=1), ["eval.samples_per_class", ">= 2"]),
        "unknown_reward": (dict(rewards__pickscore=None, rewards__sharpness=1.0), ["rewards.sharpness", "pickscore"]),
    }


@pytest.mark.parametrize("case", ["kind", "no_vae", "empty_prompts", "missing_prompts", "no_metadata", "resolution",
                                  "reward_folder", "unknown_reward", "one_eval_sample"])
def test_bad_input_is_a_clear_error_before_loading(assets, case, tmp_path_factory, capsys, no_loading):
    tmp = tmp_path_factory.getbasetemp() / "bad_input"
    tmp.mkdir(exist_ok=True)
    over, needles = _bad_cases(assets, tmp)[case]
    cfg = write(tmp / f"{case}.toml", config(assets, tmp / case, **over))
    rc, out, err = cli(capsys, "train", "--config", cfg)
    assert rc == 2 and not out
    assert err.startswith("ddrl-engine train: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)


def test_eval_and_export_of_a_folder_that_is_not_a_run(tmp_path, capsys, no_loading):
    for cmd in (["eval", "--run", tmp_path], ["export", "--run", tmp_path, "--out", tmp_path / "x"]):
        rc, out, err = cli(capsys, *cmd)
        assert rc == 2 and not out
        assert err.startswith(f"ddrl-engine {cmd[0]}: error: --run: {tmp_path} is not a run folder"), err


def test_export_of_a_full_fine_tune_is_a_transformer_folder(assets, tmp_path, capsys):
    cfg = write(tmp_path / "run.toml", config(assets, tmp_path / "run", model__lora_rank=0, run__steps=1,
                                              eval__heldout_loss_levels=1))
    rc, _, err = cli(capsys, "train", "--config", cfg)
    assert rc == 0, err
    keys = load_file(tmp_path / "run" / "checkpoints" / "step_0000001" / "model.safetensors").keys()
    assert not any("lora_" in k for k in keys) and any("transformer_blocks" in k for k in keys)
    rc, out, err = cli(capsys, "export", "--run", tmp_path / "run", "--out", tmp_path / "transformer")
    assert rc == 0, err
    assert Path(out.strip()) == tmp_path / "transformer" and (tmp_path / "transformer" / "config.json").is_file()
    _, policy = trained_policy(tmp_path / "run")
    exported = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "transformer", local_files_only=True)
    base = diffusers.SD3Transformer2DModel.from_pretrained(assets["sd3"] / "transformer", local_files_only=True)
    trained = policy.model.state_dict()
    ours = exported.state_dict()
    assert ours.keys() == trained.keys()
    assert all(torch.equal(ours[k], trained[k]) for k in ours)
    assert any(not torch.equal(ours[k], v) for k, v in base.state_dict().items())  # it was trained


# ----------------------------------------------------------------------------------------------- 2 ranks


def test_sd3_two_rank_fsdp_matches_one_process(assets, sd3_run, tmp_path, capsys):
    """torchrun, 2 CPU ranks (gloo), FSDP2: the same metrics as the one-process run to float rounding (the
    2 ranks also fill one empty prompt / latent cache together), and its DCP checkpoint exports."""
    cfg = config(assets, tmp_path / "run")
    cfg["distributed"] = {"parallel": "fsdp"}
    path = write(tmp_path / "run.toml", cfg)
    torchrun_train(path, tmp_path / "cache")
    got, want = metrics(tmp_path / "run", "train"), metrics(sd3_run[0], "train")
    assert [m["step"] for m in got] == [m["step"] for m in want] == [1, 2]
    for g, w in zip(got, want):
        assert untimed(g).keys() == untimed(w).keys()
        assert g["kind"] == w["kind"] and g["step"] == w["step"]
        assert_same_metrics(g, w)
    for g, w in zip(metrics(tmp_path / "run", "eval"), metrics(sd3_run[0], "eval")):
        for k in ("reward", "diversity", "heldout_data_loss"):
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), (g["step"], k)
    rc, _, err = cli(capsys, "export", "--run", tmp_path / "run", "--out", tmp_path / "lora")
    assert rc == 0, err
    two = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    rc, _, err = cli(capsys, "export", "--run", sd3_run[0], "--out", tmp_path / "lora1")
    assert rc == 0, err
    one = load_file(tmp_path / "lora1" / "pytorch_lora_weights.safetensors")
    assert two.keys() == one.keys() and two
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6)


def test_full_fine_tune_in_bf16_trains_fp32_master_weights(assets, tmp_path, capsys):
    """[model] dtype = "bf16" with lora_rank = 0: the text encoders and VAE load in bf16, the trained
    transformer is fp32 (AdamW on bf16 weights rounds most updates at lr 1e-5 away); one step from the
    CLI moves every weight matrix, and eval / export rebuild the policy in fp32 too."""
    c = config(assets, tmp_path / "run", model__lora_rank=0, model__dtype="bf16", run__steps=1, eval__heldout_loss_levels=1)
    c["optim"] = {"lr": 1e-5}  # DanceGRPO's full fine-tuning rate
    path = write(tmp_path / "run.toml", c)
    cfg = load_config(path)
    logs = []
    bundle = load_policy(cfg, log=logs.append)
    assert {p.dtype for p in bundle.policy.parameters()} == {torch.float32}
    assert any("trained in fp32 (loaded in bf16" in line for line in logs)
    encoders = [bundle.vae, bundle.pipeline.text_encoder]
    assert all({p.dtype for p in e.parameters()} == {torch.bfloat16} for e in encoders)
    lora_logs = []
    lora = load_policy(replace(cfg, model=replace(cfg.model, lora_rank=4)), log=lora_logs.append).policy
    assert {p.dtype for p in lora.parameters() if not p.requires_grad} == {torch.bfloat16}  # a LoRA base stays bf16
    assert {p.dtype for p in lora.parameters() if p.requires_grad} == {torch.float32}  # its adapters are fp32
    assert any("fp32 adapters on the bf16 base" in line for line in lora_logs), lora_logs
    start = {k: v.clone() for k, v in bundle.policy.state_dict().items()}
    rc, _, err = cli(capsys, "train", "--config", path)
    assert rc == 0, err
    _, trained = trained_policy(tmp_path / "run")
    after = trained.state_dict()
    assert {p.dtype for p in trained.parameters()} == {torch.float32}  # (buffers keep the load dtype)
    # one AdamW step moves every entry with a gradient by ~lr: in fp32 nearly all of them change (the
    # last SD3 block's unused text-query projection gets none); on bf16 weights most would round back
    matrices = [k for k, v in start.items() if v.dim() == 2 and "weight" in k]
    changed = sum((after[k] != start[k]).sum().item() for k in matrices)
    assert changed > 0.9 * sum(start[k].numel() for k in matrices)


def test_lora_in_bf16_trains_fp32_adapters_and_exports(assets, tmp_path, capsys):
    """[model] dtype = "bf16" with LoRA: the checkpoint's adapters are fp32 and moved by training, the base
    stays bf16, and the export loads into a bf16 diffusers pipeline as those adapters rounded to bf16
    (diffusers casts them into its bf16 LoRA layers), whose output is the trained policy's."""
    c = config(assets, tmp_path / "run", model__dtype="bf16", run__steps=1, eval__heldout_loss_levels=1)
    c["optim"] = {"lr": 1e-3}  # a step that moves the bf16 output visibly
    rc, _, err = cli(capsys, "train", "--config", write(tmp_path / "run.toml", c))
    assert rc == 0, err
    cfg, policy = trained_policy(tmp_path / "run")
    ours = {n.removeprefix("model.").replace(".default.", "."): p for n, p in policy.named_parameters() if p.requires_grad}
    assert ours and {p.dtype for p in ours.values()} == {torch.float32}
    assert {p.dtype for p in policy.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert any(p.abs().max() > 0 for n, p in ours.items() if "lora_B" in n)  # trained (B starts at zero)
    rc, _, err = cli(capsys, "export", "--run", tmp_path / "run", "--out", tmp_path / "lora")
    assert rc == 0, err
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(assets["sd3"], local_files_only=True, dtype=torch.bfloat16)
    base = type(policy)(pipe.transformer, policy.sample_shape, ddrl_attention=False).eval()
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, *policy.sample_shape, generator=g), torch.tensor([0.3, 0.8])
    cond = text_condition("sd3", assets["sd3"])
    cond = type(cond)(cond.embeds.to(torch.bfloat16), cond.pooled.to(torch.bfloat16))
    with torch.no_grad():
        before = base(x, t, cond).float()
        pipe.load_lora_weights(tmp_path / "lora")
        (adapter,) = pipe.transformer.peft_config
        loaded = {n.replace(f".{adapter}.", "."): p for n, p in pipe.transformer.named_parameters() if "lora_" in n}
        assert loaded.keys() == ours.keys()
        for k, p in loaded.items():
            assert p.dtype == torch.bfloat16 and torch.equal(p, ours[k].to(torch.bfloat16)), k
        theirs = base(x, t, cond).float()
        trained = policy(x, t, cond).float()
    moved, apart = (trained - before).abs().max(), (theirs - trained).abs().max()
    print(f"bf16 LoRA export: training moved the output by {float(moved):.3g}; exported vs trained {float(apart):.3g}")
    assert moved > 0 and apart <= 0.5 * moved, (float(apart), float(moved))  # the adapters above are exact


@pytest.mark.slow
def test_sd3_full_fine_tune_under_two_rank_fsdp_matches_one_process_and_exports(assets, tmp_path, capsys):
    """Full fine-tuning (lora_rank = 0) of a pipeline transformer under 2-rank FSDP2 (gloo): the same
    metrics as one process, and its sharded DCP checkpoint exports the same transformer folder."""
    def full_ft(out):
        return config(assets, out, model__lora_rank=0, run__steps=1, eval__heldout_loss_levels=1)

    one_path = write(tmp_path / "one.toml", full_ft(tmp_path / "one"))
    rc, _, err = cli(capsys, "train", "--config", one_path)
    assert rc == 0, err
    cfg = full_ft(tmp_path / "two")
    cfg["distributed"] = {"parallel": "fsdp"}
    path = write(tmp_path / "two.toml", cfg)
    torchrun_train(path, tmp_path / "cache")
    for g, w in zip(metrics(tmp_path / "two", "train"), metrics(tmp_path / "one", "train")):
        assert_same_metrics(g, w)
    for run in ("one", "two"):
        rc, _, err = cli(capsys, "export", "--run", tmp_path / run, "--out", tmp_path / f"{run}_transformer")
        assert rc == 0, err
    one = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "one_transformer", local_files_only=True)
    two = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "two_transformer", local_files_only=True)
    a, b = one.state_dict(), two.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # atol: 5% of one Adam step at lr 1e-4 (an entry with a gradient near Adam's eps moves noisily)
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=5e-6, msg=k)
