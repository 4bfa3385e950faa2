"""ddrl_engine.pipelines on tiny random diffusers folders (tests/tiny_pipelines.py; CPU, nothing downloaded).

Each check compares the bundle with the diffusers pipeline itself: a separately loaded
`DiffusionPipeline.from_pretrained(folder)` is the reference for text encoding, decoding and the
transformer call it makes in its denoising loop.
"""
import hashlib
import shutil

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (pip install ddrl-engine[diffusers])")
pytest.importorskip("transformers", reason="the pipelines' text encoders need transformers")

from ddrl_engine.models.diffusers import FluxPolicy, SD3Policy, WanPolicy  # noqa: E402
from ddrl_engine.pipelines import KINDS, ModelBundle, load_bundle, preflight  # noqa: E402

from .tiny_pipelines import make_flux_pipeline, make_sd3_pipeline, make_wan_pipeline  # noqa: E402

TEXTS = ["a photo of a cat", "a red car on the river", ""]
MSL = 8  # T5 tokens: small, so the tiny transformers stay fast
RES = {"sd3": (16, 24), "flux": (16, 24), "wan": (5, 16, 32)}
LATENT = {"sd3": (4, 8, 12), "flux": (4, 8, 12), "wan": (16, 2, 2, 4)}
PIPELINE = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "wan": "WanPipeline"}
POLICY = {"sd3": SD3Policy, "flux": FluxPolicy, "wan": WanPolicy}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_pipelines")
    return {"sd3": make_sd3_pipeline(root), "flux": make_flux_pipeline(root), "wan": make_wan_pipeline(root),
            "flux_dev": make_flux_pipeline(root, guidance_embeds=True)}


def _kind(name):
    return "flux" if name == "flux_dev" else name


@pytest.fixture(scope="module")
def bundles(folders):
    return {name: load_bundle(_kind(name), path, resolution=RES[_kind(name)], dtype=torch.float32, device="cpu",
                              max_sequence_length=MSL, prompt_batch=2, decode_batch=1)
            for name, path in folders.items()}


@pytest.fixture(scope="module")
def references(folders):
    """The pipelines as diffusers loads them: the reference every bundle result is compared with."""
    return {name: diffusers.DiffusionPipeline.from_pretrained(path, local_files_only=True)
            for name, path in folders.items()}


def _pipeline_encode(name, pipe, texts):
    if _kind(name) == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(texts, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=MSL)
        return embeds, pooled
    if _kind(name) == "flux":
        embeds, pooled, _ = pipe.encode_prompt(texts, max_sequence_length=MSL)
        return embeds, pooled
    embeds, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, max_sequence_length=MSL)
    return embeds, None


# ----------------------------------------------------------------------------------------------- folders


@pytest.mark.parametrize("name", ["sd3", "flux", "flux_dev", "wan"])
def test_tiny_folder_is_a_real_pipeline(folders, name):
    """The specific pipeline class loads the folder and generates in 2 steps."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(folders[name], local_files_only=True)
    assert type(pipe).__name__ == PIPELINE[_kind(name)]
    kwargs = dict(prompt=["a photo of a cat"], num_inference_steps=2, output_type="pt", max_sequence_length=MSL,
                  generator=torch.Generator().manual_seed(0))
    if _kind(name) == "wan":
        frames, h, w = RES["wan"]
        out = pipe(height=h, width=w, num_frames=frames, **kwargs).frames
        assert out.shape == (1, frames, 3, h, w)
    else:
        h, w = RES[_kind(name)]
        out = pipe(height=h, width=w, **kwargs).images
        assert out.shape == (1, 3, h, w)
    assert torch.isfinite(out).all()


def test_tiny_folders_are_reproducible(tmp_path, folders):
    again = make_sd3_pipeline(tmp_path)

    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    assert digest(again) == digest(folders["sd3"])
    assert make_sd3_pipeline(tmp_path) == again  # a finished folder is reused


# ----------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", ["sd3", "flux", "wan"])
def test_load_bundle(bundles, name):
    b = bundles[name]
    assert isinstance(b, ModelBundle) and b.kind == name
    assert isinstance(b.policy, POLICY[name]) and b.policy.sample_shape == LATENT[name] == b.latent_shape
    assert b.pipeline.transformer is b.policy.model
    assert b.policy.ddrl_attention
    frozen = [b.vae] + [getattr(b.pipeline, n) for n in b.text_encoder_names]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(not m.training for m in frozen)
    assert all(p.requires_grad for p in b.policy.parameters())
    assert b.null_prompt == ""


def test_scheduler_config_is_the_folders(bundles):
    sd3, flux, wan = (bundles[k].scheduler_config for k in ("sd3", "flux", "wan"))
    assert sd3["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sd3["shift"] == 3.0
    assert not sd3["use_dynamic_shifting"]
    assert flux["use_dynamic_shifting"] and flux["base_shift"] == 0.5 and flux["max_shift"] == 1.15
    assert wan["_class_name"] == "UniPCMultistepScheduler" and wan["flow_shift"] == 3.0 and wan["use_flow_sigmas"]


def test_low_precision_with_a_float32_vae(folders):
    b = load_bundle("flux", folders["flux_dev"], resolution=(16, 16), dtype=torch.bfloat16, device="cpu",
                    vae_dtype=torch.float32, max_sequence_length=MSL)
    assert b.policy.model.dtype == torch.bfloat16 and b.pipeline.text_encoder_2.dtype == torch.bfloat16
    assert b.vae.dtype == torch.float32
    cond = b.encode_prompts(TEXTS[:2])
    assert cond.embeds.dtype == torch.bfloat16
    x = torch.randn(2, *b.latent_shape)
    with torch.no_grad():
        v = b.policy(x, torch.full((2,), 0.5), cond)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    pixels = b.decode(x)
    assert pixels.dtype == torch.float32 and pixels.shape == (2, 3, 16, 16)


# ----------------------------------------------------------------------------------------------- text


@pytest.mark.parametrize("name", ["sd3", "flux", "flux_dev", "wan"])
def test_encode_prompts_match_the_pipeline(bundles, references, name):
    ours = bundles[name].encode_prompts(TEXTS)  # prompt_batch=2: two chunks
    embeds, pooled = _pipeline_encode(name, references[name], TEXTS)
    torch.testing.assert_close(ours.embeds, embeds, atol=1e-6, rtol=1e-6)
    if pooled is None:
        assert ours.pooled is None
    else:
        torch.testing.assert_close(ours.pooled, pooled, atol=1e-6, rtol=1e-6)
    if name == "flux_dev":
        assert torch.equal(ours.guidance, torch.full((3,), 3.5))
        assert torch.equal(bundles[name].encode_prompts(TEXTS[:1], guidance=5.0).guidance, torch.tensor([5.0]))
    else:
        assert ours.guidance is None


def test_guidance_only_for_guidance_distilled_flux(bundles, folders):
    with pytest.raises(ValueError, match="guidance"):
        bundles["flux"].encode_prompts(TEXTS, guidance=3.5)
    with pytest.raises(ValueError, match="guidance"):
        load_bundle("flux", folders["flux"], resolution=(16, 16), dtype=torch.float32, device="cpu", guidance=3.5)


def test_prompt_bank_drives_the_policy_by_id(bundles):
    b = bundles["sd3"]
    bank = b.prompt_bank(TEXTS[:2])
    assert len(bank) == 3
    torch.testing.assert_close(bank[2].embeds, b.encode_prompts([""]).embeds)
    policy = SD3Policy(b.policy.model, b.latent_shape, bank)
    x = torch.randn(2, *b.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        torch.testing.assert_close(policy(x, t, torch.tensor([1, 2])), b.policy(x, t, bank[[1, 2]]))


def test_free_text_encoders(folders):
    b = load_bundle("wan", folders["wan"], resolution=RES["wan"], dtype=torch.float32, device="cpu",
                    max_sequence_length=MSL)
    cached = b.prompt_bank(TEXTS[:1])
    b.free_text_encoders()
    assert b.pipeline.text_encoder is None and b.pipeline.tokenizer is None
    with pytest.raises(RuntimeError, match="freed"):
        b.encode_prompts(TEXTS)
    assert b.decode(torch.zeros(1, *b.latent_shape)).shape == (1, 3, *RES["wan"])
    assert len(cached) == 2


# ----------------------------------------------------------------------------------------------- VAE


def _pipeline_decode(name, pipe, latents):
    """The pipelines' own decode path (the tail of their __call__), output_type="pt": pixels in [0, 1]."""
    with torch.no_grad():
        if name == "wan":
            mean = torch.tensor(pipe.vae.config.latents_mean).view(1, pipe.vae.config.z_dim, 1, 1, 1)
            inv_std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, pipe.vae.config.z_dim, 1, 1, 1)
            video = pipe.vae.decode(latents / inv_std + mean, return_dict=False)[0]
            return pipe.video_processor.postprocess_video(video, output_type="pt")  # [B, F, C, H, W]
        if name == "flux":  # the pipeline holds packed latents and unpacks them first
            h, w = RES["flux"]
            latents = pipe._unpack_latents(FluxPolicy.pack(latents), h, w, pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pt")


@pytest.mark.parametrize("name", ["sd3", "flux", "wan"])
def test_decode_matches_the_pipeline(bundles, references, name):
    b = bundles[name]
    latents = torch.randn(2, *b.latent_shape, generator=torch.Generator().manual_seed(3))
    ours = b.decode(latents)  # decode_batch=1: two VAE calls
    assert ours.shape == (2, 3, *b.resolution) and ours.dtype == torch.float32
    assert ours.min() >= -1 and ours.max() <= 1
    ref = _pipeline_decode(name, references[name], latents)
    if name == "wan":
        ref = ref.permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(ours / 2 + 0.5, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["sd3", "flux", "wan"])
def test_encode_is_the_inverse_direction(bundles, name):
    b = bundles[name]
    pixels = torch.rand(3, *b.pixel_shape, generator=torch.Generator().manual_seed(4)) * 2 - 1
    latents = b.encode(pixels)
    assert latents.shape == (3, *b.latent_shape) and latents.dtype == torch.float32
    assert b.decode(latents).shape == pixels.shape
    # the posterior's mode, normalised the way decode un-normalises it
    with torch.no_grad():
        z = b.vae.encode(pixels[:1]).latent_dist.mode()
    a, shift = b._norm(z)
    torch.testing.assert_close(latents[:1], (z - shift) * a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(latents[:1] / a + shift, z, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pixels"):
        b.encode(pixels[:, :, :-1])


# ----------------------------------------------------------------------------------------------- transformer


def _pipeline_velocity(name, pipe, latents, sigma, embeds, pooled, guidance):
    """One transformer call exactly as the pipeline's denoising loop makes it, at level sigma."""
    b = latents.shape[0]
    with torch.no_grad():
        if _kind(name) == "sd3":
            t = torch.full((b,), sigma * 1000.0)
            return pipe.transformer(hidden_states=latents, timestep=t, encoder_hidden_states=embeds,
                                    pooled_projections=pooled, return_dict=False)[0]
        if _kind(name) == "flux":
            _, c, h, w = latents.shape
            packed = pipe._pack_latents(latents, b, c, h, w)
            img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
            txt_ids = torch.zeros(embeds.shape[1], 3)
            g = torch.full([1], guidance, dtype=torch.float32).expand(b) if guidance is not None else None
            out = pipe.transformer(hidden_states=packed, timestep=torch.full((b,), sigma * 1000.0) / 1000, guidance=g,
                                   pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids,
                                   img_ids=img_ids, return_dict=False)[0]
            return pipe._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)
        return pipe.transformer(hidden_states=latents, timestep=torch.full((b,), sigma * 1000.0),
                                encoder_hidden_states=embeds, return_dict=False)[0]


@pytest.mark.parametrize("name", ["sd3", "flux", "flux_dev", "wan"])
def test_policy_matches_the_pipelines_transformer_call(bundles, references, name):
    b, pipe = bundles[name], references[name]
    cond = b.encode_prompts(TEXTS[:2])
    latents = torch.randn(2, *b.latent_shape, generator=torch.Generator().manual_seed(5))
    pipe.scheduler.set_timesteps(2, **({"mu": 0.8} if _kind(name) == "flux" else {}))
    sigma = float(pipe.scheduler.sigmas[1])  # the second level of a 2-step generation
    assert 0 < sigma < 1
    embeds, pooled = _pipeline_encode(name, pipe, TEXTS[:2])
    ref = _pipeline_velocity(name, pipe, latents, sigma, embeds, pooled, 3.5 if name == "flux_dev" else None)
    with torch.no_grad():
        ours = b.policy(latents, torch.full((2,), sigma), cond)
    assert ours.shape == latents.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- errors


@pytest.fixture
def no_weights(monkeypatch):
    """Any weight loading raises: the checks must fail first."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the inputs were checked")

    import transformers

    for cls in (diffusers.DiffusionPipeline, diffusers.ModelMixin, transformers.PreTrainedModel):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(refuse))


def _copy_without(src, dst, sub):
    shutil.copytree(src, dst)
    shutil.rmtree(dst / sub)
    return dst


def test_bad_inputs_fail_before_any_weight_is_loaded(folders, tmp_path, no_weights):
    def load(kind, path, resolution):
        return load_bundle(kind, path, resolution=resolution, dtype=torch.float32, device="cpu")

    with pytest.raises(ValueError, match=r"model\.kind.*unknown"):
        load("sdxl", folders["sd3"], (16, 16))
    with pytest.raises(FileNotFoundError, match=r"model\.path.*no model folder"):
        load("sd3", tmp_path / "missing", (16, 16))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"model\.path.*model_index\.json"):
        load("sd3", tmp_path / "empty", (16, 16))
    with pytest.raises(FileNotFoundError, match=r"model\.path.*model_index\.json"):
        load("sd3", folders["sd3"] / "transformer", (16, 16))
    with pytest.raises(ValueError, match=r"model\.kind.*StableDiffusion3Pipeline.*FluxPipeline"):
        load("sd3", folders["flux"], (16, 16))
    with pytest.raises(ValueError, match=r"model\.kind.*WanPipeline"):
        load("wan", folders["sd3"], (5, 16, 16))
    for kind, sub in (("sd3", "text_encoder_3"), ("flux", "vae"), ("wan", "text_encoder"), ("sd3", "transformer")):
        broken = _copy_without(folders[kind], tmp_path / f"{kind}_no_{sub}", sub)
        with pytest.raises(FileNotFoundError, match=rf"model\.path.*no {sub}/"):
            load(kind, broken, RES[kind])
    with pytest.raises(ValueError, match=r"model\.resolution.*divisible by 4"):
        load("sd3", folders["sd3"], (16, 18))
    with pytest.raises(ValueError, match=r"model\.resolution.*divisible by 4"):
        load("flux", folders["flux"], (10, 16))
    with pytest.raises(ValueError, match=r"model\.resolution.*pos_embed_max_size"):
        load("sd3", folders["sd3"], (256, 256))
    with pytest.raises(ValueError, match=r"model\.resolution.*4n \+ 1"):
        load("wan", folders["wan"], (4, 16, 16))
    with pytest.raises(ValueError, match=r"model\.resolution.*divisible by 16"):
        load("wan", folders["wan"], (5, 16, 24))
    with pytest.raises(ValueError, match=r"model\.resolution.*\[frames, height, width\]"):
        load("wan", folders["wan"], (16, 16))
    with pytest.raises(ValueError, match=r"model\.resolution.*\[height, width\]"):
        load("sd3", folders["sd3"], (16, 16.0))
    with pytest.raises(ValueError, match="guidance"):
        load_bundle("flux", folders["flux"], resolution=(16, 16), dtype=torch.float32, device="cpu", guidance=3.5)
    with pytest.raises(TypeError, match="dtype"):
        load_bundle("sd3", folders["sd3"], resolution=(16, 16), dtype=torch.int8, device="cpu")
    # the checks alone pass on the good folders, still without weights; loading them would read weights
    with pytest.raises(AssertionError, match="weights were loaded"):
        load("sd3", folders["sd3"], RES["sd3"])
    for kind in KINDS:
        assert preflight(kind, folders[kind], RES[kind]).latent_shape == LATENT[kind]
    assert preflight("sd3", folders["sd3"], 16).resolution == (16, 16)


def test_inconsistent_wan22_folders_are_refused_before_loading(folders, tmp_path, no_weights):
    """Wan2.2 variants load (TI2V-5B: tests/test_pipeline_run.py; two experts: tests/test_wan22_experts.py);
    a folder naming one half of the two-expert pair is one error naming the missing half."""
    import json

    for key, value, missing in (("transformer_2", ["diffusers", "WanTransformer3DModel"], "boundary_ratio"),
                                ("boundary_ratio", 0.875, "transformer_2")):
        folder = tmp_path / key
        shutil.copytree(folders["wan"], folder)
        index = json.loads((folder / "model_index.json").read_text())
        index[key] = value
        (folder / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match=missing):
            load_bundle("wan", folder, resolution=RES["wan"], dtype=torch.float32, device="cpu")