"""diffusers adapters on tiny randomly initialised configs (CPU, no weights downloaded)."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (pip install ddrl-engine[diffusers])")

from ddrl_engine.attention import attention_backend  # noqa: E402
from ddrl_engine.models.diffusers import (  # noqa: E402
    DDRLAttnProcessor,
    FluxPolicy,
    SD3Policy,
    TextCondition,
    WanPolicy,
)
from ddrl_engine.sampling import RectifiedFlowSDE, rollout  # noqa: E402

TEXT_DIM, POOLED_DIM, N_PROMPTS, TOKENS = 32, 16, 3, 5


def tiny_sd3():
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, caption_projection_dim=128, pooled_projection_dim=POOLED_DIM, out_channels=4,
        pos_embed_max_size=16)


def tiny_flux(guidance_embeds=False):
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, guidance_embeds=guidance_embeds,
        axes_dims_rope=(16, 24, 24))


def tiny_wan():
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)


CASES = {
    "sd3": (SD3Policy, tiny_sd3, (4, 8, 8)),
    "flux": (FluxPolicy, tiny_flux, (4, 8, 8)),
    "wan": (WanPolicy, tiny_wan, (4, 3, 8, 8)),
}


def prompts():
    g = torch.Generator().manual_seed(1)
    return TextCondition(torch.randn(N_PROMPTS + 1, TOKENS, TEXT_DIM, generator=g),
                         torch.randn(N_PROMPTS + 1, POOLED_DIM, generator=g))


def make(name):
    torch.manual_seed(0)
    cls, build, shape = CASES[name]
    return cls(build().eval(), shape, prompts()), shape


def inputs(shape, batch=2):
    g = torch.Generator().manual_seed(2)
    return torch.randn(batch, *shape, generator=g), torch.rand(batch, generator=g), torch.tensor([0, N_PROMPTS])


@pytest.mark.parametrize("name", sorted(CASES))
def test_shape_and_native_equivalence(name):
    policy, shape = make(name)
    assert policy.ddrl_attention and policy.num_classes == N_PROMPTS
    x, t, cond = inputs(shape)
    with torch.no_grad():
        ours = policy(x, t, cond)
        policy.use_ddrl_attention(False)
        assert not policy.ddrl_attention
        native = policy(x, t, cond)
    assert ours.shape == x.shape and ours.dtype == x.dtype
    assert torch.isfinite(ours).all()
    # The sdpa backend is diffusers' own attention: routing through our entry changes nothing.
    torch.testing.assert_close(ours, native, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fp8_backend_applies_to_the_adapter(name):
    policy, shape = make(name)
    x, t, cond = inputs(shape)
    with torch.no_grad():
        ref = policy(x, t, cond)
        with attention_backend("fp8"):
            fp8 = policy(x, t, cond)
    diff = (fp8 - ref).abs().max().item()
    assert 0 < diff < 0.05 * ref.abs().max().item(), diff


def test_processor_routes_through_the_attention_entry(monkeypatch):
    import ddrl_engine.models.diffusers as mod

    calls = []
    real = mod.attention
    monkeypatch.setattr(mod, "attention", lambda q, k, v, **kw: calls.append(q.shape) or real(q, k, v, **kw))
    policy, shape = make("sd3")
    with torch.no_grad():
        policy(*inputs(shape))
    assert len(calls) == 2  # one joint attention per block
    assert all(isinstance(p, DDRLAttnProcessor) for p in policy.model.attn_processors.values())


def test_cond_forms_agree():
    policy, shape = make("flux")
    x, t, ids = inputs(shape)
    bank = prompts()
    with torch.no_grad():
        by_id = policy(x, t, ids)
        by_text = policy(x, t, bank[ids])
        sliced = policy(x[:1], t[:1], bank[ids][0])
    torch.testing.assert_close(by_id, by_text)
    torch.testing.assert_close(sliced, by_id[:1], atol=1e-5, rtol=1e-5)
    wan, wshape = make("wan")
    wx, wt, wids = inputs(wshape)
    with torch.no_grad():
        torch.testing.assert_close(wan(wx, wt, bank.embeds[wids]), wan(wx, wt, wids))


def test_errors_are_clear(tmp_path):
    policy, shape = make("sd3")
    x, t, _ = inputs(shape)
    with pytest.raises(ValueError, match="pooled"):
        policy(x, t, TextCondition(torch.randn(2, TOKENS, TEXT_DIM)))
    with pytest.raises(ValueError, match="rows"):
        policy(x, t, prompts())
    bare = SD3Policy(tiny_sd3(), shape)
    with pytest.raises(ValueError, match="prompt bank"):
        bare(x, t, torch.tensor([0, 1]))
    with pytest.raises(FileNotFoundError, match="local directory only"):
        SD3Policy.from_pretrained(tmp_path / "missing", shape)
    with pytest.raises(FileNotFoundError, match="config.json"):
        SD3Policy.from_pretrained(tmp_path, shape)
    with pytest.raises(TypeError, match="FluxTransformer2DModel"):
        FluxPolicy(tiny_sd3(), shape)
    with pytest.raises(ValueError, match="in_channels/4"):
        FluxPolicy(tiny_flux(), (16, 8, 8))


def test_flux_guidance_embeds():
    torch.manual_seed(0)
    policy = FluxPolicy(tiny_flux(guidance_embeds=True).eval(), (4, 8, 8))
    x, t, _ = inputs((4, 8, 8))
    bank = prompts()
    with pytest.raises(ValueError, match="guidance"):
        policy(x, t, bank[:2])
    cond = TextCondition(bank.embeds[:2], bank.pooled[:2], torch.full((2,), 3.5))
    with torch.no_grad():
        assert policy(x, t, cond).shape == x.shape


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_and_load_round_trip(name, tmp_path):
    policy, shape = make(name)
    x, t, cond = inputs(shape)
    policy.save_pretrained(tmp_path / "transformer")
    cls = CASES[name][0]
    loaded = cls.from_pretrained(tmp_path / "transformer", shape, prompts())
    assert loaded.ddrl_attention
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x, t, cond), policy(x, t, cond))


def test_lora_trains_only_adapters():
    policy, shape = make("sd3")
    x, t, cond = inputs(shape)
    with torch.no_grad():
        before = policy(x, t, cond)
    n_trainable = policy.enable_lora(rank=4)
    assert policy.lora_enabled
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and n_trainable == sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert all("lora_" in n for n in trainable), [n for n in trainable if "lora_" not in n]
    # LoRA B starts at zero: the policy is unchanged, and still routed through our attention.
    assert policy.ddrl_attention
    out = policy(x, t, cond)
    torch.testing.assert_close(out, before)
    out.square().mean().backward()
    grads = [p.grad for p in policy.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_rollout_runs_on_an_adapter():
    policy, shape = make("sd3")
    sampler = RectifiedFlowSDE(num_steps=2)
    cond = torch.tensor([0, 1, N_PROMPTS])
    with torch.no_grad():
        out = rollout(policy, sampler, cond, generator=torch.Generator().manual_seed(0), sample_shape=shape)
    assert out.samples.shape == (3, *shape) and torch.isfinite(out.log_probs).all()


BLOCKS = {"sd3": ["transformer_blocks"], "flux": ["transformer_blocks", "single_transformer_blocks"], "wan": ["blocks"]}


@pytest.mark.parametrize("name", sorted(CASES))
def test_blocks_are_the_transformer_blocks(name):
    from ddrl_engine.trainer.distributed import checkpoint_blocks

    policy, shape = make(name)
    want = [b for attr in BLOCKS[name] for b in getattr(policy.model, attr)]
    assert want and [id(b) for b in policy.blocks] == [id(b) for b in want]
    # Every block parameter belongs to the policy: sharding per block then the root covers them all once.
    ids = {id(p) for p in policy.parameters()}
    assert all(id(p) in ids for b in policy.blocks for p in b.parameters())

    # Activation checkpointing recomputes each block in backward: same outputs and gradients.
    x, t, cond = inputs(shape)
    plain, _ = make(name)
    calls = []
    first, inner = policy.blocks[0], policy.blocks[0].forward
    first.forward = lambda *a, **k: calls.append(1) or inner(*a, **k)
    checkpoint_blocks(policy)
    results = []
    for p in (plain, policy):
        p.train()
        out = p(x, t, cond)
        out.square().mean().backward()
        results.append((out.detach(), {n: q.grad for n, q in p.named_parameters() if q.grad is not None}))
    (out_a, grads_a), (out_b, grads_b) = results
    assert len(calls) == 2  # forward, then the recomputation in backward
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == sum(1 for _ in plain.parameters())
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=0, atol=0, msg=n)
