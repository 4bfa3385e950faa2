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


def _fsdp_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from ddrl_engine.trainer.distributed import Distributed

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        policy = tiny_wan_policy()
        Distributed("fsdp", rank, world, "cpu").fully_shard(policy)
        torch.manual_seed(1)  # the same batch on every rank
        opt = one_step(policy)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(held_bytes(policy, opt), f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_shards_match_at_world_size_2(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "held")), nprocs=2)
    ranks = [json.loads((tmp_path / f"held.{r}").read_text()) for r in range(2)]
    policy = tiny_wan_policy()
    est = estimate_memory(policy, tokens=48, world_size=2)
    total = 4 * sum(p.numel() for p in policy.parameters())
    for part, factor in (("weights (fp32)", 1), ("gradients (fp32)", 1), ("AdamW states (fp32)", 2)):
        # The estimate is the largest rank's shard (rank 0: ceil(rows / 2) rows of every parameter).
        assert est.parts[part] == max(r[part] for r in ranks) == ranks[0][part], part
        assert sum(r[part] for r in ranks) == factor * total, part


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_activation_factors_match_what_autograd_saves(dtype):
    """Re-measures ACTIVATION_FACTORS: saved bytes per token of a Wan model at 1 and 2 blocks, two FFN widths."""
    def per_token(layers, ffn):
        policy = tiny_wan_policy(layers=layers, ffn=ffn, dtype=dtype)
        policy.model.requires_grad_(True)
        sizes = []
        for hw in (8, 16):
            x = torch.randn(1, 4, 2, hw, hw, dtype=dtype)
            fn = lambda: policy.model(hidden_states=x, timestep=torch.tensor([500.0]),  # noqa: E731
                                      encoder_hidden_states=torch.randn(1, 5, 16, dtype=dtype), return_dict=False)
            sizes.append((2 * hw * hw // 4, saved_tensor_bytes(fn, list(policy.parameters()) + [x])))
        (n1, b1), (n2, b2) = sizes
        return (b2 - b1) / (n2 - n1)

    ah, af, ao = ACTIVATION_FACTORS[dtype.itemsize]
    hidden = 64
    for ffn in (128, 512):
        one, two = per_token(1, ffn), per_token(2, ffn)
        block = two - one
        assert block == pytest.approx(ah * hidden + af * ffn, rel=0.1), (ffn, block)
        assert one - block == pytest.approx(ao * hidden, rel=0.35), (ffn, one - block)


def test_presets_match_the_diffusers_models():
    for name, preset in PRESETS.items():
        with torch.device("meta"):
            model = diffusers.WanTransformer3DModel(**preset.config)
        shape = ModelShape.from_module(model)
        s = preset.shape
        assert (shape.params, shape.block_params, shape.num_blocks, shape.hidden, shape.ffn_dim, shape.latent_per_token) \
            == (s.params, s.block_params, s.num_blocks, s.hidden, s.ffn_dim, s.latent_per_token), name
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
