"""PickScoreReward on a tiny random CLIPModel saved to a temp folder (the real classes, no download):
scores against a float64 reference, prompt indexing, tensor preprocessing against the processor on
PIL images, folder errors before any weight loads, image features, and the same scores from
AsyncReward workers and behind serve_reward."""

import functools
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="transformers is an optional dependency (pip install ddrl-engine[pickscore])")

from ddrl_engine.rewards import FrameAggregated, HttpReward, PickScoreReward, Reward, serve_reward  # noqa: E402
from ddrl_engine.rewards.async_rewards import AsyncReward  # noqa: E402

PROMPTS = ["a cat", "a dog on the sun", "sun", ""]  # the last id: the empty (null) prompt
IMAGE_SIZE = 32


def _tiny_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    for suffix in ("", "</w>"):
        for ch in letters:
            vocab[ch + suffix] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>"), ("s", "u"), ("su", "n</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)


def _tiny_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def save_tiny_clip(folder, *, processor=True, seed=0):
    """A tiny random CLIPModel (hidden 32, 2 layers, image 32, patch 8) and its processor in `folder`."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    tok = _tiny_tokenizer()
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=len(tok), max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    with torch.no_grad():
        model.logit_scale.fill_(np.log(50.0))  # a scale unlike the init, to catch a missing exp()
    model.save_pretrained(folder)
    if processor:
        CLIPProcessor(image_processor=_tiny_image_processor(), tokenizer=tok).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return str(save_tiny_clip(tmp_path_factory.mktemp("tiny_clip")))


@pytest.fixture(scope="module")
def reward(clip_dir):
    return PickScoreReward(clip_dir, PROMPTS, batch_size=4)


def _images(n, h=IMAGE_SIZE, w=IMAGE_SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1


def _reference(clip_dir, pixel_values, texts):
    """[B, P] exp(logit_scale) * cos(image, text) in float64, each text tokenised on its own."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).double().eval()
    tok = _tiny_tokenizer()

    def pooled(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():
        img = pooled(model.get_image_features(pixel_values=pixel_values.double()))
        txt = torch.cat([pooled(model.get_text_features(**tok([t], return_tensors="pt"))) for t in texts])
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        return model.logit_scale.exp() * img @ txt.T


# --- scores -----------------------------------------------------------------------------------------


def test_scores_equal_a_float64_reference_and_index_the_prompts(clip_dir, reward):
    assert isinstance(reward, Reward) and reward.name == "pickscore"
    x = _images(6)
    cond = torch.tensor([3, 0, 1, 2, 0, 1])
    got = reward(x, cond)
    assert got.shape == (6,) and got.dtype == torch.float32
    table = _reference(clip_dir, reward.pixel_values(x), PROMPTS)  # [6, 4]
    want = table[torch.arange(6), cond]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert abs(reward.logit_scale - 50.0) < 1e-3
    # each id scores against its own text: every prompt column, and a permuted cond follows it
    for p in range(len(PROMPTS)):
        torch.testing.assert_close(reward(x, torch.full((6,), p)).double(), table[:, p], rtol=1e-5, atol=1e-4)
    assert not torch.allclose(table[:, 0], table[:, 1])  # the prompts really differ


def test_text_embeddings_are_cached_and_the_model_frozen(reward, monkeypatch):
    assert reward.text_embeds.shape == (len(PROMPTS), 16)
    torch.testing.assert_close(reward.text_embeds.norm(dim=-1), torch.ones(len(PROMPTS)))
    assert not reward.model.training and not any(p.requires_grad for p in reward.model.parameters())
    monkeypatch.setattr(reward.model, "get_text_features", lambda *a, **k: pytest.fail("text re-embedded per call"))
    reward(_images(2), torch.tensor([0, 1]))


def test_image_features_and_batching(clip_dir, reward):
    x = _images(7, seed=1)
    feats = reward.image_features(x)
    assert feats.shape == (7, 16) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(7))
    raw = reward.image_features(x, normalize=False)
    torch.testing.assert_close(F.normalize(raw, dim=-1), feats)
    one_batch = PickScoreReward(clip_dir, PROMPTS, batch_size=64)  # batch_size 4 above: two chunks
    torch.testing.assert_close(one_batch.image_features(x), feats, rtol=1e-5, atol=1e-5)
    cond = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    torch.testing.assert_close(one_batch(x, cond), reward(x, cond), rtol=1e-5, atol=1e-4)
    assert reward.image_features(x[:0]).shape == (0, 16)


def test_bfloat16_model_scores_close_to_float32(clip_dir, reward):
    bf16 = PickScoreReward(clip_dir, PROMPTS, dtype=torch.bfloat16)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    x, cond = _images(4, seed=2), torch.tensor([0, 1, 2, 3])
    got = bf16(x, cond)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reward(x, cond), rtol=0, atol=0.1 * 50)  # 50 = the scale; cos error ~1e-2


# --- preprocessing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(32, 32), (40, 48), (48, 40), (24, 20), (64, 37)])
def test_tensor_preprocessing_matches_the_processor_on_pil_images(clip_dir, reward, hw):
    """Resize (shortest edge) + center crop + normalise on tensors vs the folder's processor on PIL
    images of the same uint8 pixels (noise: the hardest case for resize overshoot): equal up to
    PIL's uint8 rounding between and after its resize passes."""
    from PIL import Image
    from transformers import AutoProcessor

    x = _images(3, *hw, seed=3)
    u8 = ((x + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8)
    x_q = u8.float() / 255 * 2 - 1  # exactly the pixels the PIL images hold
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in u8]
    processor = AutoProcessor.from_pretrained(clip_dir, local_files_only=True)
    want = processor(images=pil, return_tensors="pt")["pixel_values"].float()
    got = reward.pixel_values(x_q)
    assert got.shape == want.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    step = 1 / 255 / min(processor.image_processor.image_std)  # one uint8 step, normalised
    err = (got - want).abs()
    assert err.max() <= 1.5 * step and err.mean() <= 0.5 * step, (err.max() / step, err.mean() / step)
    # scores through either preprocessing agree closely
    cond = torch.tensor([0, 1, 2])
    table = _reference(clip_dir, want, PROMPTS)[torch.arange(3), cond]
    torch.testing.assert_close(reward(x_q, cond).double(), table, rtol=0, atol=0.05 * reward.logit_scale)


def test_separate_processor_folder_and_legacy_file_names(clip_dir, tmp_path):
    """PickScore's layout: model folder without processor files, the processor in another folder
    (written as preprocessor_config.json + tokenizer files)."""
    model_dir = save_tiny_clip(tmp_path / "model", processor=False)
    proc_dir = tmp_path / "processor"
    _tiny_image_processor().save_pretrained(proc_dir)
    _tiny_tokenizer().save_pretrained(proc_dir)
    assert (proc_dir / "preprocessor_config.json").is_file()
    with pytest.raises(FileNotFoundError, match="no image-processor config"):
        PickScoreReward(model_dir, PROMPTS)
    r = PickScoreReward(model_dir, PROMPTS, processor_path=proc_dir)
    x, cond = _images(3), torch.tensor([0, 3, 1])
    torch.testing.assert_close(r(x, cond), PickScoreReward(clip_dir, PROMPTS)(x, cond), rtol=1e-5, atol=1e-4)


# --- errors ----------------------------------------------------------------------------------------------


def test_folder_errors_come_before_any_weight_loads(clip_dir, tmp_path, monkeypatch):
    from transformers import CLIPModel

    monkeypatch.setattr(CLIPModel, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded before the checks"))
    with pytest.raises(FileNotFoundError, match="no model folder.*local folders only"):
        PickScoreReward(tmp_path / "missing", PROMPTS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        PickScoreReward(tmp_path / "empty", PROMPTS)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert' model.*not a CLIP model"):
        PickScoreReward(bert, PROMPTS)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(clip_dir, no_weights)
    os.remove(no_weights / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        PickScoreReward(no_weights, PROMPTS)
    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(clip_dir, no_tok)
    os.remove(no_tok / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        PickScoreReward(no_tok, PROMPTS)
    with pytest.raises(FileNotFoundError, match="no processor folder"):
        PickScoreReward(clip_dir, PROMPTS, processor_path=tmp_path / "nowhere")
    for bad in ([], "a cat"):
        with pytest.raises(ValueError, match="non-empty sequence"):
            PickScoreReward(clip_dir, bad)
    with pytest.raises(TypeError, match="must all be str"):
        PickScoreReward(clip_dir, ["a cat", 3])


def test_call_errors(reward):
    x = _images(2)
    with pytest.raises(ValueError, match=r"prompt ids in \[0, 4\)"):
        reward(x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"tensor \[B\]=\[2\]"):
        reward(x, torch.tensor([0]))
    with pytest.raises(TypeError, match="integer prompt ids"):
        reward(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="FrameAggregated"):
        reward(torch.zeros(2, 3, 4, 32, 32), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"images \[B, 3, H, W\]"):
        reward(torch.zeros(2, 1, 32, 32), torch.tensor([0, 1]))


# --- video, workers, HTTP ------------------------------------------------------------------------------


def test_frame_aggregated_pickscore_on_video(reward):
    video = torch.stack([_images(2, seed=s) for s in range(3)], dim=2)  # [2, 3, T=3, 32, 32]
    cond = torch.tensor([1, 3])
    per_frame = torch.stack([reward(video[:, :, t], cond) for t in range(3)], dim=1)
    for reduce, want in [("mean", per_frame.mean(1)), ("min", per_frame.amin(1)), ("max", per_frame.amax(1))]:
        agg = FrameAggregated(reward, reduce)
        assert agg.name == f"pickscore/frames_{reduce}"
        torch.testing.assert_close(agg(video, cond), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(FrameAggregated(reward, "mean", frames=[-1])(video, cond), per_frame[:, 2],
                               rtol=1e-5, atol=1e-4)


def test_async_reward_workers_give_the_in_process_scores(clip_dir, reward):
    x, cond = _images(5, seed=4), torch.tensor([0, 1, 2, 3, 1])
    factory = functools.partial(PickScoreReward, clip_dir, PROMPTS, batch_size=4)
    with AsyncReward(factory, workers=1, timeout_s=120, retries=0, on_failure="raise") as rewards:
        batch = rewards.evaluate(x, cond)
        assert rewards.reward_spec() == (["pickscore"], [1.0])
    torch.testing.assert_close(batch.components["pickscore"], reward(x, cond), rtol=1e-5, atol=1e-4)


def test_served_pickscore_gives_the_in_process_scores(reward):
    x, cond = _images(3, seed=5), torch.tensor([2, 0, 3])
    with serve_reward(reward) as server:
        got = HttpReward(server.url, name="pickscore")(x, cond)
    torch.testing.assert_close(got, reward(x, cond), rtol=0, atol=0)
