"""open_clip rewards from local folders (ddrl_engine.rewards.clip): a tiny random open_clip CLIP saved in the
hub layout (open_clip_config.json + open_clip_model.safetensors or open_clip_pytorch_model.bin, plus an
aesthetic head file), the rewards against a float64 computation written here (the model rebuilt in float64,
images resized with torchvision and cropped, cosine similarity / head output), the built-in "clip_score"
and "aesthetic" of a pipeline run (registry, video frames, a 2-step `ddrl-engine train`), and the errors
of folders of the wrong kind, raised before any weight (or the diffusion model) loads."""
import copy
import functools
import json
import pickle

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is an optional dependency (pip install ddrl-engine[clip])")

from ddrl_engine.rewards import build_named_rewards  # noqa: E402
from ddrl_engine.rewards.clip import (AestheticHead, AestheticReward, CLIPScoreReward, LinearAestheticHead,  # noqa: E402
                                      check_open_clip_folder)

EMBED = 16
IMAGE = 32
MODEL_CFG = {"embed_dim": EMBED,
             "vision_cfg": {"image_size": IMAGE, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
PREPROCESS = {"mean": [0.40, 0.45, 0.50], "std": [0.25, 0.30, 0.28], "interpolation": "bicubic",
              "resize_mode": "shortest"}
PROMPTS = ["a red car", "a photo of a cat", "two dogs on the beach", ""]
HEAD_FILE = {"mlp": "sac+logos+ava1-l14-linearMSE.pth", "linear": "sa_0_4_vit_l_14_linear.pth",
             "safetensors": "aesthetic_head.safetensors"}


def save_tiny_open_clip(folder, *, weights="safetensors", head=None, seed=0, model_cfg=MODEL_CFG):
    """A tiny random open_clip CLIP in the hub layout in `folder` (and an aesthetic head file when head is
    "mlp", "linear" or "safetensors" (an MLP as .safetensors)). Returns the folder."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**copy.deepcopy(model_cfg))
    with torch.no_grad():  # open_clip initialises some projections and biases to zero: make every part matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": PREPROCESS}))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights == "safetensors":
        save_file(state, folder / "open_clip_model.safetensors")
    elif weights == "bin":
        torch.save(state, folder / "open_clip_pytorch_model.bin")
    if head is not None:
        mod = LinearAestheticHead(model_cfg["embed_dim"]).linear if head == "linear" else AestheticHead(model_cfg["embed_dim"])
        with torch.no_grad():
            for p in mod.parameters():
                p.normal_(0.0, 0.5)
        if head == "safetensors":
            save_file(mod.state_dict(), folder / HEAD_FILE[head])
        else:
            torch.save(mod.state_dict(), folder / HEAD_FILE[head])
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("open_clip")
    return {"safetensors": save_tiny_open_clip(root / "clip_st"), "bin": save_tiny_open_clip(root / "clip_bin", weights="bin"),
            **{f"aesthetic_{h}": save_tiny_open_clip(root / f"aesthetic_{h}", head=h) for h in HEAD_FILE}}


# ---- the float64 reference ------------------------------------------------------------------------


def reference_model(folder):
    """The folder's CLIP rebuilt in float64 from its own files (state dict read directly)."""
    from safetensors.torch import load_file

    files = {p.name: p for p in folder.iterdir()}
    state = (load_file(files["open_clip_model.safetensors"]) if "open_clip_model.safetensors" in files
             else torch.load(files["open_clip_pytorch_model.bin"], weights_only=True))
    model = open_clip.CLIP(**copy.deepcopy(MODEL_CFG)).double().eval()
    model.load_state_dict({k: v.double() for k, v in state.items()})
    return model


def reference_pixels(samples):
    """[-1, 1] images -> the model input in float64: torchvision's resize of the shorter side to IMAGE
    (bicubic, antialiased), its center crop, then (x - mean) / std."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    x = (samples.double().clamp(-1, 1) + 1) / 2
    if min(x.shape[-2:]) != IMAGE:
        x = TF.resize(x, IMAGE, interpolation=InterpolationMode.BICUBIC, antialias=True)
    x = TF.center_crop(x, [IMAGE, IMAGE])
    mean = torch.tensor(PREPROCESS["mean"], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS["std"], dtype=torch.float64).view(1, 3, 1, 1)
    return (x - mean) / std


def reference_embeddings(folder, samples):
    model = reference_model(folder)
    with torch.no_grad():
        img = F.normalize(model.encode_image(reference_pixels(samples)), dim=-1)
        txt = F.normalize(model.encode_text(open_clip.tokenizer.SimpleTokenizer()(PROMPTS)), dim=-1)
    return img, txt


def images(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2.2 - 1.1  # a little outside [-1, 1]: clamped like decoded pixels


# ---- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("hw", [(IMAGE, IMAGE), (48, 64), (80, 40), (33, 33), (32, 51)])  # 51: a half-pixel crop
def test_clip_score_is_the_float64_cosine_similarity(folders, fmt, hw, seed):
    reward = CLIPScoreReward(PROMPTS, path=folders[fmt], batch_size=3)
    samples = images(5, *hw, seed)
    cond = torch.randint(0, len(PROMPTS), (5,))
    got = reward(samples, cond)
    img, txt = reference_embeddings(folders[fmt], samples)
    want = (img * txt[cond]).sum(-1)
    assert got.dtype == torch.float32 and got.shape == (5,)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
    assert want.std() > 1e-3  # the images and prompts score differently: the check can fail
    torch.testing.assert_close(reward.image_features(samples).double(), img, rtol=0, atol=2e-5)


def test_clip_score_decodes_first_and_checks_cond(folders):
    reward = CLIPScoreReward(PROMPTS, path=folders["safetensors"], decode=torch.tanh)
    z = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1)) * 2
    cond = torch.tensor([0, 1, 3])
    plain = CLIPScoreReward(PROMPTS, path=folders["safetensors"])
    assert torch.equal(reward(z, cond), plain(torch.tanh(z), cond))
    for bad, err in ((torch.tensor([0, 1]), ValueError), (torch.tensor([0, 1, 4]), ValueError),
                     (torch.tensor([0.0, 1.0, 2.0]), TypeError)):
        with pytest.raises(err, match="clip_score: cond"):
            plain(z, bad)
    with pytest.raises(ValueError, match=r"video \[B, 3, T, H, W\].*FrameAggregated"):
        plain(torch.zeros(1, 3, 2, IMAGE, IMAGE), torch.tensor([0]))


@pytest.mark.parametrize("head", ["mlp", "linear", "safetensors"])
def test_aesthetic_is_the_float64_head_of_the_normalised_embedding(folders, head, seed):
    folder = folders[f"aesthetic_{head}"]
    reward = AestheticReward(path=folder)
    samples = images(4, 40, 56, seed)
    got = reward(samples, torch.zeros(4, dtype=torch.long))
    img, _ = reference_embeddings(folder, samples)
    from safetensors.torch import load_file

    path = folder / HEAD_FILE[head]
    state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    h = {k: v.double() for k, v in state.items()}
    if head == "linear":
        want = img @ h["weight"][0] + h["bias"][0]
    else:  # the MLP: linear layers 0, 2, 4, 6, 7 with no activation between them (dropout is off in eval)
        x = img
        for i in (0, 2, 4, 6, 7):
            x = x @ h[f"layers.{i}.weight"].T + h[f"layers.{i}.bias"]
        want = x[:, 0]
    assert got.dtype == torch.float32 and got.shape == (4,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert want.std() > 1e-4


# ---- names in a pipeline run ----------------------------------------------------------------------


def test_registry_builds_both_by_name_and_is_picklable(folders):
    from ddrl_engine.trainer.pipeline_run import pipeline_reward_factories

    models = {"clip_score": str(folders["safetensors"]), "aesthetic": str(folders["aesthetic_mlp"])}
    build = functools.partial(build_named_rewards, {"clip_score": 1.0, "aesthetic": 0.5},
                              builtins=pipeline_reward_factories(), reward_models=models, prompts=PROMPTS)
    rewards = pickle.loads(pickle.dumps(build))()  # what reward workers do
    assert [r.name for r in rewards.rewards] == ["clip_score", "aesthetic"]
    assert list(rewards.weights) == [1.0, 0.5]
    samples, cond = images(2, IMAGE, IMAGE, 0), torch.tensor([0, 2])
    want = CLIPScoreReward(PROMPTS, path=folders["safetensors"])(samples, cond)
    assert torch.equal(rewards.rewards[0](samples, cond), want)


def test_video_models_score_every_frame_and_average(folders):
    from ddrl_engine.trainer.pipeline_run import pipeline_reward_factories

    rewards = build_named_rewards({"clip_score": 1.0}, builtins=pipeline_reward_factories(video=True),
                                  reward_models={"clip_score": str(folders["safetensors"])}, prompts=PROMPTS)
    (video_reward,) = rewards.rewards
    assert video_reward.name == "clip_score/frames_mean"
    videos = images(2, IMAGE, IMAGE * 3, 3).view(2, 3, IMAGE, 3, IMAGE).permute(0, 1, 3, 2, 4)  # [B, 3, T=3, H, W]
    cond = torch.tensor([1, 0])
    frames = CLIPScoreReward(PROMPTS, path=folders["safetensors"])
    want = torch.stack([frames(videos[:, :, t], cond) for t in range(3)], 1).mean(1)
    torch.testing.assert_close(video_reward(videos, cond), want, rtol=0, atol=1e-6)


# ---- folders of the wrong kind --------------------------------------------------------------------


@pytest.fixture
def nothing_builds(monkeypatch):
    """Building an open_clip model fails the test: the folder errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("an open_clip model was built before the folder was checked")

    monkeypatch.setattr(open_clip, "CLIP", refuse)
    monkeypatch.setattr(open_clip, "create_model", refuse)


def _bad_folders(root, folders):
    from tests.test_pickscore import save_tiny_clip

    bad = {}
    bad["missing"] = (root / "nope", FileNotFoundError, ["no model folder"])
    bad["transformers"] = (save_tiny_clip(root / "hf_clip"), FileNotFoundError,
                           ["no open_clip_config.json", "transformers model folder"])
    no_weights = root / "no_weights"
    no_weights.mkdir()
    (no_weights / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG}))
    bad["no_weights"] = (no_weights, FileNotFoundError, ["no weights file", "open_clip_model.safetensors"])
    no_cfg = root / "no_model_cfg"
    no_cfg.mkdir()
    (no_cfg / "open_clip_config.json").write_text(json.dumps({"preprocess_cfg": PREPROCESS}))
    bad["no_model_cfg"] = (no_cfg, ValueError, ["no model_cfg"])
    hf = root / "hf_tokenizer"
    hf.mkdir()
    cfg = copy.deepcopy(MODEL_CFG)
    cfg["text_cfg"]["hf_tokenizer_name"] = "some/tokenizer"
    (hf / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    bad["hf_tokenizer"] = (hf, ValueError, ["hf_tokenizer_name", "download"])
    return bad


@pytest.mark.parametrize("case", ["missing", "transformers", "no_weights", "no_model_cfg", "hf_tokenizer"])
def test_wrong_folders_are_clear_errors_before_any_weight(folders, tmp_path, case, nothing_builds):
    folder, err, needles = _bad_folders(tmp_path, folders)[case]
    for make in (lambda: CLIPScoreReward(PROMPTS, path=folder), lambda: AestheticReward(path=folder)):
        with pytest.raises(err) as e:
            make()
        for needle in needles + [str(folder)]:
            assert needle in str(e.value), (needle, str(e.value))


def test_aesthetic_folder_problems(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="no aesthetic head file"):
        AestheticReward(path=folders["safetensors"])  # a CLIP folder without a head
    two = save_tiny_open_clip(tmp_path / "two_heads", head="mlp")
    (two / HEAD_FILE["linear"]).write_bytes((folders["aesthetic_linear"] / HEAD_FILE["linear"]).read_bytes())
    with pytest.raises(ValueError, match="several aesthetic head files"):
        AestheticReward(path=two)
    wide = save_tiny_open_clip(tmp_path / "wide", head="mlp")
    torch.save(AestheticHead(EMBED + 1).state_dict(), wide / HEAD_FILE["mlp"])
    with pytest.raises(ValueError, match=r"head takes 17-d embeddings .* gives 16-d"):
        AestheticReward(path=wide)
    odd = save_tiny_open_clip(tmp_path / "odd", head="mlp")
    torch.save({"w": torch.zeros(2)}, odd / HEAD_FILE["mlp"])
    with pytest.raises(ValueError, match="neither the aesthetic-predictor MLP"):
        AestheticReward(path=odd)
    other = copy.deepcopy(MODEL_CFG)
    other["vision_cfg"]["width"] = 64
    mismatched = save_tiny_open_clip(tmp_path / "mismatch")
    (mismatched / "open_clip_config.json").write_text(json.dumps({"model_cfg": other}))
    with pytest.raises(ValueError, match="do not fit the model"):
        CLIPScoreReward(PROMPTS, path=mismatched)
    with pytest.raises(ValueError, match="exactly one"):
        CLIPScoreReward(PROMPTS)
    assert check_open_clip_folder(folders["bin"])[2].endswith("open_clip_pytorch_model.bin")


# ---- a pipeline run -------------------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (pip install ddrl-engine[diffusers])")
pytest.importorskip("peft", reason="peft is an optional dependency")

from tests.test_pipeline_run import assets, check_run, cli, config, metrics, write  # noqa: E402,F401  (assets: a fixture)


def test_two_step_pipeline_run_with_clip_score_and_aesthetic(assets, folders, tmp_path, capsys):
    c = config(assets, tmp_path / "run", "sd3", rewards={"clip_score": 1.0, "aesthetic": 0.5})
    c["reward_models"] = {"clip_score": str(folders["safetensors"]), "aesthetic": str(folders["aesthetic_mlp"])}
    rc, out, err = cli(capsys, "train", "--config", write(tmp_path / "run.toml", c))
    assert rc == 0, err
    check_run(tmp_path / "run", ".png")
    for m in metrics(tmp_path / "run", "eval"):
        clip, aes = m["reward/clip_score"], m["reward/aesthetic"]
        assert -1.0 <= clip <= 1.0
        assert m["reward"] == pytest.approx(1.0 * clip + 0.5 * aes, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("reward", ["clip_score", "aesthetic"])
def test_a_wrong_reward_folder_fails_before_the_diffusion_model_loads(assets, reward, tmp_path, capsys, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the reward folder was checked")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    c = config(assets, tmp_path / "run", "sd3", rewards={reward: 1.0})
    c["reward_models"] = {reward: str(assets["clip"])}  # PickScore's transformers folder: the wrong kind
    rc, out, err = cli(capsys, "train", "--config", write(tmp_path / "run.toml", c))
    assert rc == 2 and not out
    assert err.startswith("ddrl-engine train: error: "), err
    for needle in (f"reward_models.{reward}", str(assets["clip"]), "no open_clip_config.json"):
        assert needle in err, (needle, err)
    assert err.count("\n") <= 2  # one message
