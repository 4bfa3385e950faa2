"""DiT policy and the attention entry point."""

import pytest
import torch

from ddrl_engine.attention import attention, attention_backend, current_attention_backend
from ddrl_engine.models import DiT, DiTConfig, Policy

VIDEO = DiTConfig(in_channels=4, sample_size=(3, 8, 8), patch_size=(1, 2, 2), hidden=48, depth=2, heads=2)
CONFIGS = {
    "digits": (DiTConfig(), (3, 1, 8, 8)),
    "rect_rgb": (
        DiTConfig(in_channels=3, sample_size=(8, 12), patch_size=(4, 2), hidden=32, depth=1, heads=2),
        (2, 3, 8, 12),
    ),
    "video": (VIDEO, (2, 4, 3, 8, 8)),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The models here are tiny: intra-op threads only add synchronisation, and on a loaded 2-core
    # machine two spinning OpenMP threads made this file 10x slower (1.5 s -> 18 s).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(shape, num_classes):
    b = shape[0]
    return torch.randn(shape), torch.rand(b), torch.randint(0, num_classes + 1, (b,))


def _randomise_zero_params(model):
    # adaLN-Zero makes most gradients exactly zero at init; give zero-initialised weights some value.
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().any():
                p.normal_(std=0.05)


# --- attention -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 5, 8), (1, 1, 1, 4), (3, 2, 17, 16)])
def test_attention_sdpa_matches_reference(shape):
    q, k, v = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    scale = 0.3
    ref = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v
    torch.testing.assert_close(attention(q, k, v, backend="sdpa", scale=scale), ref)


def test_attention_context_switches_backend():
    q = torch.randn(1, 2, 4, 64)
    assert current_attention_backend() == "sdpa"
    with attention_backend("fp8") as name:
        assert name == "fp8" and current_attention_backend() == "fp8"
        with pytest.raises(ValueError, match="head dim D must be one of"):
            attention(q[..., :8], q[..., :8], q[..., :8])  # fp8 ran: sdpa takes any head dim
        fp8 = attention(q, q, q)
        sdpa = attention(q, q, q, backend="sdpa")  # an explicit choice wins
        assert not torch.equal(fp8, sdpa) and torch.allclose(fp8, sdpa, atol=0.1)
    assert current_attention_backend() == "sdpa"


def test_attention_context_restored_after_error():
    with pytest.raises(RuntimeError):
        with attention_backend("fp8"):
            raise RuntimeError("boom")
    assert current_attention_backend() == "sdpa"


def test_attention_rejects_bad_arguments():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="backend='flash'"):
        attention(q, q, q, backend="flash")
    with pytest.raises(ValueError, match="name='nope'"):
        with attention_backend("nope"):
            pass
    with pytest.raises(ValueError, match=r"q must have shape \[B, H, S, D\]"):
        attention(q[0], q, q)
    with pytest.raises(ValueError, match="head dim"):
        attention(q, torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4))


def test_dit_uses_attention_backend_context():
    model = DiT(DiTConfig(depth=1, hidden=128, heads=2))  # head dim 64: fp8 supports it
    _randomise_zero_params(model)
    x, t, c = _inputs((2, 1, 8, 8), 10)
    with attention_backend("fp8"), pytest.raises(RuntimeError, match="forward only"):
        model(x, t, c)  # the parameters need gradients: fp8 refuses, pointing to sdpa
    with torch.no_grad():
        want = model(x, t, c)
        with attention_backend("fp8"):
            got = model(x, t, c)
    assert not torch.equal(got, want) and torch.allclose(got, want, atol=0.05 * want.abs().max().item())


# --- DiT --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_dit_output_shape_and_zero_init(name):
    cfg, shape = CONFIGS[name]
    model = DiT(cfg)
    assert isinstance(model, Policy) and model.sample_shape == shape[1:] and model.null_class == cfg.num_classes
    out = model(*_inputs(shape, cfg.num_classes))
    assert out.shape == shape and out.dtype == torch.float32
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("name", CONFIGS)
def test_dit_gradients_reach_every_parameter(name):
    cfg, shape = CONFIGS[name]
    model = DiT(cfg)
    x, t, c = _inputs(shape, cfg.num_classes)
    target = torch.randn(shape)
    (model(x, t, c) - target).square().mean().backward()
    assert model.final.linear.weight.grad.abs().sum() > 0  # the zero output layer is trainable at init
    model.zero_grad()
    _randomise_zero_params(model)
    x.requires_grad_(True)
    (model(x, t, c) - target).square().mean().backward()
    assert x.grad.abs().sum() > 0
    for pname, p in model.named_parameters():
        if pname == "class_embed.weight":  # only the rows of classes present in c get gradient
            assert p.grad[c.unique()].abs().sum() > 0
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", CONFIGS)
def test_patchify_roundtrip_and_token_order(name):
    cfg, shape = CONFIGS[name]
    model = DiT(cfg)
    x = torch.randn(shape)
    tokens = model.patchify(x)
    patch_numel = cfg.in_channels * torch.Size(cfg.patch_size).numel()
    assert tokens.shape == (shape[0], torch.Size(cfg.grid).numel(), patch_numel)
    torch.testing.assert_close(model.unpatchify(tokens, cfg.grid), x, rtol=0, atol=0)
    first_patch = x[(slice(None), slice(None)) + tuple(slice(0, p) for p in cfg.patch_size)]
    torch.testing.assert_close(tokens[:, 0], first_patch.reshape(shape[0], -1), rtol=0, atol=0)


def test_dit_depends_on_t_and_cond():
    model = DiT(DiTConfig(depth=2))
    _randomise_zero_params(model)
    x, t, c = _inputs((4, 1, 8, 8), 10)
    base = model(x, t, c)
    assert not torch.allclose(base, model(x, torch.rand(4), c))
    assert not torch.allclose(base, model(x, t, (c + 1) % 11))
    # 0-dim t is broadcast over the batch
    torch.testing.assert_close(model(x, torch.tensor(0.5), c), model(x, torch.full((4,), 0.5), c))


def test_dit_trains_on_a_batch(seed):
    model = DiT(DiTConfig(hidden=32, depth=1, heads=2))
    x, t, c = _inputs((8, 1, 8, 8), 10)
    target = torch.randn_like(x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = (model(x, t, c) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_dit_config_and_input_errors():
    with pytest.raises(ValueError, match="patch_size"):
        DiTConfig(sample_size=(8, 8), patch_size=(3, 3))
    with pytest.raises(ValueError, match="heads"):
        DiTConfig(hidden=10, heads=4)
    with pytest.raises(ValueError, match="one entry per axis"):
        DiTConfig(sample_size=(4, 8, 8), patch_size=(2, 2))
    assert DiTConfig(sample_size=[8, 8], patch_size=[2, 2]).grid == (4, 4)  # lists from JSON configs
    model = DiT(DiTConfig(depth=1))
    x, t, c = _inputs((2, 1, 8, 8), 10)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 3, 8, 8), t, c)
    with pytest.raises(ValueError, match="t must have shape"):
        model(x, torch.rand(3), c)
    with pytest.raises(TypeError, match="cond must be a long tensor"):
        model(x, t, c.float())
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model(torch.randn(2, 1, 7, 8), t, c)
