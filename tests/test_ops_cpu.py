"""The fused ops on CPU against float64 references: values, gradients, layouts, errors,
batch invariance, opcheck and torch.compile."""
import pytest
import torch

import ddrl_engine  # noqa: F401
from ddrl_engine import ops
from ddrl_engine.ops.reference import diffusion_loss_ref, step_logprob_ref
from tests.tolerances import reduction_tol, tol

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (3, 7), (2, 8193), (2, 3, 5, 8, 8), (4, 2, 4099)]


def rand(shape, dtype, requires_grad=False):
    return torch.randn(shape, dtype=dtype).requires_grad_(requires_grad)


def coef(kind, n):
    return 0.37 if kind == "float" else torch.rand(n) * 2 - 1


def leaf64(t):
    return t.detach().double().requires_grad_(t.requires_grad)


def assert_grads(pairs):
    for got, want in pairs:
        assert got is not None and want is not None
        torch.testing.assert_close(got.double(), want, **tol(got.dtype))


# ---- diffusion_loss ---------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_diffusion_loss_matches_float64(shape, dtype, reduction, seed):
    n = shape[0]
    pred, x0, noise = (rand(shape, dtype, True) for _ in range(3))
    nc, dc, w = coef("tensor", n), coef("float", n), torch.rand(n) + 0.5
    kw = dict(noise_coef=nc, data_coef=dc, weight=w, reduction=reduction)
    got = ops.diffusion_loss(pred, x0, noise, **kw)
    ins64 = [leaf64(t) for t in (pred, x0, noise)]
    want = diffusion_loss_ref(*ins64, **kw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, **reduction_tol())
    upstream = torch.randn_like(want)
    (got.double() * upstream).sum().backward()
    (want * upstream).sum().backward()
    assert_grads([(pred.grad, ins64[0].grad), (x0.grad, ins64[1].grad), (noise.grad, ins64[2].grad)])


@pytest.mark.parametrize("target", [(1.0, 0.0), (0.0, 1.0), (1.0, -1.0)])
def test_diffusion_loss_standard_targets(target, seed):
    pred, x0, noise = (torch.randn(4, 33) for _ in range(3))
    nc, dc = target
    got = ops.diffusion_loss(pred, x0, noise, noise_coef=nc, data_coef=dc, reduction="none")
    want = ((pred - (nc * noise + dc * x0)) ** 2).mean(dim=1)
    torch.testing.assert_close(got, want)


def test_diffusion_loss_mixed_dtypes_and_only_pred_grad(seed):
    pred = rand((3, 40), torch.bfloat16, True)
    x0, noise = rand((3, 40), torch.float32), rand((3, 40), torch.float16)
    got = ops.diffusion_loss(pred, x0, noise, noise_coef=1.0, data_coef=-1.0)
    p64 = leaf64(pred)
    want = diffusion_loss_ref(p64, x0, noise, noise_coef=1.0, data_coef=-1.0)
    torch.testing.assert_close(got.double(), want, **reduction_tol())
    got.backward()
    want.backward()
    assert pred.grad.dtype == torch.bfloat16
    assert_grads([(pred.grad, p64.grad)])


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
def test_diffusion_loss_non_contiguous(layout, seed):
    base = torch.randn(6, 10, 12)
    if layout == "transposed":
        pred = base.transpose(1, 2)
    elif layout == "strided":
        pred = base[:, ::2, 1:]
    else:
        pred = torch.randn(6, 1, 12).expand(6, 10, 12)
    assert not pred.is_contiguous()
    pred = pred.requires_grad_() if pred.is_leaf else pred.detach().requires_grad_()
    x0, noise = torch.randn(pred.shape), torch.randn(pred.shape)
    got = ops.diffusion_loss(pred, x0, noise, noise_coef=0.5, data_coef=0.5, reduction="none")
    want = diffusion_loss_ref(pred.contiguous(), x0, noise, noise_coef=0.5, data_coef=0.5, reduction="none")
    torch.testing.assert_close(got.double(), want, **reduction_tol())
    got.sum().backward()
    torch.testing.assert_close(pred.grad, (2 * (pred - 0.5 * noise - 0.5 * x0) / pred[0].numel()).detach())


def test_diffusion_loss_zero_rows():
    z = torch.randn(0, 5, requires_grad=True)
    assert ops.diffusion_loss(z, z, z, noise_coef=1.0, data_coef=0.0, reduction="none").shape == (0,)
    total = ops.diffusion_loss(z, z, z, noise_coef=1.0, data_coef=0.0, reduction="sum")
    total.backward()
    assert total.item() == 0.0 and z.grad.shape == (0, 5)


# ---- step_logprob -----------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_offset", [False, True])
def test_step_logprob_matches_float64(shape, dtype, reduction, with_offset, seed):
    n = shape[0]
    x, model_out = rand(shape, dtype, True), rand(shape, dtype, True)
    offset = rand(shape, dtype, True) if with_offset else None
    std = torch.rand(n) + 0.2
    xc, oc = coef("tensor", n), coef("float", n)
    mu = (xc.reshape(-1, *[1] * (len(shape) - 1)) * x.detach().float() + oc * model_out.detach().float())
    x_next = (mu + 0.7 * torch.randn(shape)).to(dtype).requires_grad_()
    kw = dict(x_coef=xc, out_coef=oc, std=std, reduction=reduction)
    got = ops.step_logprob(x_next, x, model_out, offset=offset, **kw)
    ins64 = [None if t is None else leaf64(t) for t in (x_next, x, model_out, offset)]
    want = step_logprob_ref(*ins64[:3], offset=ins64[3], **kw)
    assert got.shape == (n,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, **reduction_tol())
    upstream = torch.randn(n, dtype=torch.float64)
    (got.double() * upstream).sum().backward()
    (want * upstream).sum().backward()
    pairs = [(a.grad, b.grad) for a, b in zip((x_next, x, model_out, offset), ins64) if a is not None]
    # Gradient scale grows with 1/std^2 and the element count; compare relative to its size.
    for got_g, want_g in pairs:
        scale = want_g.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(got_g.double() / scale, want_g / scale, **tol(got_g.dtype))


def test_step_logprob_is_gaussian_density(seed):
    # Sum reduction of an [N, 1] row is exactly the scalar normal log-density.
    x_next, x, out = torch.randn(5, 1), torch.randn(5, 1), torch.randn(5, 1)
    lp = ops.step_logprob(x_next, x, out, x_coef=0.8, out_coef=-0.3, std=0.6, reduction="sum")
    want = torch.distributions.Normal(0.8 * x - 0.3 * out, 0.6).log_prob(x_next).squeeze(1)
    torch.testing.assert_close(lp, want)


def test_step_logprob_grad_only_model_out(seed):
    x_next, x = torch.randn(3, 50), torch.randn(3, 50)
    out = torch.randn(3, 50, requires_grad=True)
    lp = ops.step_logprob(x_next, x, out, x_coef=1.0, out_coef=-0.1, std=0.3)
    lp.sum().backward()
    want = (x_next - (x - 0.1 * out.detach())) / 0.09 * -0.1 / 50
    torch.testing.assert_close(out.grad, want, rtol=1e-5, atol=1e-6)


# ---- properties shared by both ops --------------------------------------------------------

@pytest.mark.parametrize("op", ["diffusion_loss", "step_logprob"])
def test_backward_is_one_scale_rows_per_input_and_nothing_else(op, seed):
    """A backward reads the stored residual once per input gradient (ddrl::scale_rows) and does nothing of
    the input's size besides: no zero-filled gradient of the residual output (autograd materialised one
    on every backward, 4x the backward's own cost on CPU, before set_materialize_grads(False))."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.big = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = lambda tree: [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]  # noqa: E731
            seen = {t.untyped_storage().data_ptr() for t in tensors((args, kwargs))}
            # input-sized results in new memory (views and in-place results, e.g. detach, are not work)
            if any(t.numel() >= 4 * 4096 and t.untyped_storage().data_ptr() not in seen for t in tensors(out)):
                self.big.append(str(func.overloadpacket))
            return out

    a, b, c = (rand((4, 4096), torch.float32, True) for _ in range(3))
    if op == "diffusion_loss":
        loss = ops.diffusion_loss(a, b, c, noise_coef=torch.rand(4), data_coef=-1.0)
    else:
        loss = ops.step_logprob(a, b, c, x_coef=torch.rand(4), out_coef=0.3, std=torch.rand(4) + 0.5).sum()
    with Calls() as calls:
        loss.backward()
    assert calls.big == ["ddrl.scale_rows"] * 3, calls.big
    assert all(t.grad is not None and t.grad.shape == (4, 4096) for t in (a, b, c))


@pytest.mark.parametrize("cols", [7, 8192, 20001])
def test_batch_invariance_bitwise(cols, seed):
    """A row's result must not depend on what else is in the batch (on-policy ratio == 1)."""
    n = 9
    a, b, c = (torch.randn(n, cols) for _ in range(3))
    std = torch.rand(n) + 0.1
    full_lp = ops.step_logprob(a, b, c, x_coef=0.9, out_coef=-0.2, std=std)
    full_dl = ops.diffusion_loss(a, b, c, noise_coef=1.0, data_coef=-1.0, reduction="none")
    for i in (0, 4, n - 1):
        one_lp = ops.step_logprob(a[i:i + 1], b[i:i + 1], c[i:i + 1], x_coef=0.9, out_coef=-0.2, std=std[i:i + 1])
        one_dl = ops.diffusion_loss(a[i:i + 1], b[i:i + 1], c[i:i + 1], noise_coef=1.0, data_coef=-1.0, reduction="none")
        assert torch.equal(one_lp, full_lp[i:i + 1])
        assert torch.equal(one_dl, full_dl[i:i + 1])
    sub = ops.step_logprob(a[2:7], b[2:7], c[2:7], x_coef=0.9, out_coef=-0.2, std=std[2:7])
    assert torch.equal(sub, full_lp[2:7])


def test_thread_count_does_not_change_results(seed):
    a, b, c = (torch.randn(4, 50000) for _ in range(3))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.step_logprob(a, b, c, x_coef=1.0, out_coef=0.5, std=0.4)
        torch.set_num_threads(max(2, before))
        many = ops.step_logprob(a, b, c, x_coef=1.0, out_coef=0.5, std=0.4)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def _bad(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_bad_inputs_name_the_argument():
    t = torch.randn(3, 4)
    dl = ops.diffusion_loss
    sl = ops.step_logprob
    _bad(lambda: dl(t, torch.randn(3, 5), t, noise_coef=1.0, data_coef=0.0), ValueError, "'x0' has shape")
    _bad(lambda: dl(t, t, t, noise_coef=torch.ones(2), data_coef=0.0), ValueError, "'noise_coef' must have shape \\[3\\]")
    _bad(lambda: dl(t, t.long(), t, noise_coef=1.0, data_coef=0.0), TypeError, "'x0' must be float32")
    _bad(lambda: dl(t, t, t, noise_coef=1.0, data_coef=0.0, reduction="avg"), ValueError, "'reduction'")
    _bad(lambda: dl(t, t, t, noise_coef=1.0, data_coef=0.0, weight=torch.ones(4)), ValueError, "'weight'")
    _bad(lambda: dl(torch.randn(()), torch.randn(()), torch.randn(()), noise_coef=1.0, data_coef=0.0), ValueError, "at least 1 dimension")
    _bad(lambda: dl(t, t, t.to("meta"), noise_coef=1.0, data_coef=0.0), ValueError, "'noise' is on meta")
    _bad(lambda: dl(torch.randn(3, 0), torch.randn(3, 0), torch.randn(3, 0), noise_coef=1.0, data_coef=0.0), ValueError, "no elements")
    _bad(lambda: dl(t, t, t, noise_coef=float("nan"), data_coef=0.0), ValueError, "finite")
    _bad(lambda: sl(t, t, t, x_coef=1.0, out_coef=1.0, std=0.0), ValueError, "'std' must be > 0")
    _bad(lambda: sl(t, t, t, x_coef=1.0, out_coef=1.0, std=torch.tensor([0.1, -1.0, 0.2])), RuntimeError, "'std' must be > 0")
    _bad(lambda: sl(t, t, t, x_coef=1.0, out_coef=1.0, std=1.0, reduction="none"), ValueError, "'reduction'")
    _bad(lambda: sl(t, t, t, x_coef=torch.ones(3, 1), out_coef=1.0, std=1.0), ValueError, "'x_coef' must have shape")
    _bad(lambda: sl(t, t, t.int(), x_coef=1.0, out_coef=1.0, std=1.0), TypeError, "'model_out'")
    _bad(lambda: sl(t, t, t, x_coef=1.0, out_coef=1.0, std=1.0, offset=torch.randn(3, 3)), ValueError, "'offset' has shape")
    _bad(lambda: sl(t, t, t, x_coef=torch.ones(3, dtype=torch.int64), out_coef=1.0, std=1.0), TypeError, "'x_coef' must be a floating")


def test_raw_op_checks_in_cpp():
    """Direct torch.ops calls (bypassing the Python wrapper) are still checked, naming the argument."""
    t = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="'noise_coef' has length 2"):
        torch.ops.ddrl.diffusion_loss_rows(t, t, t, torch.ones(2), torch.ones(3), False)
    with pytest.raises(RuntimeError, match="'x' has shape"):
        torch.ops.ddrl.step_logprob_rows(t, torch.randn(3, 5), t, None, torch.ones(3), torch.ones(3), torch.ones(3), True, False)
    with pytest.raises(RuntimeError, match="'std' must be float32"):
        torch.ops.ddrl.step_logprob_rows(t, t, t, None, torch.ones(3), torch.ones(3), torch.ones(3).double(), True, False)


CUDA_PARAM = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                              reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", CUDA_PARAM])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype, device):
    x = torch.randn(4, 3, 6, dtype=dtype, device=device)
    coefs = [torch.rand(4, device=device) for _ in range(3)]
    for write_grad in (False, True):
        xr = x.clone().requires_grad_(write_grad)
        torch.library.opcheck(torch.ops.ddrl.diffusion_loss_rows.default, (xr, x.clone(), x.clone(), coefs[0], coefs[1], write_grad))
        torch.library.opcheck(torch.ops.ddrl.step_logprob_rows.default,
                              (x.clone(), x.clone(), xr, None, coefs[0], coefs[1], coefs[2] + 0.1, True, write_grad))
        torch.library.opcheck(torch.ops.ddrl.step_logprob_rows.default,
                              (x.clone(), x.clone(), xr, x.clone(), coefs[0], coefs[1], coefs[2] + 0.1, False, write_grad))
    torch.library.opcheck(torch.ops.ddrl.scale_rows.default, (x, coefs[0], torch.float16))


def test_torch_compile_fullgraph(seed):
    def step(pred, x0, noise, x_next, x, std):
        dl = ops.diffusion_loss(pred, x0, noise, noise_coef=1.0, data_coef=-1.0)
        lp = ops.step_logprob(x_next, x, pred, x_coef=0.95, out_coef=-0.05, std=std)
        return dl + lp.mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    pred = torch.randn(4, 2, 8, 8, requires_grad=True)
    others = [torch.randn(4, 2, 8, 8) for _ in range(4)]
    std = torch.rand(4) + 0.5
    eager_out = step(pred, *others, std)
    (g_eager,) = torch.autograd.grad(eager_out, pred)
    out = compiled(pred, *others, std)
    (g_comp,) = torch.autograd.grad(out, pred)
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(g_comp, g_eager)


@pytest.mark.slow
def test_torch_compile_inductor(seed):
    fn = torch.compile(lambda p, a, b: ops.diffusion_loss(p, a, b, noise_coef=1.0, data_coef=-1.0), fullgraph=True)
    p = torch.randn(3, 64, requires_grad=True)
    a, b = torch.randn(3, 64), torch.randn(3, 64)
    out = fn(p, a, b)
    out.backward()
    want = diffusion_loss_ref(p.detach(), a, b, noise_coef=1.0, data_coef=-1.0)
    torch.testing.assert_close(out.double(), want, **reduction_tol())
    torch.testing.assert_close(p.grad, 2 * (p - (b - a)).detach() / p.numel())


def test_zero_dim_coefficients_broadcast_to_every_row(seed):
    pred, x0, noise = (torch.randn(3, 10) for _ in range(3))
    got = ops.diffusion_loss(pred, x0, noise, noise_coef=torch.tensor(1.0), data_coef=torch.tensor(-1.0), reduction="none")
    torch.testing.assert_close(got, ops.diffusion_loss(pred, x0, noise, noise_coef=1.0, data_coef=-1.0, reduction="none"))
    lp = ops.step_logprob(pred, x0, noise, x_coef=torch.tensor(0.9), out_coef=0.1, std=torch.tensor(0.5))
    torch.testing.assert_close(lp, ops.step_logprob(pred, x0, noise, x_coef=0.9, out_coef=0.1, std=0.5))


# ---- the vectorised CPU kernels: reduction order, capabilities, buffer reuse ----------------

# Column counts around the kernels' edges: the 16 lanes, the 32-element AVX-512 step, a chunk
# (8192) and a chunk plus a partial vector.
ORDER_COLS = [1, 15, 16, 17, 31, 33, 100, 8192, 8209, 16421]


def _lane_order_sum(sq: "np.ndarray") -> "np.float32":
    """Sum of float32 values in the documented fixed order (ddrl/row_math.h): chunks of 8192; in a
    chunk lane l adds the elements at positions l mod 16 in order, the lanes fold pairwise
    (l += l + w for w = 8, 4, 2, 1); chunk partials are added in order, starting from 0."""
    import numpy as np

    total = np.float32(0)
    for start in range(0, sq.shape[0], 8192):
        chunk = sq[start:start + 8192]
        pad = (-chunk.shape[0]) % 16
        lanes = np.concatenate([chunk, np.zeros(pad, np.float32)]).reshape(-1, 16)
        acc = np.cumsum(lanes, axis=0, dtype=np.float32)[-1].copy()  # sequential per lane
        w = 8
        while w:
            acc[:w] = acc[:w] + acc[w:2 * w]
            w //= 2
        total = np.float32(total + acc[0])
    return total


@pytest.mark.parametrize("cols", ORDER_COLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_sums_follow_the_documented_order_bitwise(cols, dtype, seed):
    """The vector kernels must keep the scalar reference order exactly: an fp32 emulation of it
    (numpy float32, no FMA) gives the same bits as the kernel for every row."""
    import numpy as np

    n = 3
    p, d, e = (torch.randn(n, cols).to(dtype) for _ in range(3))
    nc, dc = torch.rand(n) * 2 - 1, torch.rand(n) * 2 - 1
    got = ops.diffusion_loss(p, d, e, noise_coef=nc, data_coef=dc, reduction="none")
    std = torch.rand(n) + 0.2
    xc, oc = torch.rand(n), torch.rand(n) - 0.5
    off = torch.randn(n, cols).to(dtype)
    got_lp = ops.step_logprob(p, d, e, offset=off, x_coef=xc, out_coef=oc, std=std, reduction="sum")
    f32 = lambda t: t.float().numpy()  # noqa: E731  (exact: every storage dtype widens exactly)
    for i in range(n):
        a, b = np.float32(nc[i]), np.float32(dc[i])
        r = f32(p[i]) - (a * f32(e[i]) + b * f32(d[i]))
        want = _lane_order_sum(r * r) / np.float32(cols)
        assert got[i].item() == want, (i, got[i].item(), float(want))
        delta = f32(p[i]) - (np.float32(xc[i]) * f32(d[i]) + np.float32(oc[i]) * f32(e[i]) + f32(off[i]))
        s = np.float32(std[i])
        sum_sq = _lane_order_sum(delta * delta)
        # the C library's logf, which the kernel calls (numpy's float32 log differs in the last bit for
        # ~3% of inputs, and with cancellation that is several ulps of lp)
        const = np.float32(_libm_logf(float(s))) + np.float32(0.91893853320467274178)
        want_lp = -(sum_sq / (np.float32(2) * s * s)) - const * np.float32(cols)
        assert got_lp[i].item() == float(want_lp), (i, got_lp[i].item(), float(want_lp))


def _libm_logf(x: float) -> float:
    import ctypes
    import ctypes.util

    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.logf.restype, libm.logf.argtypes = ctypes.c_float, [ctypes.c_float]
    return libm.logf(x)


def _capability_outputs(ins: dict) -> dict:
    """Values, gradients (from the stored residuals) and scale_rows of every input set, on the CPU
    capability this process runs (ATEN_CPU_CAPABILITY)."""
    out = {"capability": torch.backends.cpu.get_cpu_capability()}
    for key, (tensors, nc, dc, std) in ins.items():
        p, d, e, off = (t.clone().requires_grad_() for t in tensors)
        dl = ops.diffusion_loss(p, d, e, noise_coef=nc, data_coef=dc, reduction="none")
        dl.sum().backward()
        lp = ops.step_logprob(p.detach(), d, e, offset=off, x_coef=nc, out_coef=dc, std=std)
        lp.sum().backward()
        out[key] = [dl.detach(), lp.detach(), p.grad, d.grad, e.grad, off.grad,
                    torch.ops.ddrl.scale_rows(p.detach(), std, torch.float16)]
    return out


_CAPABILITY_SCRIPT = (
    "import sys, torch\n"
    "from tests.test_ops_cpu import _capability_outputs\n"
    "torch.save(_capability_outputs(torch.load(sys.argv[1])), sys.argv[2])\n"
)


def _capabilities_here() -> list[str]:
    order = ["DEFAULT", "AVX2", "AVX512"]
    best = torch.backends.cpu.get_cpu_capability()
    return order[:order.index(best) + 1] if best in order else ["DEFAULT"]


@pytest.mark.skipif(len(_capabilities_here()) < 2, reason="this CPU has no vector capability beyond DEFAULT")
def test_every_cpu_capability_gives_the_same_bits(tmp_path, seed):
    """DEFAULT, AVX2 and AVX-512 builds of the kernels (ATEN_CPU_CAPABILITY picks one, as for ATen's
    own kernels) agree bitwise on values, stored residuals and gradients, and match float64."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    ins = {}
    for dtype in DTYPES:
        for cols in (45, 8209):
            tensors = [torch.randn(3, cols).to(dtype) for _ in range(4)]
            ins[f"{dtype}/{cols}"] = (tensors, torch.rand(3) * 2 - 1, torch.rand(3) - 0.5, torch.rand(3) + 0.3)
    torch.save(ins, tmp_path / "in.pt")
    caps = _capabilities_here()
    results = {caps[-1]: _capability_outputs(ins)}  # this process runs the best one
    root = Path(__file__).resolve().parents[1]
    for cap in caps[:-1]:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap.lower(), OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-c", _CAPABILITY_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / f"{cap}.pt")],
                       cwd=root, env=env, check=True, timeout=120)
        results[cap] = torch.load(tmp_path / f"{cap}.pt")
    for cap, res in results.items():
        assert res["capability"] == cap
    base = results["DEFAULT"]
    for cap, res in results.items():
        for key in ins:
            for i, (x, y) in enumerate(zip(base[key], res[key])):
                assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8)), (cap, key, i)
    for key, (tensors, nc, dc, _) in ins.items():  # and the shared result is right
        p, d, e, _ = (t.double() for t in tensors)
        want = diffusion_loss_ref(p, d, e, noise_coef=nc.double(), data_coef=dc.double(), reduction="none")
        torch.testing.assert_close(base[key][0].double(), want, **reduction_tol())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reused_buffers_hold_no_stale_values(dtype, seed):
    """Large stored residuals and gradients come from a cache of freed blocks: a reused block must be
    fully overwritten, resizable, and accumulate like any gradient."""
    shape = (4, 1 << 17)  # >= 1 MiB per buffer in both dtypes: the cached path
    for trial in range(3):
        scale = 10.0 ** trial  # each trial's values differ in size from the block's old contents
        pred = (torch.randn(shape) * scale).to(dtype).requires_grad_()
        x0, noise = rand(shape, dtype, True), rand(shape, dtype, True)
        loss = ops.diffusion_loss(pred, x0, noise, noise_coef=0.5, data_coef=-0.25)
        loss.backward()
        ins64 = [leaf64(t) for t in (pred, x0, noise)]
        want = diffusion_loss_ref(*ins64, noise_coef=0.5, data_coef=-0.25)
        want.backward()
        torch.testing.assert_close(loss.double(), want, **reduction_tol())
        for got_g, want_g in ((pred.grad, ins64[0].grad), (x0.grad, ins64[1].grad)):
            torch.testing.assert_close(got_g.double() / scale, want_g / scale, **tol(dtype))
    # gradients accumulate in place into a cached block
    out = rand(shape, dtype, True)
    x_next, x = rand(shape, dtype), rand(shape, dtype)
    for _ in range(2):
        ops.step_logprob(x_next, x, out, x_coef=0.9, out_coef=-0.1, std=0.7).sum().backward()
    o64 = leaf64(out)
    (2 * step_logprob_ref(x_next.double(), x.double(), o64, x_coef=0.9, out_coef=-0.1, std=0.7).sum()).backward()
    scale = o64.grad.abs().max()
    torch.testing.assert_close(out.grad.double() / scale, o64.grad / scale, **tol(dtype))
    g = out.grad
    g.resize_(2, 3)  # the cached storage is resizable like ATen's own
    assert g.shape == (2, 3)
