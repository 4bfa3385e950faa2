"""Context parallelism ([distributed] context_parallel = N) for the diffusers adapters on CPU / gloo.

- Wan (one transformer and the two-expert Wan2.2 policy), SD3 (with an SD3.5 dual-attention block) and
  FLUX (double- and single-stream blocks) sharded over 2 ranks give the unsharded policy's velocity and
  parameter gradients: tokens split after the patch embedding (rotary tables / position ids alike),
  Ulysses all-to-all in every self-attention (joint text + image attention with the text replicated
  for SD3 and FLUX), tokens gathered before unpatchify.
- The trainer on the tiny Wan, SD3 and FLUX pipeline folders (LoRA, FSDP2) at context_parallel = 2
  (2 processes: one data rank of two cp ranks) reproduces one process: advantages, log-prob ratios,
  losses, gradient norms and the updated adapters.
- Heads or tokens the group cannot split, and changes the hooks would not survive, are clear errors;
  turning cp off restores the original forward bitwise.
The multi-process tests (torchrun) are marked slow.
"""
import json
import math
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (pip install ddrl-engine[diffusers])")
pytest.importorskip("peft", reason="peft is an optional dependency (pip install ddrl-engine[diffusers])")

from ddrl_engine.models.diffusers import (DDRLAttnProcessor, FluxPolicy, SD3Policy, TextCondition,  # noqa: E402
                                          WanExpertsPolicy, WanPolicy)
from tests.test_context_parallel import LOSSES, _assert_same, _torchrun  # noqa: E402

# The tiny pipelines' widths (tests/tiny_pipelines.py) with 4 heads of 8, so each of 2 cp ranks attends
# with 2; non-square token grids (a row / column mix-up would show).
MODELS = {
    # latents [16, 2, 4, 6]: a 2 x 2 x 3 patch grid, 12 tokens
    "wan": (dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8, in_channels=16, out_channels=16,
                 text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32), (16, 2, 4, 6)),
    # latents [4, 8, 12], patch 2: 4 x 6 = 24 tokens; block 0 has SD3.5's second (image-only) attention
    "sd3": (dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                 joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=4,
                 pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"), (4, 8, 12)),
    # latents [4, 8, 12] packed 2 x 2: 24 tokens; rotary axes (2, 2, 4) = the head dim
    "flux": (dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                  num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)),
             (4, 8, 12)),
}
CLASSES = {"wan": "WanTransformer3DModel", "sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}
POLICIES = {"wan": WanPolicy, "sd3": SD3Policy, "flux": FluxPolicy}
# profiler ranges of one sharded forward: two all-to-all ranges per self-attention (q, k, v in; out
# back), a gather of the text heads per joint attention, one gather of the output per model run
RANGES = {"wan": (2 * 2, 1), "experts": (2 * 2 * 2, 2), "sd3": (2 * 2 + 2, 2 + 1), "flux": (2 * 2, 2 + 1)}
CASES = tuple(RANGES)


def transformer(kind: str, seed: int, **over):
    kwargs, _ = MODELS[kind]
    if "num_attention_heads" in over and kind == "sd3":  # the context projection is the model width
        over.setdefault("caption_projection_dim", over["num_attention_heads"] * kwargs["attention_head_dim"])
    torch.manual_seed(seed)
    return getattr(diffusers, CLASSES[kind])(**{**kwargs, **over}).eval()


def case(name: str, seed: int):
    """(policy, x, t, cond) of the model-level comparison: random weights and inputs from `seed`; "experts"
    is the two-expert Wan policy with levels on both sides of its boundary (both experts run)."""
    kind = "wan" if name == "experts" else name
    kwargs, sample = MODELS[kind]
    if name == "experts":
        policy = WanExpertsPolicy(transformer(kind, seed), transformer(kind, seed + 1), sample, boundary_ratio=0.5)
    else:
        policy = POLICIES[kind](transformer(kind, seed), sample)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, *sample, generator=g)
    t = torch.tensor([0.9, 0.2, 0.6])
    width = kwargs["text_dim"] if kind == "wan" else kwargs["joint_attention_dim"]
    embeds = torch.randn(3, 5, width, generator=g)
    pooled = None if kind == "wan" else torch.randn(3, kwargs["pooled_projection_dim"], generator=g)
    return policy, x, t, TextCondition(embeds, pooled)


@pytest.fixture
def two_ranks(monkeypatch):
    """A stand-in cp group of 2 ranks for the checks that run before any communication."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    return object()


def _attention_modules(policy):
    return [m for model in policy.experts for m in model.modules() if hasattr(m, "processor")]


def _hooks(policy):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for model in policy.experts for m in model.modules())


# ---- fast checks (one process) -----------------------------------------------------------------

@pytest.mark.parametrize("kind, over, sample, match", [
    ("wan", dict(num_attention_heads=3), None, r"attention heads \(3\) must be divisible"),
    ("wan", {}, (16, 1, 2, 2), r"sequence \(1 tokens\) is shorter than the cp group"),
    ("wan", {}, (16, 3, 2, 2), r"sequence \(3 tokens\) must be divisible"),
    ("sd3", dict(num_attention_heads=3), None, r"attention heads \(3\) must be divisible"),
    ("sd3", {}, (4, 6, 2), r"sequence \(3 tokens\) must be divisible"),
    ("flux", dict(num_attention_heads=3), None, r"attention heads \(3\) must be divisible"),
    ("flux", {}, (4, 2, 2), r"sequence \(1 tokens\) is shorter than the cp group"),
], ids=["wan_heads", "wan_short", "wan_odd", "sd3_heads", "sd3_odd", "flux_heads", "flux_short"])
def test_refuses_a_group_it_cannot_split(two_ranks, kind, over, sample, match, seed):
    policy = POLICIES[kind](transformer(kind, seed, **over), sample or MODELS[kind][1])
    before = [m.processor for m in _attention_modules(policy)]
    with pytest.raises(ValueError, match=f"distributed.context_parallel = 2: the {CLASSES[kind]}'s") as e:
        policy.set_context_parallel(two_ranks)
    assert e.match(match)
    # refused before any change: no hooks, the same processors
    assert [m.processor for m in _attention_modules(policy)] == before and _hooks(policy) == 0


def test_wan_experts_are_checked_each(two_ranks, seed):
    """The second expert's heads are checked too (the experts need not share them)."""
    sample = MODELS["wan"][1]
    policy = WanExpertsPolicy(transformer("wan", seed), transformer("wan", seed, num_attention_heads=3), sample,
                              boundary_ratio=0.5)
    with pytest.raises(ValueError, match=r"heads \(3\) must be divisible"):
        policy.set_context_parallel(two_ranks)


@pytest.mark.parametrize("name", CASES)
def test_cp_off_restores_the_forward(two_ranks, name, seed):
    """set_context_parallel(group) puts the cp processor on the self-attentions only (never on Wan's
    cross-attention), the joint text on SD3's and FLUX's joint ones; set_context_parallel(None) removes
    them all and every hook: the output is bitwise the original one."""
    policy, x, t, cond = case(name, seed)
    with torch.no_grad():
        before = policy(x, t, cond)
    processors = [m.processor for m in _attention_modules(policy)]
    policy.set_context_parallel(two_ranks)
    assert all(isinstance(m.processor, DDRLAttnProcessor) for m in _attention_modules(policy))
    sharded = [m.processor for m in _attention_modules(policy) if m.processor.cp_group is two_ranks]
    joint = [p for p in sharded if p.cp_text is not None]
    blocks = sum(len(getattr(m, a)) for m in policy.experts for a in policy.block_attrs)
    if name in ("wan", "experts"):  # attn1 of every block; attn2 (cross) untouched
        assert len(sharded) == blocks and not joint
        assert all(b.attn2.processor.cp_group is None for m in policy.experts for b in m.blocks)
    else:  # every joint attention, plus SD3.5's image-only attn2 in block 0
        assert len(joint) == blocks and len(sharded) == blocks + (name == "sd3")
        assert {p.cp_text.first for p in joint} == {name == "flux"} and len({id(p.cp_text) for p in joint}) == 1
    assert policy.ddrl_attention
    with pytest.raises(ValueError, match=r"use_ddrl_attention\(False\).*context parallelism"):
        policy.use_ddrl_attention(False)
    with pytest.raises(ValueError, match="enable_lora: call it before set_context_parallel"):
        policy.enable_lora(rank=2)
    policy.set_context_parallel(None)
    assert [m.processor for m in _attention_modules(policy)] == processors and _hooks(policy) == 0
    with torch.no_grad():
        assert torch.equal(policy(x, t, cond), before)


# ---- multi-process (torchrun, gloo) ---------------------------------------------------------------

@pytest.mark.slow
def test_sharded_policies_match_one_process(tmp_path, seed):
    """Velocity and every parameter gradient of each policy sharded over 2 ranks equal the unsharded
    policy's (float tolerance: the all-to-alls and gathers move values; only summation order differs).
    All cases share one torchrun launch (importing diffusers is most of its time)."""
    result = tmp_path / "policies.pt"
    _torchrun(2, "diffusers_model", tmp_path, result, "--seed", seed)
    results = torch.load(result)
    assert set(results) == set(CASES)
    for name, got in results.items():
        torch.testing.assert_close(got["cp"]["out"], got["plain"]["out"], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        assert got["plain"]["out"].abs().max() > 0.1, name  # not a trivial case
        all_to_all, gathers = RANGES[name]
        assert got["cp_ranges"] == {"ddrl/cp/all_to_all": all_to_all, "ddrl/cp/all_gather": gathers}, name
        assert got["plain"]["grads"].keys() == got["cp"]["grads"].keys(), name
        for param, want in got["plain"]["grads"].items():
            atol = 1e-5 * max(1.0, want.abs().max().item())
            torch.testing.assert_close(got["cp"]["grads"][param], want, atol=atol, rtol=1e-4,
                                       msg=lambda m: f"{name} {param}: {m}")
        # the compared gradients include the sharded paths: image attention, text attention, output
        parts = {"wan": ("attn1.to_q.weight", "attn2.to_k.weight", "proj_out.weight"),
                 "sd3": ("attn.to_q.weight", "attn.add_k_proj.weight", "attn2.to_v.weight", "proj_out.weight"),
                 "flux": ("attn.to_q.weight", "attn.add_k_proj.weight", "single_transformer_blocks.0.attn.to_k.weight",
                          "proj_out.weight")}[name.replace("experts", "wan")]
        for part in parts:
            hits = [n for n in got["plain"]["grads"] if n.endswith(part)]
            assert hits and all(got["plain"]["grads"][n].abs().max() > 0 for n in hits), (name, part)


# the tiny folders (tests/tiny_pipelines.py) and a resolution each: 2 heads; Wan latents [16, 2, 4, 4]
# (8 tokens), SD3's and FLUX's [4, 8, 8] (patch 2, 2 x 2 packing: 16 tokens)
PIPELINES = {"wan": ("make_wan_pipeline", [5, 32, 32], 8), "sd3": ("make_sd3_pipeline", [16, 16], 16),
             "flux": ("make_flux_pipeline", [16, 16], 16)}


def pipeline_config(root: Path, folder: Path, out: Path, cp: int = 1, kind: str = "wan") -> Path:
    """A 2-step LoRA run of the tiny `kind` folder (synthetic base-model data, brightness reward) as TOML;
    with cp > 1 under FSDP2 with that many ranks per cp group."""
    from tests.test_pipeline_run import _toml

    (root / "train.txt").write_text("a red car\na blue bird\n")
    c = {
        "run": {"out_dir": str(out), "steps": 2, "eval_every": 100, "ckpt_every": 0, "progress": False},
        "model": {"kind": kind, "path": str(folder), "lora_rank": 4, "dtype": "fp32", "resolution": PIPELINES[kind][1]},
        "sampler": {"num_steps": 4, "shift": 3.0},
        "algorithm": {"group_size": 2, "beta_data": 0.5},
        "rollout": {"conditions_per_step": 2},
        "data": {"prompts": str(root / "train.txt"), "dataset": "captioned", "synthetic": True, "synthetic_count": 4},
        "eval": {"samples_per_class": 2, "heldout_loss_levels": 2},
        "rewards": {"brightness": 1.0},
    }
    if cp > 1:
        c["distributed"] = {"parallel": "fsdp", "context_parallel": cp}
    path = out.parent / f"{out.name}.toml"
    path.write_text(_toml(c))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", PIPELINES)
def test_cp2_training_reproduces_one_process(tmp_path, monkeypatch, kind):
    """The tiny Wan, SD3 and FLUX pipelines (2 heads, PIPELINES' tokens) trained 2 steps at
    context_parallel = 2 under FSDP2 equal the one-process run."""
    from tests import tiny_pipelines
    from tests.cp_worker import pipeline_trainer
    from tests.test_context_parallel import run_records

    make, _, tokens = PIPELINES[kind]
    folder = getattr(tiny_pipelines, make)(tmp_path / "models")
    monkeypatch.setenv("DDRL_ENGINE_CACHE", str(tmp_path / "cache"))
    plain = pipeline_trainer(pipeline_config(tmp_path, folder, tmp_path / "plain", kind=kind))
    assert plain.policy.tokens() == tokens
    records = run_records(plain)
    weights = plain._module().trainable_state_dict()
    _torchrun(2, "pipeline", tmp_path / "cp2", tmp_path / "cp2.json", "--config",
              pipeline_config(tmp_path, folder, tmp_path / "cp2", cp=2, kind=kind),
              env={"DDRL_ENGINE_CACHE": str(tmp_path / "cache")})
    run = json.loads((tmp_path / "cp2.json").read_text())
    assert run["world_size"] == 2 and run["data_size"] == 1 and run["cp_size"] == 2
    _assert_same(run["records"], records)
    for r in records:  # every compared figure moved: training did something to compare
        assert r["metrics"]["grad_norm"] > 0 and any(a != 0 for a in r["advantages"]), r
        assert all(math.isfinite(r["metrics"][k]) for k in LOSSES)
    got = torch.load(str(tmp_path / "cp2.json") + ".weights.pt")
    assert weights and set(weights) <= set(got) and all("lora_" in k for k in weights)
    for k, want in weights.items():
        torch.testing.assert_close(got[k], want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in weights.items() if "lora_B" in k)  # it trained


@pytest.mark.parametrize("kind", ["sd3", "flux", "wan", "wan22_a14b"])
def test_pipeline_cp_is_checked_from_the_folder_before_loading(kind, tmp_path, monkeypatch):
    """The folder's heads and tokens (pipelines.Preflight) are what the loaded adapter counts, and a cp size
    that cannot split them stops build_pipeline_run before any weight loads."""
    from dataclasses import replace

    from ddrl_engine.pipelines import load_bundle, preflight
    from ddrl_engine.trainer import pipeline_run
    from ddrl_engine.trainer.config import DistributedConfig, config_from_dict
    from tests import tiny_pipelines

    make = {"sd3": tiny_pipelines.make_sd3_pipeline, "flux": tiny_pipelines.make_flux_pipeline,
            "wan": tiny_pipelines.make_wan_pipeline, "wan22_a14b": tiny_pipelines.make_wan22_a14b_pipeline}[kind]
    folder = make(tmp_path / "model")
    model_kind = "wan" if kind.startswith("wan") else kind
    resolution = [5, 16, 16] if model_kind == "wan" else [32, 32]
    pre = preflight(model_kind, folder, resolution)
    policy = load_bundle(model_kind, folder, resolution=resolution, dtype=torch.float32, device="cpu").policy
    for model in policy.experts:
        assert pre.patch_tokens == policy.tokens(model)
        assert pre.attention_heads == model.config.num_attention_heads
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    cfg = config_from_dict({"model": {"kind": model_kind, "path": str(folder), "resolution": resolution},
                            "data": {"prompts": str(prompts), "synthetic": True}, "rewards": {"brightness": 1.0}})
    bad = pre.attention_heads + 1  # divides neither the heads nor (for these sizes) always the tokens
    cfg = replace(cfg, distributed=DistributedConfig(parallel="fsdp", context_parallel=bad))
    loaded = []
    monkeypatch.setattr(pipeline_run, "load_policy", lambda *a, **k: loaded.append(1))
    with pytest.raises(ValueError, match=rf"distributed.context_parallel = {bad}: the {model_kind} transformer"):
        pipeline_run.build_pipeline_run(cfg, log=lambda *a: None, progress=False)
    assert not loaded
