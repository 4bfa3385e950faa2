"""Tiny random-weight diffusers pipeline folders, laid out like the hub repositories (tests only).

`make_sd3_pipeline(root)`, `make_flux_pipeline(root, guidance_embeds=False)` and
`make_wan_pipeline(root)` build the real diffusers / transformers classes at hidden sizes ~32 from a
fixed seed and `save_pretrained` them under root/<name>: model_index.json, transformer/, vae/,
text_encoder*/, tokenizer*/, scheduler/. Nothing is downloaded: the tokenizers are made here (a
byte-level BPE vocabulary for CLIP, a Unigram vocabulary for T5 / umT5), and model_index.json names
the tokenizer classes the hub repositories name (CLIPTokenizer, T5TokenizerFast). The same call
writes the same weights every time; a folder that is already complete is reused.

Resolutions the tiny models accept (VAE scale factor x patch size):
  SD3: VAE 2x, patch 2 -> pixels divisible by 4; latents [4, H/2, W/2].
  FLUX: VAE 2x, 2x2 packing -> pixels divisible by 4; latents [4, H/2, W/2] (in_channels 16).
  Wan: VAE 8x spatial / 4x temporal, patch (1, 2, 2) -> pixels divisible by 16, frames 4n + 1;
       latents [16, (F - 1)/4 + 1, H/8, W/8].
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

SEED = 0
CLIP_MAX_LENGTH = 16  # tokenizer.model_max_length of the tiny CLIP tokenizers (77 in the real ones)

# The hub repositories' tokenizer class names (transformers 5 loads both as its one tokenizers-backed class).
_HUB_TOKENIZER_NAMES = {"CLIPTokenizer": "CLIPTokenizer", "T5Tokenizer": "T5TokenizerFast"}

_WORDS = ("a photo of cat dog red blue green car tree house sky sun moon the an and on in with "
          "small big old new city river mountain flower bird fish boat").split()


def _clip_tokenizer():
    """A CLIP byte-level BPE tokenizer over a tiny vocabulary: each letter, each letter + '</w>', the
    merges that spell the words above, and the special tokens."""
    from transformers import CLIPTokenizer

    letters = sorted({ch for w in _WORDS for ch in w})
    vocab: dict[str, int] = {}
    for tok in letters + [ch + "</w>" for ch in letters]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _WORDS:  # left-to-right merges: "c a", "ca t</w>" ...
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            if (a, b) not in merges:
                merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
            pieces = [a + b] + pieces[2:]
    for tok in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(tok, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def _t5_tokenizer():
    """A T5 (Unigram, sentencepiece-style) tokenizer: pad 0, eos 1, unk 2, then the words."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -float(i + 1)) for i, w in enumerate(_WORDS)]
    vocab += [(ch, -100.0) for ch in sorted({ch for w in _WORDS for ch in w})]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _clip_text_encoder(cls_name: str, hidden: int, projection: int):
    import transformers

    tok = _clip_tokenizer()
    config = transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=projection,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return getattr(transformers, cls_name)(config).eval()


def _t5_encoder(cls_name: str, d_model: int):
    import transformers

    config_cls = transformers.UMT5Config if cls_name == "UMT5EncoderModel" else transformers.T5Config
    config = config_cls(vocab_size=len(_t5_tokenizer()) + 8, d_model=d_model, d_kv=8, d_ff=2 * d_model,
                        num_layers=2, num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0,
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return getattr(transformers, cls_name)(config).eval()


def _image_vae(latent_channels: int, scaling_factor: float, shift_factor: float):
    """A 2x AutoencoderKL (two blocks) with SD3/FLUX's convention: no quant convs, a shift factor."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=16, scaling_factor=scaling_factor,
        shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False).eval()


def _save(pipe, root: Path, name: str) -> Path:
    """Saves `pipe` as root/name (atomically: a private folder renamed into place); reuses a finished folder."""
    out = Path(root) / name
    if (out / "model_index.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        index_path = tmp / "model_index.json"
        index = json.loads(index_path.read_text())
        for key, value in index.items():
            if isinstance(value, list) and len(value) == 2 and value[1] in _HUB_TOKENIZER_NAMES:
                index[key] = [value[0], _HUB_TOKENIZER_NAMES[value[1]]]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            if not (out / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def make_sd3_pipeline(root) -> Path:
    """A tiny StableDiffusion3Pipeline folder (two CLIPs with projection, T5, a 4-channel 2x VAE)."""
    import diffusers

    torch.manual_seed(SEED)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=16)
    vae = _image_vae(4, scaling_factor=1.5305, shift_factor=0.0609)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=_clip_text_encoder("CLIPTextModelWithProjection", 16, 16), tokenizer=_clip_tokenizer(),
        text_encoder_2=_clip_text_encoder("CLIPTextModelWithProjection", 16, 16), tokenizer_2=_clip_tokenizer(),
        text_encoder_3=_t5_encoder("T5EncoderModel", 32), tokenizer_3=_t5_tokenizer())
    return _save(pipe, root, "sd3")


def make_flux_pipeline(root, guidance_embeds: bool = False) -> Path:
    """A tiny FluxPipeline folder (CLIP for the pooled embedding, T5 for the tokens); guidance_embeds=True
    is FLUX.1-dev's guidance-distilled form."""
    import diffusers

    torch.manual_seed(SEED)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6))
    vae = _image_vae(4, scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    pipe = diffusers.FluxPipeline(
        scheduler=scheduler, vae=vae,
        text_encoder=_clip_text_encoder("CLIPTextModel", 16, 16), tokenizer=_clip_tokenizer(),
        text_encoder_2=_t5_encoder("T5EncoderModel", 32), tokenizer_2=_t5_tokenizer(),
        transformer=transformer.eval())
    return _save(pipe, root, "flux_dev" if guidance_embeds else "flux")


def make_wan22_ti2v_pipeline(root) -> Path:
    """A tiny Wan2.2-TI2V-5B-like WanPipeline folder: the Wan2.2 VAE (residual, patchified pixels,
    16x spatial compression, 48-channel latents in the real one), expand_timesteps = true (per-token
    timesteps), a flow-matching Euler scheduler with shift 5."""
    import diffusers

    torch.manual_seed(SEED)
    z = 8
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=z, out_channels=z,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)
    vae = diffusers.AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                                     out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                                     latents_mean=[0.1 * i for i in range(z)], latents_std=[1.0 + 0.1 * i for i in range(z)])
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0)
    pipe = diffusers.WanPipeline(tokenizer=_t5_tokenizer(), text_encoder=_t5_encoder("UMT5EncoderModel", 32),
                                 vae=vae.eval(), scheduler=scheduler, transformer=transformer.eval(),
                                 expand_timesteps=True)
    return _save(pipe, root, "wan22_ti2v")


def make_wan_pipeline(root) -> Path:
    """A tiny WanPipeline folder (Wan2.1 text-to-video: umT5, the causal 3D VAE, UniPC flow scheduler)."""
    import diffusers

    torch.manual_seed(SEED)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0, num_train_timesteps=1000)
    pipe = diffusers.WanPipeline(tokenizer=_t5_tokenizer(), text_encoder=_t5_encoder("UMT5EncoderModel", 32),
                                 vae=vae.eval(), scheduler=scheduler, transformer=transformer.eval())
    return _save(pipe, root, "wan")


def make_wan22_a14b_pipeline(root, boundary_ratio: float = 0.875) -> Path:
    """A tiny two-expert Wan2.2-T2V-A14B-like WanPipeline folder: `transformer` (high noise) and
    `transformer_2` (low noise), random and distinct (seeds SEED and SEED + 1), boundary_ratio 0.875 (the
    real T2V-A14B's), the Wan2.1 VAE and UniPC flow scheduler of `make_wan_pipeline`."""
    import diffusers

    def expert(seed):
        torch.manual_seed(seed)
        return diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32).eval()

    high, low = expert(SEED), expert(SEED + 1)
    torch.manual_seed(SEED)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0, num_train_timesteps=1000)
    pipe = diffusers.WanPipeline(tokenizer=_t5_tokenizer(), text_encoder=_t5_encoder("UMT5EncoderModel", 32),
                                 vae=vae.eval(), scheduler=scheduler, transformer=high, transformer_2=low,
                                 boundary_ratio=boundary_ratio)
    return _save(pipe, root, f"wan22_a14b_{boundary_ratio:g}")
