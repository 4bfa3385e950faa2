"""The FLOP count of ddrl_engine.trainer.throughput against torch.utils.flop_counter: one row's forward and
backward (full fine-tuning and LoRA) on tiny diffusers SD3 / FLUX / Wan models and our DiT, the presets'
published shapes at full width on the meta device, and whole Trainer steps (collect + update) of the DiT.
The counts are integers of the same matmuls, so they must agree exactly; attention runs through SDPA's
math backend, whose matmuls the counter sees (the CPU flash kernel has no FLOP formula). Counts depend on
shapes only; the `seed` fixture (conftest: printed on failure) seeds the random weights anyway."""
import math
import tempfile
from dataclasses import asdict, replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ddrl_engine.models.dit import DiT, DiTConfig
from ddrl_engine.trainer.throughput import (DEFAULT_MFU, PEAK_TFLOPS, MatmulShape, StepPlan, matmul_shape, step_flops,
                                            step_seconds)

def _counted(fn):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        out = fn()
    return fc.get_total_flops(), out


def _forward_backward(policy, x, t, cond):
    fwd, out = _counted(lambda: policy(x, t, cond))
    bwd, _ = _counted(lambda: out.square().mean().backward())
    return fwd, bwd


# ---- one row on tiny models ----------------------------------------------------------------------------

def _tiny(family: str, variant: int, seed: int):
    """(policy, its diffusers model, x, t, cond, N image tokens, T text tokens) at batch 2; variant 1 adds blocks
    and the options (SD3.5 dual attention in block 0, FLUX guidance embeddings, a single-stream block first)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency")
    from ddrl_engine.models.diffusers import FluxPolicy, SD3Policy, TextCondition, WanPolicy

    torch.manual_seed(seed)
    b, txt = 2, 5 + variant
    if family == "wan":
        model = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, text_dim=16,
            freq_dim=32, ffn_dim=96 + 32 * variant, num_layers=2 + variant, rope_max_seq_len=32)
        shape = (4, 3, 8, 8)
        return WanPolicy(model, shape), model, torch.randn(b, *shape), torch.rand(b), torch.randn(b, txt, 16), 48, txt
    cond = TextCondition(torch.randn(b, txt, 16), torch.randn(b, 8), torch.full((b,), 3.5) if variant else None)
    if family == "sd3":
        model = diffusers.SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=4, num_layers=2 + variant, attention_head_dim=32, num_attention_heads=2,
            joint_attention_dim=16, caption_projection_dim=64, pooled_projection_dim=8, out_channels=4, pos_embed_max_size=32,
            qk_norm="rms_norm", dual_attention_layers=(0,) if variant else ())
        return SD3Policy(model, (4, 8, 8)), model, torch.randn(b, 4, 8, 8), torch.rand(b), cond, 16, txt
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1 - variant, num_single_layers=1 + variant, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=bool(variant),
        axes_dims_rope=(8, 12, 12))
    return FluxPolicy(model, (4, 8, 8)), model, torch.randn(b, 4, 8, 8), torch.rand(b), cond, 16, txt


@pytest.mark.parametrize("family", ["wan", "sd3", "flux"])
@pytest.mark.parametrize("variant", [0, 1])
@pytest.mark.parametrize("rank", [0, 4])
def test_one_row_matches_the_flop_counter(family, variant, rank, seed):
    policy, model, x, t, cond, n, txt = _tiny(family, variant, seed)
    shape = matmul_shape(family, model.config)
    if rank:
        policy.enable_lora(rank, seed=seed)
    fwd, bwd = _forward_backward(policy, x, t, cond)
    assert fwd == 2 * shape.forward(n, txt, rank), (fwd, shape.forward(n, txt, rank))
    assert bwd == 2 * shape.backward(n, txt, rank), (bwd, shape.backward(n, txt, rank))
    assert shape.attention(n, txt) > 0 and shape.backward(n, txt, rank) < 2 * shape.forward(n, txt, rank)
    if rank:  # a frozen base computes no weight gradients: far less than full fine-tuning's backward
        assert shape.backward(n, txt, rank) < 0.75 * shape.backward(n, txt, 0)


@pytest.mark.parametrize("config", [DiTConfig(hidden=32, depth=2, heads=2),
                                    DiTConfig(in_channels=2, sample_size=(4, 8, 8), patch_size=(2, 2, 2), hidden=48,
                                              depth=3, heads=3, mlp_ratio=2.5, timestep_freq_dim=64)])
def test_dit_row_matches_the_flop_counter(config, seed):
    dit = DiT(config)
    x = torch.randn(3, config.in_channels, *config.sample_size)
    fwd, bwd = _forward_backward(dit, x, torch.rand(3), torch.tensor([0, 1, 2]))
    shape, n = matmul_shape("dit", asdict(config)), math.prod(config.grid)
    assert (fwd, bwd) == (3 * shape.forward(n, 0), 3 * shape.backward(n, 0))


# ---- the presets at full width (meta device: shapes only, nothing allocated) ---------------------------

def _unique_presets():
    from ddrl_engine.trainer.memory import PRESETS

    seen, names = set(), []
    for name, p in PRESETS.items():  # wan2.2-a14b's experts have wan2.1-14b's config
        key = (p.model_class, tuple(sorted((k, str(v)) for k, v in p.config.items())))
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names


@pytest.mark.parametrize("name", _unique_presets())
def test_presets_match_the_flop_counter_at_full_width(name):
    """Each preset's config built by diffusers on the meta device: the formula is exact at the real widths
    (SD3.5's dual-attention blocks, FLUX's 19 + 38 blocks, Wan's cross-attention), at a small token count."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency")
    from ddrl_engine.trainer.memory import PRESETS

    p, txt = PRESETS[name], 7
    with torch.device("meta"):
        model = getattr(diffusers, p.model_class)(**p.config)
        emb = torch.randn(1, txt, 4096)
        if p.family == "wan":
            n = 2 * 4 * 4
            run = lambda: model(hidden_states=torch.randn(1, 16, 2, 8, 8), timestep=torch.tensor([500.0]),  # noqa: E731
                                encoder_hidden_states=emb, return_dict=False)[0]
        elif p.family == "sd3":
            n = 8 * 8
            run = lambda: model(hidden_states=torch.randn(1, 16, 16, 16), encoder_hidden_states=emb,  # noqa: E731
                                pooled_projections=torch.randn(1, 2048), timestep=torch.tensor([500.0]), return_dict=False)[0]
        else:
            n = 8 * 8
            run = lambda: model(hidden_states=torch.randn(1, n, 64), encoder_hidden_states=emb,  # noqa: E731
                                pooled_projections=torch.randn(1, 768), timestep=torch.tensor([0.5]),
                                img_ids=torch.zeros(n, 3), txt_ids=torch.zeros(txt, 3), guidance=torch.tensor([3.5]),
                                return_dict=False)[0]
        fwd, out = _counted(run)
        bwd, _ = _counted(lambda: out.sum().backward())
    shape = p.matmuls()
    assert (fwd, bwd) == (shape.forward(n, txt), shape.backward(n, txt)), name


# ---- whole DDRL steps through the Trainer --------------------------------------------------------------

STEPS = [dict(),
         dict(guidance=4.5, recompute=True, beta_kl=0.1),
         dict(data_loss_steps="one", train_steps="all", ppo_epochs=2),
         dict(ckpt=True),
         dict(method="sft"),
         dict(method="grpo_kl", guidance=3.0)]


@pytest.mark.parametrize("case", STEPS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "ddrl")
def test_a_trainer_step_matches_the_flop_counter(case, seed):
    """collect() + update() of the tiny DiT counted op by op equals step_flops of the plan read off the config:
    the rollout, old-log-prob recomputation, data and policy passes, KL reference, epochs and recompute."""
    from tests.trainer_helpers import make_trainer, tiny_config

    from ddrl_engine.trainer.distributed import checkpoint_blocks

    case = dict(case)
    method, guidance = case.pop("method", "ddrl"), case.pop("guidance", 1.0)
    recompute, ckpt = case.pop("recompute", False), case.pop("ckpt", False)
    with tempfile.TemporaryDirectory() as out:
        cfg = tiny_config(out, method=method, **case)
        cfg = replace(cfg, run=replace(cfg.run, seed=seed),
                      rollout=replace(cfg.rollout, guidance_scale=guidance, recompute_old_logprobs=recompute))
        trainer = make_trainer(cfg)
        if ckpt:  # what distributed.activation_checkpointing applies (the Trainer does it only when distributed)
            checkpoint_blocks(trainer.policy)
        measured, _ = _counted(lambda: trainer.update(trainer.collect()))
    algo = trainer.algo
    plan = StepPlan(rollout_rows=trainer.rollout_batch, data_rows=trainer.data.batch_size if trainer.data else 0,
                    sampler_nfe=trainer.sampler.nfe, trained_steps=len(trainer.trained_steps),
                    data_loss_steps=algo.data_loss_steps, guided=guidance not in (0.0, 1.0),
                    kl_reference=algo.beta_kl > 0, recompute_old_logprobs=recompute, ppo_epochs=algo.ppo_epochs,
                    activation_checkpointing=ckpt, policy_loss=algo.use_reward)
    est = step_flops(matmul_shape("dit", asdict(cfg.model)), tokens=math.prod(cfg.model.grid), text_tokens=0, plan=plan)
    assert measured == est["step"], (measured, est)
    assert est["step"] == sum(v for k, v in est.items() if k != "step")


def test_step_phases_scale_as_the_loop_runs_them():
    shape = MatmulShape(hidden=8, image_blocks=100, self_attn=2)
    f, b = shape.forward(10, 0), shape.backward(10, 0)
    base = step_flops(shape, tokens=10, text_tokens=0, plan=StepPlan(rollout_rows=2, data_rows=3, sampler_nfe=10,
                                                                     trained_steps=5))
    assert base["rollout"] == 10 * 2 * f and base["policy loss"] == 5 * 2 * (f + b)
    assert base["data loss"] == 5 * 3 * (f + b) and base["KL reference"] == base["old log-probs"] == 0
    guided = step_flops(shape, tokens=10, text_tokens=0, plan=StepPlan(rollout_rows=2, data_rows=3, sampler_nfe=10,
                                                                       trained_steps=5, guided=True))
    assert guided["rollout"] == 2 * base["rollout"] and guided["policy loss"] == 2 * base["policy loss"]
    assert guided["data loss"] == base["data loss"]  # the data loss stays unguided
    one = step_flops(shape, tokens=10, text_tokens=0, plan=StepPlan(rollout_rows=2, data_rows=3, trained_steps=5,
                                                                    data_loss_steps="one"))
    assert one["data loss"] == base["data loss"] // 5


def test_step_seconds_use_the_stated_peak_and_mfu():
    assert PEAK_TFLOPS == {"H100 SXM": 989.0, "H200 SXM": 989.0} and DEFAULT_MFU == 0.4
    assert step_seconds(989e12 * 0.4) == pytest.approx(1.0)
    assert step_seconds(989e12, mfu=0.5) == pytest.approx(2.0)
    for bad in (0, 1.5, True, "0.4"):
        with pytest.raises(ValueError, match="'mfu'"):
            step_seconds(1, mfu=bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(trained_steps=11), "'trained_steps' \\(11\\) exceeds"), (dict(sampler_nfe=0), "'sampler_nfe'"),
    (dict(data_loss_steps="some"), "'data_loss_steps'"), (dict(rollout_rows=0, data_rows=0), "'rollout_rows' \\+ 'data_rows'"),
    (dict(ppo_epochs=0), "'ppo_epochs'"), (dict(rollout_rows=1.5), "'rollout_rows'")])
def test_bad_plans_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StepPlan(**kwargs)


def test_bad_shapes_name_the_field():
    with pytest.raises(ValueError, match="'family'"):
        matmul_shape("unet", {})
    with pytest.raises(ValueError, match="lacks 'ffn_dim'"):
        matmul_shape("wan", dict(num_attention_heads=2, attention_head_dim=8, num_layers=1))
    with pytest.raises(ValueError, match="image-to-video"):
        matmul_shape("wan", dict(num_attention_heads=2, attention_head_dim=8, image_dim=1280))
    with pytest.raises(ValueError, match="MatmulShape.image_blocks"):
        MatmulShape(hidden=4, image_blocks=-1)
    with pytest.raises(ValueError, match="'lora_rank'"):
        step_flops(MatmulShape(hidden=4, image_blocks=1), tokens=4, text_tokens=0, plan=StepPlan(), lora_rank=-1)


def test_models_memory_doc_is_what_the_command_prints(capsys):
    """docs/models_memory.md pastes `ddrl-engine memory` output: each table under a command line is that
    command's table now (so a changed formula fails here until the note is regenerated)."""
    import re
    import shlex
    from pathlib import Path

    from ddrl_engine.cli import main

    doc = (Path(__file__).resolve().parent.parent / "docs" / "models_memory.md").read_text()
    flat = " ".join(doc.split())
    assert "ESTIMATE" in flat and "not a measurement" in flat and "no GPU has run these models" in flat
    blocks = re.findall(r"^`ddrl-engine (memory --notes[^`]*)`\n\n((?:\|.*\n)+)", doc, flags=re.M)
    assert len(blocks) == 3, [b[0] for b in blocks]
    for command, table in blocks:
        assert main(shlex.split(command)) == 0, command
        printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
        assert table.splitlines() == printed, command
    detail = re.search(r"^\$ ddrl-engine (memory [^\n]*)\n(.*?)\n```", doc, flags=re.M | re.S)
    assert main(shlex.split(detail.group(1))) == 0
    assert detail.group(2).splitlines() == [line for line in capsys.readouterr().out.splitlines() if line]
