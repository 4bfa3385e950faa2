"""The per-GPU memory estimate (ddrl_engine.trainer.memory): the parts that can be checked exactly
(weights, gradients and AdamW states of a real model after an optimizer step, one process and FSDP2
shards at world size 2), the preset counts, the measured activation factors, and the errors."""
import json
import math

import pytest
import torch

from ddrl_engine.cli import main
from ddrl_engine.trainer.memory import (ACTIVATION_FACTORS, GIB, PRESETS, RESOLUTIONS, ModelShape, estimate_memory,
                                        saved_tensor_bytes, video_tokens)

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (pip install ddrl-engine[diffusers])")

from ddrl_engine.models.diffusers import WanPolicy  # noqa: E402

SHAPE = (4, 3, 8, 8)  # C, T, H, W: 3 x 4 x 4 = 48 tokens with 1x2x2 patches


def tiny_wan_policy(layers=2, ffn=96, dtype=torch.float32):
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=ffn, num_layers=layers, rope_max_seq_len=32)
    return WanPolicy(model.to(dtype), SHAPE)


def one_step(policy):
    """Forward, backward and one AdamW step; returns the optimizer."""
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    x = torch.randn(2, *SHAPE)
    policy(x, torch.rand(2), torch.randn(2, 5, 16)).square().mean().backward()
    opt.step()
    return opt


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def held_bytes(policy, opt) -> dict:
    """Bytes this process holds of weights, gradients and AdamW moments (local shards under FSDP2)."""
    nbytes = lambda ts: sum(_local(t).numel() * _local(t).element_size() for t in ts)  # noqa: E731
    params = list(policy.parameters())
    moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    return {"weights (fp32)": nbytes(params), "gradients (fp32)": nbytes(p.grad for p in params),
            "AdamW states (fp32)": nbytes(moments)}


def test_one_process_matches_a_real_model_after_an_optimizer_step():
    policy = tiny_wan_policy()
    opt = one_step(policy)
    est = estimate_memory(policy, tokens=48, world_size=1, parallel="none")
    shape = ModelShape.from_module(policy)
    assert (shape.num_blocks, shape.hidden, shape.ffn_dim, shape.latent_per_token) == (2, 64, 96, 16)
    assert shape.params == sum(p.numel() for p in policy.parameters())
    assert shape.block_params == sum(p.numel() for p in policy.model.blocks[0].parameters())
    got = held_bytes(policy, opt)
    assert {k: est.parts[k] for k in got} == got
    assert "FSDP2 unsharded in flight" not in est.parts


def _lora_held_bytes(policy, opt, dtype="fp32") -> dict:
    """held_bytes of a LoRA policy: the frozen base, and the adapters with their gradients and moments."""
    nbytes = lambda ts: sum(_local(t).numel() * _local(t).element_size() for t in ts)  # noqa: E731
    trained = [p for p in policy.parameters() if p.requires_grad]
    moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    return {f"frozen base ({dtype})": nbytes(p for p in policy.parameters() if not p.requires_grad),
            "LoRA weights (fp32)": nbytes(trained), "LoRA gradients (fp32)": nbytes(p.grad for p in trained),
            "LoRA AdamW states (fp32)": nbytes(moments)}


def _fsdp_worker(rank: int, world: int, store: str, out: str, lora_rank: int, dtype: str) -> None:
    import torch.distributed as dist

    from ddrl_engine.trainer.distributed import Distributed

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        policy = tiny_wan_policy(dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
        if lora_rank:
            policy.enable_lora(lora_rank, seed=0)  # fp32 adapters on a bf16 base: FSDP2 shards both dtypes
        Distributed("fsdp", rank, world, "cpu").fully_shard(policy)
        torch.manual_seed(1)  # the same batch on every rank
        opt = one_step(policy)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(_lora_held_bytes(policy, opt, dtype) if lora_rank else held_bytes(policy, opt), f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank,dtype", [(0, "fp32"), (3, "fp32"), (3, "bf16")])
def test_fsdp2_shards_match_at_world_size_2(tmp_path, lora_rank, dtype):
    """FSDP2 shards of a full and a LoRA fine-tune (the frozen base is sharded too; rank 3: odd rows); a
    LoRA run's adapters are fp32 on a bf16 base."""
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "held"), lora_rank, dtype), nprocs=2)
    ranks = [json.loads((tmp_path / f"held.{r}").read_text()) for r in range(2)]
    policy = tiny_wan_policy()
    est = estimate_memory(policy, tokens=48, world_size=2, lora_rank=lora_rank, dtype=dtype)
    base = (4 if dtype == "fp32" else 2) * sum(p.numel() for p in policy.parameters())
    total = 4 * ModelShape.from_module(policy).lora_params(lora_rank) if lora_rank else base
    pre = "LoRA " if lora_rank else ""
    parts = [(f"{pre}weights (fp32)", 1), (f"{pre}gradients (fp32)", 1), (f"{pre}AdamW states (fp32)", 2)]
    for part, factor in parts + ([(f"frozen base ({dtype})", 1)] if lora_rank else []):
        # The estimate is the largest rank's shard (rank 0: ceil(rows / 2) rows of every parameter).
        assert est.parts[part] == max(r[part] for r in ranks) == ranks[0][part], part
        assert sum(r[part] for r in ranks) == factor * (base if part.startswith("frozen") else total), part


def test_world_size_scaling():
    shape = ModelShape.from_module(tiny_wan_policy())
    rows = shape.param_rows
    for w in (1, 2, 3, 8, 1000):
        want = sum(math.ceil(r / w) * (n // r) for r, n in rows)
        assert shape.shard(w) == want
        est = estimate_memory(shape, tokens=48, world_size=w, kl_reference=True, ema=True)
        for part in ("weights (fp32)", "gradients (fp32)", "KL reference (fp32)", "EMA weights (fp32)"):
            assert est.parts[part] == 4 * want
        assert est.parts["AdamW states (fp32)"] == 8 * want
    big = ModelShape(params=10**9, block_params=10**7, num_blocks=40, hidden=1024, ffn_dim=4096)
    a, b = (estimate_memory(big, tokens=1000, world_size=w) for w in (8, 64))
    assert a.parts["weights (fp32)"] == 4 * 10**9 // 8 and b.parts["weights (fp32)"] == 4 * 10**9 // 64
    for part in ("activations", "FSDP2 unsharded in flight", "rollout states + data latents"):
        assert a.parts[part] == b.parts[part]  # per-rank work does not shrink with more GPUs
    ddp = estimate_memory(big, tokens=1000, world_size=64, parallel="ddp")
    assert ddp.parts["weights (fp32)"] == 4 * 10**9 and ddp.parts["gradients (fp32)"] == 8 * 10**9  # + buckets


def test_activation_terms():
    shape = ModelShape(params=10**9, block_params=10**7, num_blocks=40, hidden=1024, ffn_dim=4096)
    ah, af, ao = ACTIVATION_FACTORS[2]
    full = estimate_memory(shape, tokens=1000, world_size=8, rollout_per_rank=2, data_per_rank=1)
    # One backward per loss: the larger of the rollout and data batches is alive at a time.
    assert full.parts["activations"] == 2 * 1000 * (40 * (ah * 1024 + af * 4096) + ao * 1024)
    ckpt = estimate_memory(shape, tokens=1000, world_size=8, activation_checkpointing=True)
    assert ckpt.parts["activations (checkpointed)"] == 1000 * (40 * 2 * 1024 + ah * 1024 + af * 4096 + ao * 1024)
    ah4, af4, ao4 = ACTIVATION_FACTORS[4]  # DDP and one process compute in the fp32 weights
    ddp = estimate_memory(shape, tokens=1000, world_size=8, parallel="ddp", data_per_rank=0)
    assert ddp.parts["activations"] == 1000 * (40 * (ah4 * 1024 + af4 * 4096) + ao4 * 1024)
    # optim.micro_batch bounds the rows alive in one forward/backward.
    micro = estimate_memory(shape, tokens=1000, world_size=8, rollout_per_rank=4, data_per_rank=4, micro_batch=1)
    assert micro.parts["activations"] == full.parts["activations"] / 2
    with pytest.raises(ValueError, match="micro_batch"):
        estimate_memory(shape, tokens=1000, world_size=8, micro_batch=-1)


def _mmdit_block_bytes(per_token, dtype):
    """per_token(policy) -> (image, text) saved bytes per token, on tiny SD3 / FLUX models of 1-2 blocks:
    (the one-block models' figures by family, the per-block figures by block kind)."""
    from ddrl_engine.models.diffusers import FluxPolicy, SD3Policy

    sd3 = {k: per_token(SD3Policy(_tiny_sd3(*a, dtype=dtype), (4, 8, 8))) for k, a in
           {"1": (1, ()), "2": (2, ()), "2dual": (2, (0,))}.items()}
    flux = {k: per_token(FluxPolicy(_tiny_flux(*a, dtype=dtype), (4, 8, 8))) for k, a in
            {"10": (1, 0), "20": (2, 0), "11": (1, 1)}.items()}
    block = {"sd3": [b - a for a, b in zip(sd3["1"], sd3["2"])],
             "sd3_dual": [b - a + d for a, b, d in zip(sd3["1"], sd3["2"], (sd3["2dual"][0] - sd3["2"][0], 0))],
             "flux_double": [b - a for a, b in zip(flux["10"], flux["20"])],
             "flux_single": [b - a for a, b in zip(flux["10"], flux["11"])]}
    return {"sd3": sd3["1"], "flux": flux["10"]}, block


def _wan_saved_bytes_per_token(policy, dtype) -> float:
    """Bytes autograd saves per extra video token of one Wan forward (two sizes, the difference)."""
    sizes = []
    for hw in (8, 16):
        x = torch.randn(1, 4, 2, hw, hw, dtype=dtype)
        fn = lambda: policy.model(hidden_states=x, timestep=torch.tensor([500.0]),  # noqa: E731
                                  encoder_hidden_states=torch.randn(1, 5, 16, dtype=dtype), return_dict=False)
        sizes.append((2 * hw * hw // 4, saved_tensor_bytes(fn, list(policy.parameters()) + [x])))
    (n1, b1), (n2, b2) = sizes
    return (b2 - b1) / (n2 - n1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_activation_factors_match_what_autograd_saves(dtype):
    """Re-measures ACTIVATION_FACTORS: saved bytes per token of a Wan model at 1 and 2 blocks, two FFN widths."""
    def per_token(layers, ffn):
        policy = tiny_wan_policy(layers=layers, ffn=ffn, dtype=dtype)
        policy.model.requires_grad_(True)
        return _wan_saved_bytes_per_token(policy, dtype)

    ah, af, ao = ACTIVATION_FACTORS[dtype.itemsize]
    hidden = 64
    for ffn in (128, 512):
        one, two = per_token(1, ffn), per_token(2, ffn)
        block = two - one
        assert block == pytest.approx(ah * hidden + af * ffn, rel=0.1), (ffn, block)
        assert one - block == pytest.approx(ao * hidden, rel=0.35), (ffn, one - block)


def _default_lora_targets():
    from ddrl_engine.trainer.config import PipelineModelConfig

    return PipelineModelConfig().lora_targets


def adapted_linears(module) -> list:
    """The Linears the default lora_targets name, matched as peft matches them (the name or a '.'-suffix)."""
    targets = _default_lora_targets()
    return [m for name, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)]


def test_presets_match_the_diffusers_models():
    from ddrl_engine.models.diffusers import WanExpertsPolicy

    assert set(PRESETS) == {"sd3.5-medium", "sd3.5-large", "flux.1-dev", "wan2.1-1.3b", "wan2.1-14b", "wan2.2-a14b"}
    for name, preset in PRESETS.items():
        with torch.device("meta"):
            experts = [getattr(diffusers, preset.model_class)(**preset.config) for _ in range(preset.shape.experts)]
        model = experts[0] if len(experts) == 1 else WanExpertsPolicy(*experts, (16, 21, 60, 104), boundary_ratio=0.875)
        shape = ModelShape.from_module(model)
        s = preset.shape
        assert (shape.params, shape.block_params, shape.num_blocks, shape.hidden, shape.ffn_dim, shape.latent_per_token,
                shape.family, shape.block_kinds, shape.blocks_total, shape.root_params, shape.experts) \
            == (s.params, s.block_params, s.num_blocks, s.hidden, s.ffn_dim, s.latent_per_token,
                s.family, s.block_kinds, s.blocks_total, s.root_params, s.experts), name
        assert shape.params == sum(p.numel() for p in model.parameters()), name
        # LoRA: every adapted Linear is h -> h and gets R (in + out) parameters
        linears = adapted_linears(model)
        assert all(m.in_features == m.out_features == s.hidden for m in linears), name
        assert s.lora_params(16) == 16 * sum(m.in_features + m.out_features for m in linears), name
    assert PRESETS["wan2.2-a14b"].shape.params == 2 * PRESETS["wan2.1-14b"].shape.params
    assert PRESETS["wan2.2-a14b"].config == PRESETS["wan2.1-14b"].config
    assert PRESETS["wan2.1-1.3b"].shape.hidden == 1536 and PRESETS["wan2.1-14b"].shape.hidden == 5120
    assert video_tokens(*RESOLUTIONS["480p"]) == 21 * 30 * 52 == 32_760
    assert video_tokens(*RESOLUTIONS["720p"]) == 21 * 45 * 80 == 75_600


def test_bad_inputs_name_the_argument():
    shape = PRESETS["wan2.1-1.3b"].shape
    cases = [(dict(world_size=0), "'world_size'"), (dict(tokens=-5), "'tokens'"), (dict(tokens=1.5), "'tokens'"),
             (dict(parallel="zero3"), "'parallel'"), (dict(parallel="none", world_size=8), "'world_size' must be 1"),
             (dict(rollout_per_rank=0, data_per_rank=0), "'rollout_per_rank' \\+ 'data_per_rank'"),
             (dict(rollout_per_rank=-1), "'rollout_per_rank'"), (dict(prompts=True), "'prompts'")]
    for kwargs, match in cases:
        args = dict(tokens=1000, world_size=8) | kwargs
        with pytest.raises(ValueError, match=match):
            estimate_memory(shape, **args)
    with pytest.raises(ValueError, match="ModelShape.hidden"):
        ModelShape(params=10, block_params=1, num_blocks=2, hidden=0, ffn_dim=4)
    with pytest.raises(ValueError, match="exceeds params"):
        ModelShape(params=10, block_params=6, num_blocks=2, hidden=4, ffn_dim=4)
    with pytest.raises(ValueError, match="no `blocks`"):
        estimate_memory(torch.nn.Linear(2, 2), tokens=10, world_size=1)
    with pytest.raises(ValueError, match="'frames' - 1 must be divisible by 4"):
        video_tokens(80, 480, 832)
    with pytest.raises(ValueError, match="latent height"):
        video_tokens(81, 8, 832)


def test_cli(capsys):
    assert main(["memory", "--preset", "wan2.1-14b", "--resolution", "720p", "--world-size", "64",
                 "--activation-checkpointing", "--ema"]) == 0
    out = capsys.readouterr().out
    est = estimate_memory(PRESETS["wan2.1-14b"].shape, tokens=75_600, world_size=64, activation_checkpointing=True,
                          ema=True)
    assert "75,600 tokens" in out and "EMA weights" in out and f"{est.total / GIB:9.2f} GiB" in out
    assert "not measured" in out
    assert main(["memory", "--params", "1000000000", "--block-params", "20000000", "--blocks", "40", "--hidden",
                 "2048", "--ffn-dim", "8192", "--tokens", "4096", "--world-size", "8", "16"]) == 0
    assert capsys.readouterr().out.count("total (estimate)") == 2
    assert main(["memory", "--summary", "--world-size", "8"]) == 0
    assert "| wan2.1-14b | 720p" in capsys.readouterr().out
    assert main(["memory", "--preset", "wan2.1-1.3b", "--params", "10"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["memory", "--params", "10"]) == 2
    assert "missing --block-params" in capsys.readouterr().err
    assert main(["memory", "--preset", "wan2.1-1.3b", "--world-size", "0"]) == 2
    assert "'world_size'" in capsys.readouterr().err


# ---- SD3.5 / FLUX presets (MMDiT: text tokens through every block), guidance -------------------------

from ddrl_engine.trainer.memory import (BLOCK_FACTORS, GPUS, IMAGE_RESOLUTIONS, OUT_FACTORS,  # noqa: E402
                                        image_tokens, preset_tokens)

# The published shapes, written out here (transformer/config.json of each repository): hidden = heads x head_dim.
PUBLISHED = {"sd3.5-medium": dict(hidden=24 * 64, blocks=24, kinds=(("sd3_dual", 13), ("sd3", 11)), text=77 + 256),
             "sd3.5-large": dict(hidden=38 * 64, blocks=38, kinds=(("sd3", 38),), text=77 + 256),
             "flux.1-dev": dict(hidden=24 * 128, blocks=57, kinds=(("flux_double", 19), ("flux_single", 38)), text=512)}


def test_image_presets_have_the_published_shapes():
    for name, want in PUBLISHED.items():
        s = PRESETS[name].shape
        assert (s.hidden, s.num_blocks, s.block_kinds, s.text_tokens, s.latent_per_token) == \
            (want["hidden"], want["blocks"], want["kinds"], want["text"], 64), name
        assert not PRESETS[name].video
    assert round(PRESETS["flux.1-dev"].shape.params / 1e9, 1) == 11.9  # "12B" in the model card
    assert round(PRESETS["sd3.5-large"].shape.params / 1e9, 1) == 8.1
    assert image_tokens(1024, 1024) == 64 * 64 and image_tokens(512, 768) == 32 * 48
    assert preset_tokens(PRESETS["sd3.5-medium"], "512px") == (1024, "512px 512x512")


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("ckpt", [False, True])
def test_presets_grow_with_batch_and_resolution(name, ckpt):
    preset = PRESETS[name]
    sizes = [preset_tokens(preset, r)[0] for r in (RESOLUTIONS if preset.video else IMAGE_RESOLUTIONS)]
    sizes = sorted(sizes) + [2 * max(sizes)]
    for world in (1, 8):
        par = "none" if world == 1 else "fsdp"
        totals = [[estimate_memory(preset.shape, tokens=n, world_size=world, parallel=par, rollout_per_rank=r,
                                   data_per_rank=r, activation_checkpointing=ckpt).total for n in sizes] for r in (1, 2, 4)]
        for row in totals:
            assert all(a < b for a, b in zip(row, row[1:])), (name, world, row)  # more tokens: more memory
        for col in zip(*totals):
            assert all(a < b for a, b in zip(col, col[1:])), (name, world, col)  # more samples per rank: more memory


def _act(est):
    return next(v for k, v in est.parts.items() if k.startswith("activations"))


@pytest.mark.parametrize("name", list(PRESETS))
def test_guidance_doubles_the_rollout_rows_of_the_activations(name):
    shape, n = PRESETS[name].shape, 2048
    base = dict(tokens=n, world_size=8, rollout_per_rank=2, data_per_rank=1)
    plain = estimate_memory(shape, **base)
    for scale in (1.0, 0.0):  # no guidance / the unconditional model: one row per sample
        assert estimate_memory(shape, guidance_scale=scale, **base).parts == plain.parts
    guided = estimate_memory(shape, guidance_scale=4.5, **base)
    assert _act(guided) == 2 * _act(plain)  # the rollout rows dominate: the whole term doubles
    assert {k: v for k, v in guided.parts.items() if not k.startswith("activations")} == \
        {k: v for k, v in plain.parts.items() if not k.startswith("activations")}  # states are per sample, not per row
    # the data rows (unguided) dominate when there are more of them than guided rows
    data_heavy = dict(base, rollout_per_rank=1, data_per_rank=3)
    assert _act(estimate_memory(shape, guidance_scale=4.5, **data_heavy)) == _act(estimate_memory(shape, **data_heavy))
    # micro-batches bound the samples, each guided sample still takes two rows
    micro = dict(base, rollout_per_rank=8, data_per_rank=8, micro_batch=2)
    assert _act(estimate_memory(shape, guidance_scale=3.0, **micro)) == 2 * _act(estimate_memory(shape, **micro))
    assert estimate_memory(shape, guidance_scale=3.0, **micro).inputs["activation_rows"] == 4
    with pytest.raises(ValueError, match="'guidance_scale'"):
        estimate_memory(shape, guidance_scale=-1.0, **base)


@pytest.mark.parametrize("c,parallel", [(2, "fsdp"), (4, "ddp")])
def test_mmdit_activation_term_by_hand(c, parallel):
    """SD3.5-Medium and FLUX.1-dev at 1024 px: the activation bytes from the factors table, summed here."""
    n = 64 * 64
    factors = {2: {"sd3": (58, 58), "sd3_dual": (86, 58), "flux_double": (56, 56), "flux_single": (50, 52),
                   "out_sd3": 6, "out_flux": 8},
               4: {"sd3": (100, 100), "sd3_dual": (140, 100), "flux_double": (96, 96), "flux_single": (84, 88),
                   "out_sd3": 12, "out_flux": 14}}[c]
    for name, family in (("sd3.5-medium", "sd3"), ("flux.1-dev", "flux")):
        want = PUBLISHED[name]
        h, t = want["hidden"], want["text"]
        blocks = sum(count * (factors[k][0] * n + factors[k][1] * t) * h for k, count in want["kinds"])
        full = 3 * (blocks + factors[f"out_{family}"] * h * n)
        est = estimate_memory(PRESETS[name].shape, tokens=n, world_size=8, parallel=parallel, rollout_per_rank=3)
        assert est.parts["activations"] == full, name
        # checkpointed: every block keeps its input (image and text tokens), one block is rebuilt at a time
        biggest = max((factors[k][0] * n + factors[k][1] * t) * h for k, _ in want["kinds"])
        ckpt = estimate_memory(PRESETS[name].shape, tokens=n, world_size=8, parallel=parallel, rollout_per_rank=3,
                               activation_checkpointing=True)
        assert ckpt.parts["activations (checkpointed)"] == 3 * (want["blocks"] * c * h * (n + t) + biggest
                                                                + factors[f"out_{family}"] * h * n), name


def _tiny_sd3(layers=2, dual=(), dtype=torch.float32, hidden=64):
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=32, num_attention_heads=hidden // 32,
        joint_attention_dim=16, caption_projection_dim=hidden, pooled_projection_dim=8, out_channels=4, pos_embed_max_size=32,
        qk_norm="rms_norm", dual_attention_layers=dual).to(dtype)


def _tiny_flux(double=1, single=1, dtype=torch.float32, hidden=64):
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=double, num_single_layers=single, attention_head_dim=32,
        num_attention_heads=hidden // 32, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=False,
        axes_dims_rope=(8, 12, 12)).to(dtype)


def test_from_module_reads_tiny_sd3_and_flux_models():
    from ddrl_engine.models.diffusers import FluxPolicy, SD3Policy

    sd3 = SD3Policy(_tiny_sd3(layers=3, dual=(0,)), (4, 8, 8))
    s = ModelShape.from_module(sd3, text_tokens=20)
    sizes = [sum(p.numel() for p in b.parameters()) for b in sd3.model.transformer_blocks]
    assert (s.family, s.block_kinds, s.hidden, s.ffn_dim, s.latent_per_token, s.text_tokens) == \
        ("sd3", (("sd3_dual", 1), ("sd3", 2)), 64, 256, 16, 20)
    assert s.params == sum(p.numel() for p in sd3.parameters()) and s.blocks_total == sum(sizes)
    assert s.block_params == max(sizes) == sizes[0]  # the dual-attention block is the largest
    flux = FluxPolicy(_tiny_flux(double=2, single=3), (4, 8, 8))
    f = ModelShape.from_module(flux)
    assert (f.family, f.block_kinds, f.latent_per_token, f.num_blocks) == ("flux", (("flux_double", 2), ("flux_single", 3)), 16, 5)
    assert f.root_params == f.params - sum(sum(p.numel() for p in b.parameters()) for b in flux.blocks)
    # one process: the weights, gradients and AdamW parts are what a real optimizer step holds
    opt = torch.optim.AdamW(flux.parameters(), lr=1e-3)
    from ddrl_engine.models.diffusers import TextCondition

    cond = TextCondition(torch.randn(2, 5, 16), torch.randn(2, 8))
    flux(torch.randn(2, 4, 8, 8), torch.rand(2), cond).square().mean().backward()
    opt.step()
    assert {k: estimate_memory(flux, tokens=16, world_size=1, parallel="none").parts[k] for k in held_bytes(flux, opt)} \
        == held_bytes(flux, opt)


def test_mmdit_shapes_reject_bad_block_kinds():
    with pytest.raises(ValueError, match="needs block_kinds"):
        ModelShape(params=100, block_params=10, num_blocks=2, hidden=4, ffn_dim=16, family="sd3")
    with pytest.raises(ValueError, match="needs block_kinds"):
        ModelShape(params=100, block_params=10, num_blocks=2, hidden=4, ffn_dim=16, family="sd3",
                   block_kinds=(("flux_double", 2),))
    with pytest.raises(ValueError, match="'ModelShape.family'"):
        ModelShape(params=100, block_params=10, num_blocks=2, hidden=4, ffn_dim=16, family="unet")
    with pytest.raises(ValueError, match="exceeds params"):
        ModelShape(params=100, block_params=10, num_blocks=2, hidden=4, ffn_dim=16, family="flux",
                   block_kinds=(("flux_double", 1), ("flux_single", 1)), blocks_total=101)
    with pytest.raises(ValueError, match="multiple of 16"):
        image_tokens(1000, 1024)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mmdit_factors_match_what_autograd_saves(dtype):
    """Re-measures BLOCK_FACTORS and OUT_FACTORS on tiny models (hidden 64): saved bytes per image token and
    per text token of one more block, through our attention (the policies' default)."""
    from ddrl_engine.models.diffusers import TextCondition

    def saved(policy, hw, txt):
        policy.model.requires_grad_(True)
        x = torch.randn(1, 4, hw, hw, dtype=dtype)
        cond = TextCondition(torch.randn(1, txt, 16, dtype=dtype), torch.randn(1, 8, dtype=dtype))
        return saved_tensor_bytes(lambda: policy._velocity(x, torch.tensor([0.5]), cond),
                                  list(policy.parameters()) + [x, cond.embeds, cond.pooled])

    def per_token(policy):  # (per image token, per text token)
        img = (saved(policy, 16, 6) - saved(policy, 8, 6)) / (64 - 16)
        txt = (saved(policy, 8, 22) - saved(policy, 8, 6)) / 16
        return img, txt

    h, c = 64, dtype.itemsize
    one, block = _mmdit_block_bytes(per_token, dtype)
    for kind, (img, txt) in block.items():
        want_img, want_txt = BLOCK_FACTORS[kind][c]
        assert img == pytest.approx(want_img * h, rel=0.03), (kind, img / h)
        assert txt == pytest.approx(want_txt * h, rel=0.03), (kind, txt / h)
    assert one["sd3"][0] - block["sd3"][0] == pytest.approx(OUT_FACTORS["sd3"][c] * h, rel=0.35)
    assert one["flux"][0] - block["flux_double"][0] == pytest.approx(OUT_FACTORS["flux"][c] * h, rel=0.35)


def test_cli_image_presets_guidance_and_gpus(capsys):
    assert main(["memory", "--model", "sd3.5-medium", "--resolution", "512px", "--world-size", "8",
                 "--guidance-scale", "4.5"]) == 0
    out = capsys.readouterr().out
    est = estimate_memory(PRESETS["sd3.5-medium"].shape, tokens=1024, world_size=8, guidance_scale=4.5)
    assert "1,024 image + 333 text tokens" in out and f"{est.total / GIB:9.2f} GiB" in out
    assert "guidance scale 4.5 (2 rows" in out and "not measured" in out
    for gpu, capacity in GPUS.items():
        assert f"{gpu} ({capacity / GIB:.1f} GiB): " in out
    assert main(["memory", "--model", "flux.1-dev", "--height", "768", "--width", "1360", "--world-size", "8"]) == 0
    assert f"1360x768 = {48 * 85:,} image + 512 text tokens" in capsys.readouterr().out
    assert main(["memory", "--preset", "flux.1-dev", "--world-size", "1", "--parallel", "none"]) == 0
    assert "does NOT fit" in capsys.readouterr().out  # 12B parameters with fp32 AdamW on one GPU
    assert main(["memory", "--summary", "--world-size", "8"]) == 0
    summary = capsys.readouterr().out
    assert "| flux.1-dev | 1024px 1024x1024 | 4,096 |" in summary and "| sd3.5-large | 512px" in summary
    for argv, needle in ((["--model", "sd3.5-large", "--frames", "81"], "--frames is for video models"),
                         (["--model", "sd3.5-large", "--resolution", "720p"], "'720p' is not a image size"),
                         (["--model", "wan2.1-14b", "--resolution", "512px"], "is an image size"),
                         (["--model", "flux.1-dev", "--height", "1000", "--width", "1024"], "multiple of 16")):
        assert main(["memory", *argv]) == 2, argv
        assert needle in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        main(["memory", "--model", "sd35_medium"])  # not a preset name: argparse lists the choices
    assert "sd3.5-medium" in capsys.readouterr().err


def test_readme_memory_notes_are_the_current_estimates():
    """The per-model table in the README's "Post-train SD3.5, FLUX or Wan" is what the formula gives now."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Post-train SD3.5, FLUX or Wan", 1)[1].split("\n## ", 1)[0]
    assert "estimates, from a formula, not measurements" in section
    rows = re.findall(r"^\| (\S+) \| ([^,| ]+)(?:,[^|]*)? \| ([\d,]+)(?: \+ \d+ text)? \| (.+) \|$", section, flags=re.M)
    assert len(rows) == 8, rows
    sizes = {"1024x1024": "1024px", "512x512": "512px", "480p": "480p", "720p": "720p"}
    for name, size, tokens, cells in rows:
        preset = PRESETS[name]
        n, _ = preset_tokens(preset, sizes[size])
        assert int(tokens.replace(",", "")) == n, name
        for cell, (ckpt, g) in zip(cells.split(" | "), ((False, 1.0), (True, 1.0), (False, 4.5), (True, 4.5))):
            total = estimate_memory(preset.shape, tokens=n, world_size=8, activation_checkpointing=ckpt, guidance_scale=g).total
            fits = "both" if total <= GPUS["H100 80GB"] else "H200 only" if total <= GPUS["H200 141GB"] else "neither"
            assert cell == f"{total / GIB:,.1f} ({fits})", (name, size, ckpt, g, cell)


# ---- LoRA, the policy's dtype, two experts --------------------------------------------------------------

from ddrl_engine.trainer.memory import (LORA_ACTIVATION_FACTORS, LORA_BLOCK_FACTORS, LORA_OUT_FACTORS,  # noqa: E402
                                        notes_table)
from ddrl_engine.trainer.throughput import LORA_ADAPTERS  # noqa: E402


def _tiny_policy(family, dtype, seed):
    """(policy, a batch (x, t, cond)) of a tiny model of `family` in `dtype`."""
    from ddrl_engine.models.diffusers import FluxPolicy, SD3Policy, TextCondition

    torch.manual_seed(seed)
    if family == "wan":
        return tiny_wan_policy(layers=2, dtype=dtype), (torch.randn(2, *SHAPE), torch.rand(2), torch.randn(2, 5, 16))
    cond = TextCondition(torch.randn(2, 5, 16), torch.randn(2, 8))
    model = _tiny_sd3(layers=2, dual=(0,), dtype=dtype) if family == "sd3" else _tiny_flux(double=1, single=2, dtype=dtype)
    policy = (SD3Policy if family == "sd3" else FluxPolicy)(model, (4, 8, 8))
    return policy, (torch.randn(2, 4, 8, 8), torch.rand(2), cond)


@pytest.mark.parametrize("family", ["wan", "sd3", "flux"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rank", [2, 8])
def test_lora_parts_match_a_real_optimizer_step(family, dtype, rank, seed):
    """enable_lora (what a pipeline run with model.lora_rank does) then one AdamW step: the frozen base in the
    policy's dtype, and the fp32 adapters, their gradients and AdamW states are what the estimate says."""
    policy, (x, t, cond) = _tiny_policy(family, dtype, seed)
    shape = ModelShape.from_module(policy)
    assert policy.enable_lora(rank, seed=seed) == shape.lora_params(rank)
    frozen = [p for p in policy.parameters() if not p.requires_grad]
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    policy(x, t, cond).square().mean().backward()
    opt.step()
    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    est = estimate_memory(shape, tokens=16, world_size=1, parallel="none", lora_rank=rank, dtype=name,
                          kl_reference=True, ema=True)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    trained = [p for p in policy.parameters() if p.requires_grad]
    assert all(p.grad is None for p in frozen) and {p.dtype for p in trained} == {torch.float32}
    assert {p.dtype for p in frozen if p.is_floating_point()} >= {dtype}
    got = {f"frozen base ({name})": nbytes(frozen), "LoRA weights (fp32)": nbytes(trained),
           "LoRA gradients (fp32)": nbytes(p.grad for p in trained),
           "LoRA AdamW states (fp32)": nbytes(s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))}
    assert {k: est.parts[k] for k in got} == got
    # the KL reference and the EMA (Trainer's frozen_copy, one process: the base shared) add the adapters
    from ddrl_engine.models.trainable import frozen_copy

    own = {id(p) for p in policy.parameters()}
    added = nbytes(p for p in frozen_copy(policy, True).parameters() if id(p) not in own)
    assert est.parts["KL reference (fp32 adapters)"] == est.parts["EMA weights (fp32 adapters)"] == added == nbytes(trained)


def test_lora_and_dtype_shrink_the_weight_parts():
    shape = PRESETS["flux.1-dev"].shape
    full32 = estimate_memory(shape, tokens=4096, world_size=8)
    full16 = estimate_memory(shape, tokens=4096, world_size=8, dtype="bf16")
    lora = estimate_memory(shape, tokens=4096, world_size=8, dtype="bf16", lora_rank=32)
    assert full16.parts == full32.parts  # a full fine-tune trains fp32 master weights whatever the dtype
    assert lora.parts["frozen base (bf16)"] * 2 == full32.parts["weights (fp32)"]  # FSDP2 shards the frozen base too
    n_lora = shape.lora_params(32)
    assert n_lora == 32 * 2 * 3072 * (19 * 4 + 38 * 3)  # double blocks q, k, v, out; single blocks q, k, v
    # lora_A [32, h] and lora_B [h, 32] split by rows over 8 ranks
    assert lora.parts["LoRA weights (fp32)"] == 4 * (19 * 4 + 38 * 3) * (4 * 3072 + 384 * 32)  # fp32 adapters
    assert lora.parts["LoRA AdamW states (fp32)"] == 2 * lora.parts["LoRA weights (fp32)"]
    assert _act(lora) < 0.65 * _act(full16) and lora.total < 0.5 * full16.total
    ddp = estimate_memory(shape, tokens=4096, world_size=8, parallel="ddp", dtype="bf16", lora_rank=32)
    assert ddp.parts["LoRA gradients (fp32)"] == 2 * 4 * n_lora  # + DDP's buckets of the trained parameters
    # One process: peft runs the fp32 adapters over a bf16 base on fp32 copies of their inputs (factors (2, 4));
    # under FSDP2 on CUDA both compute in bf16 (factors (2, 2)).
    wan = PRESETS["wan2.1-1.3b"].shape
    h, f, r, n = wan.hidden, wan.ffn_dim, 32, 1000
    for parallel, key in (("none", (2, 4)), ("fsdp", (2, 2))):
        est = estimate_memory(wan, tokens=n, world_size=1, parallel=parallel, dtype="bf16", lora_rank=r, data_per_rank=0)
        ah, af, ao = LORA_ACTIVATION_FACTORS[key]
        assert _act(est) == n * (wan.num_blocks * (ah * h + af * f + key[1] * r * LORA_ADAPTERS["wan"][1]) + ao * h)
        assert est.inputs["adapter_bytes"] == key[1]
    with pytest.raises(ValueError, match="'dtype'"):
        estimate_memory(shape, tokens=4096, world_size=8, dtype="int8")
    with pytest.raises(ValueError, match="'lora_rank'"):
        estimate_memory(shape, tokens=4096, world_size=8, lora_rank=-1)


@pytest.mark.parametrize("dtype,fp32_adapters", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, True)],
                         ids=["bf16 adapters (FSDP2 compute)", "bf16 base fp32 adapters", "fp32"])
def test_lora_activation_factors_match_what_autograd_saves(dtype, fp32_adapters, seed):
    """Re-measures LORA_ACTIVATION_FACTORS (Wan) and LORA_BLOCK_FACTORS / LORA_OUT_FACTORS (MMDiT) with adapters
    of ranks 4 and 8 on a frozen base, per (base, adapter) compute bytes: the intercept is the factor, the
    slope a R per adapter and token. bf16 adapters are what FSDP2's MixedPrecisionPolicy computes with."""
    from ddrl_engine.models.diffusers import TextCondition

    h = 64
    a = 4 if fp32_adapters else dtype.itemsize
    key = (dtype.itemsize, a)

    def lora(policy, rank):
        policy.enable_lora(rank, seed=seed, autocast_adapter_dtype=fp32_adapters)
        assert {p.dtype for p in policy.parameters() if p.requires_grad} == {torch.float32 if a == 4 else dtype}
        return policy

    def wan_per_token(layers, ffn, rank):
        return _wan_saved_bytes_per_token(lora(tiny_wan_policy(layers=layers, ffn=ffn, dtype=dtype), rank), dtype)

    ah, af, ao = LORA_ACTIVATION_FACTORS[key]
    for ffn in (128, 512):
        block = {r: wan_per_token(2, ffn, r) - wan_per_token(1, ffn, r) for r in (4, 8)}
        assert block[8] - block[4] == pytest.approx(a * 4 * LORA_ADAPTERS["wan"][1], rel=0.02), block
        assert block[4] - a * 4 * LORA_ADAPTERS["wan"][1] == pytest.approx(ah * h + af * ffn, rel=0.1), (ffn, block)
    one = wan_per_token(1, 128, 4)
    assert one - (wan_per_token(2, 128, 4) - one) == pytest.approx(ao * h, rel=0.35, abs=h)

    def saved(policy, hw, txt):
        x = torch.randn(1, 4, hw, hw, dtype=dtype)
        cond = TextCondition(torch.randn(1, txt, 16, dtype=dtype), torch.randn(1, 8, dtype=dtype))
        return saved_tensor_bytes(lambda: policy._velocity(x, torch.tensor([0.5]), cond),
                                  list(policy.parameters()) + [x, cond.embeds, cond.pooled])

    def per_token(policy):  # (per image token, per text token)
        return ((saved(policy, 16, 6) - saved(policy, 8, 6)) / (64 - 16), (saved(policy, 8, 22) - saved(policy, 8, 6)) / 16)

    for r in (4, 8):
        one, block = _mmdit_block_bytes(lambda policy: per_token(lora(policy, r)), dtype)
        for kind, (img, txt) in block.items():
            want_img, want_txt = LORA_BLOCK_FACTORS[kind][key]
            _, on_img, on_txt = LORA_ADAPTERS[kind]
            assert img == pytest.approx(want_img * h + a * r * on_img, rel=0.03), (kind, r, img / h)
            assert txt == pytest.approx(want_txt * h + a * r * on_txt, rel=0.03), (kind, r, txt / h)
        assert one["sd3"][0] - block["sd3"][0] == pytest.approx(LORA_OUT_FACTORS["sd3"][key] * h, rel=0.35, abs=h)
        assert one["flux"][0] - block["flux_double"][0] == pytest.approx(LORA_OUT_FACTORS["flux"][key] * h, rel=0.35, abs=h)


def _tiny_experts(seed, dtype=torch.float32):
    from ddrl_engine.models.diffusers import WanExpertsPolicy

    high = tiny_wan_policy(dtype=dtype).model
    torch.manual_seed(seed + 1)
    low = tiny_wan_policy(dtype=dtype).model
    return WanExpertsPolicy(high, low, SHAPE, boundary_ratio=0.875)


def test_two_experts_hold_both_and_run_one(seed):
    """Two-expert Wan2.2: weights, gradients and AdamW states of both experts after a step on rows of both
    levels; the activations of a row are one expert's (what autograd saves at a high-noise level equals the
    high-noise expert alone)."""
    policy = _tiny_experts(seed)
    shape = ModelShape.from_module(policy)
    single = ModelShape.from_module(tiny_wan_policy())
    assert (shape.experts, shape.num_blocks, shape.params) == (2, 2 * single.num_blocks, 2 * single.params)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    t = torch.tensor([0.95, 0.2])  # one row per expert
    policy(torch.randn(2, *SHAPE), t, torch.randn(2, 5, 16)).square().mean().backward()
    opt.step()
    est = estimate_memory(shape, tokens=48, world_size=1, parallel="none")
    got = held_bytes(policy, opt)
    assert {k: est.parts[k] for k in got} == got
    one = estimate_memory(single, tokens=48, world_size=1, parallel="none")
    assert _act(est) == _act(one)  # per row: one expert's blocks
    x, emb = torch.randn(1, *SHAPE), torch.randn(1, 5, 16)
    alone = tiny_wan_policy()
    alone.model = policy.model  # the high-noise expert on its own
    both = saved_tensor_bytes(lambda: policy(x, torch.tensor([0.95]), emb), list(policy.parameters()) + [x])
    assert both == saved_tensor_bytes(lambda: alone(x, torch.tensor([0.95]), emb), list(policy.parameters()) + [x])
    with pytest.raises(ValueError, match="'ModelShape.experts'"):
        ModelShape(params=100, block_params=10, num_blocks=3, hidden=4, ffn_dim=4, experts=2)


def test_two_expert_preset_against_one_expert():
    a14b, w14 = PRESETS["wan2.2-a14b"].shape, PRESETS["wan2.1-14b"].shape
    n = video_tokens(*RESOLUTIONS["480p"])
    for lora in (0, 32):
        two = estimate_memory(a14b, tokens=n, world_size=8, dtype="bf16", lora_rank=lora, activation_checkpointing=True)
        one = estimate_memory(w14, tokens=n, world_size=8, dtype="bf16", lora_rank=lora, activation_checkpointing=True)
        assert _act(two) == _act(one)
        for k in two.parts:
            if "weights" in k or "gradients" in k or "AdamW" in k or "frozen" in k:
                assert two.parts[k] == pytest.approx(2 * one.parts[k], rel=1e-3), k  # both experts' (row rounding)
        # one block of whichever expert runs, and the root unit holding both experts' embeddings and heads
        trained = w14.lora_block_params(lora) if lora else w14.block_params
        block = w14.block_params + w14.lora_block_params(lora)
        assert two.parts["FSDP2 unsharded in flight"] == 2 * (2 * block + 2 * w14.root_params) + 6 * trained


def test_cli_lora_dtype_and_two_experts(capsys):
    assert main(["memory", "--model", "wan2.2-a14b", "--lora-rank", "32", "--dtype", "bf16",
                 "--activation-checkpointing"]) == 0
    out = capsys.readouterr().out
    est = estimate_memory(PRESETS["wan2.2-a14b"].shape, tokens=32_760, world_size=8, lora_rank=32, dtype="bf16",
                          activation_checkpointing=True)
    assert "28.58B parameters" in out and "frozen base (bf16)" in out and f"{est.total / GIB:9.2f} GiB" in out
    assert "LoRA rank 32 (frozen bf16 base" in out and "not measured" in out
    assert "ASSUMED MFU of 0.4" in out and "s/step" in out and "rollout samples/s per GPU" in out
    assert main(["memory", "--model", "sd3.5-medium", "--mfu", "0.2", "--guidance-scale", "4.5"]) == 0
    slow = capsys.readouterr().out
    assert main(["memory", "--model", "sd3.5-medium", "--guidance-scale", "4.5"]) == 0
    fast = capsys.readouterr().out
    secs = [float(o.split(" s/step")[0].rsplit(" ", 1)[1]) for o in (slow, fast)]
    assert secs[0] == pytest.approx(2 * secs[1], rel=1e-3)
    for argv, needle in ((["--mfu", "0"], "'mfu'"), (["--sampler-steps", "4", "--trained-steps", "5"], "'trained_steps'"),
                         (["--lora-rank", "-2"], "'lora_rank'"), (["--ppo-epochs", "0"], "'ppo_epochs'")):
        assert main(["memory", "--model", "flux.1-dev", *argv]) == 2, argv
        err = capsys.readouterr()
        assert needle in err.err and "GiB" not in err.out, argv  # refused before any estimate is printed


def test_cli_notes_table(capsys):
    assert main(["memory", "--notes", "--dtype", "bf16", "--activation-checkpointing", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(notes_table(world_size=8, lora_rank=32, dtype="bf16", activation_checkpointing=True))
    rows = [r for r in out.splitlines() if r.startswith("| wan2.2-a14b |")]
    assert len(rows) == 4 and "LoRA r=32" in rows[0] and "| full |" in rows[1]
    assert "ASSUMED MFU of 0.4" in out and "not measured" in out
