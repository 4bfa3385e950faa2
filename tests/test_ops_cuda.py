"""The fused ops on CUDA: the same inputs through the CUDA and the CPU path (and float64
references), gradients, layouts, both memory paths (16-byte vectors and unaligned elements),
batch invariance, > 2^31 elements, opcheck, CUDA-graph capture and torch.compile."""
import math

import pytest
import torch

import ddrl_engine  # noqa: F401
from ddrl_engine import ops
from ddrl_engine.ops.reference import diffusion_loss_ref, step_logprob_ref
from ddrl_engine.ops.scale_rows import scale_rows
from tests.tolerances import reduction_tol, tol

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Rows of 1 element, odd (unaligned: element path), a chunk and one element, video latents
# (aligned: 16-byte path), several chunks on either path.
SHAPES = [(1, 1), (3, 7), (5, 8193), (4, 3, 5, 8, 8), (2, 4, 16, 32, 32), (3, 20001)]
CUDA = torch.device("cuda")


def randn(shape, dtype, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device)


def assert_grad_close(got, want):
    """A stored gradient vs another, relative to its largest entry: the two backends may round the
    fp32 residual differently (FMA), which matters only against the gradient's scale."""
    assert got is not None and want is not None and got.dtype == want.dtype
    scale = want.double().abs().max().clamp_min(1e-30)
    torch.testing.assert_close(got.cpu().double() / scale, want.cpu().double() / scale, **tol(got.dtype))


def run_both(fn, inputs, upstream):
    """fn(*leaves) on CUDA and on CPU, then backward with the same upstream gradient."""
    results = {}
    for device in (CUDA, torch.device("cpu")):
        leaves = [None if t is None else t.to(device, copy=True).requires_grad_() for t in inputs]
        out = fn(device, *leaves)
        (out.double() * upstream.to(device)).sum().backward()
        results[device.type] = (out, [None if t is None else t.grad for t in leaves])
    return results["cuda"], results["cpu"]


# ---- values and gradients: CUDA vs CPU vs float64 ---------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_diffusion_loss_cuda_matches_cpu(shape, dtype, reduction, seed):
    n = shape[0]
    inputs = [randn(shape, dtype) for _ in range(3)]
    nc, w = torch.rand(n) * 2 - 1, torch.rand(n) + 0.5

    def fn(device, pred, x0, noise):
        return ops.diffusion_loss(pred, x0, noise, noise_coef=nc.to(device), data_coef=0.37,
                                  weight=w.to(device), reduction=reduction)

    upstream = torch.randn(n if reduction == "none" else (), dtype=torch.float64)
    (got, got_g), (cpu, cpu_g) = run_both(fn, inputs, upstream)
    assert got.device.type == "cuda" and got.dtype == torch.float32 and got.shape == cpu.shape
    torch.testing.assert_close(got.cpu(), cpu, **reduction_tol())
    want = diffusion_loss_ref(*(t.double() for t in inputs), noise_coef=nc, data_coef=0.37, weight=w,
                              reduction=reduction)
    torch.testing.assert_close(got.cpu().double(), want, **reduction_tol())
    for g, c in zip(got_g, cpu_g):
        assert_grad_close(g, c)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_offset", [False, True])
def test_step_logprob_cuda_matches_cpu(shape, dtype, reduction, with_offset, seed):
    n = shape[0]
    x, model_out = randn(shape, dtype), randn(shape, dtype)
    offset = randn(shape, dtype) if with_offset else None
    xc, std = torch.rand(n) * 2 - 1, torch.rand(n) + 0.2
    mu = xc.reshape(-1, *[1] * (len(shape) - 1)) * x.float() - 0.4 * model_out.float()
    x_next = (mu + 0.7 * torch.randn(shape)).to(dtype)

    def fn(device, xn, xx, mo, off):
        return ops.step_logprob(xn, xx, mo, offset=off, x_coef=xc.to(device), out_coef=-0.4,
                                std=std.to(device), reduction=reduction)

    upstream = torch.randn(n, dtype=torch.float64)
    (got, got_g), (cpu, cpu_g) = run_both(fn, [x_next, x, model_out, offset], upstream)
    assert got.device.type == "cuda" and got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got.cpu(), cpu, **reduction_tol())
    want = step_logprob_ref(x_next.double(), x.double(), model_out.double(),
                            offset=None if offset is None else offset.double(),
                            x_coef=xc, out_coef=-0.4, std=std, reduction=reduction)
    torch.testing.assert_close(got.cpu().double(), want, **reduction_tol())
    for g, c in zip(got_g, cpu_g):
        if c is not None:
            assert_grad_close(g, c)


def test_mixed_dtypes_promote_on_cuda(seed):
    inputs = [randn((3, 40), torch.bfloat16), randn((3, 40), torch.float32), randn((3, 40), torch.float16)]

    def fn(device, pred, x0, noise):
        return ops.diffusion_loss(pred, x0, noise, noise_coef=1.0, data_coef=-1.0)

    (got, got_g), (cpu, cpu_g) = run_both(fn, inputs, torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(got.cpu(), cpu, **reduction_tol())
    assert [g.dtype for g in got_g] == [torch.bfloat16, torch.float32, torch.float16]
    for g, c in zip(got_g, cpu_g):
        assert_grad_close(g, c)


@pytest.mark.parametrize("coef_layout", ["stride0", "strided"])
def test_coefficient_strides(coef_layout, seed):
    """RowCoef: row i reads ptr[i * stride], including stride 0 (an expanded scalar)."""
    n = 6
    pred, x0, noise = (randn((n, 300), torch.float32, CUDA) for _ in range(3))
    if coef_layout == "stride0":
        nc, want_nc = torch.tensor(0.3, device=CUDA).expand(n), torch.full((n,), 0.3, device=CUDA)
    else:
        nc = torch.rand(2 * n, device=CUDA)[::2]
        want_nc = nc.contiguous()
    got = ops.diffusion_loss(pred, x0, noise, noise_coef=nc, data_coef=0.5, reduction="none")
    want = ops.diffusion_loss(pred, x0, noise, noise_coef=want_nc, data_coef=0.5, reduction="none")
    assert torch.equal(got, want)
    std = torch.rand(2 * n, device=CUDA)[::2] + 0.3
    got = ops.step_logprob(pred, x0, noise, x_coef=nc, out_coef=0.2, std=std)
    want = ops.step_logprob(pred, x0, noise, x_coef=want_nc, out_coef=0.2, std=std.contiguous())
    assert torch.equal(got, want)


# ---- layouts and memory paths ------------------------------------------------------------------

LAYOUTS = {
    "transposed": lambda t: t.transpose(1, 2),
    "strided": lambda t: t[:, ::2, 1:],
    "expanded": lambda t: t[:, :1].expand(-1, 10, -1),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_inputs(layout, seed):
    base = torch.randn(6, 10, 12)
    cpu_pred = LAYOUTS[layout](base).detach().requires_grad_()
    cuda_pred = LAYOUTS[layout](base.to(CUDA)).detach().requires_grad_()
    assert not cuda_pred.is_contiguous()
    x0, noise, x_next = (torch.randn(cpu_pred.shape) for _ in range(3))
    kw = dict(noise_coef=0.5, data_coef=0.5, reduction="none")
    got = ops.diffusion_loss(cuda_pred, x0.to(CUDA), noise.to(CUDA), **kw)
    want = ops.diffusion_loss(cpu_pred, x0, noise, **kw)
    torch.testing.assert_close(got.cpu(), want, **reduction_tol())
    got.sum().backward()
    want.sum().backward()
    assert_grad_close(cuda_pred.grad, cpu_pred.grad)

    kw = dict(x_coef=0.9, out_coef=0.1, std=0.7)
    lp = ops.step_logprob(x_next.to(CUDA), cuda_pred.detach(), x0.to(CUDA), **kw)
    lp_cpu = ops.step_logprob(x_next, cpu_pred.detach(), x0, **kw)
    torch.testing.assert_close(lp.cpu(), lp_cpu, **reduction_tol())


def unaligned_copy(t):
    """The same values, contiguous, starting one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t.detach())
    assert out.data_ptr() % 16 != 0 and out.is_contiguous()
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [8, 8192, 16392])
def test_vector_and_element_paths_agree_bitwise(dtype, cols, seed):
    """Aligned rows take 16-byte loads, unaligned ones element loads; both must add in the same
    order, or a row's result would depend on where its batch happens to start."""
    n = 3
    ins = [randn((n, cols), dtype, CUDA) for _ in range(4)]
    std = torch.rand(n, device=CUDA) + 0.3
    results = []
    for make in (lambda t: t, unaligned_copy):
        leaves = [make(t).requires_grad_() for t in ins]
        dl = ops.diffusion_loss(*leaves[:3], noise_coef=0.7, data_coef=-0.2, reduction="none")
        lp = ops.step_logprob(*leaves[:3], offset=leaves[3], x_coef=0.9, out_coef=0.3, std=std)
        (dl.sum() + lp.sum()).backward()
        results.append([dl, lp] + [t.grad for t in leaves])
    for aligned, unaligned in zip(*results):
        assert torch.equal(aligned, unaligned)


# ---- scale_rows (the backward pass) ------------------------------------------------------------

@pytest.mark.parametrize("src_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("cols", [1, 7, 8, 8193, 16384])
def test_scale_rows_matches_cpu_bitwise(src_dtype, out_dtype, cols, seed):
    """One fp32 multiply and one round-to-nearest-even per element: the same bits on both backends."""
    src, scale = randn((5, cols), src_dtype), torch.randn(5)
    want = scale_rows(src, scale, out_dtype)
    for make in (lambda t: t, unaligned_copy):
        got = scale_rows(make(src.to(CUDA)), scale.to(CUDA), out_dtype)
        assert got.dtype == out_dtype and got.device.type == "cuda"
        assert torch.equal(got.cpu(), want)


# ---- edge sizes ----------------------------------------------------------------------------

def test_zero_rows_on_cuda():
    z = torch.randn(0, 5, device=CUDA, requires_grad=True)
    assert ops.diffusion_loss(z, z, z, noise_coef=1.0, data_coef=0.0, reduction="none").shape == (0,)
    total = ops.diffusion_loss(z, z, z, noise_coef=1.0, data_coef=0.0, reduction="sum")
    total.backward()
    assert total.item() == 0.0 and z.grad.shape == (0, 5)
    assert ops.step_logprob(z, z, z, x_coef=1.0, out_coef=1.0, std=1.0).shape == (0,)


def test_zero_columns_raw_op_matches_cpu():
    """Rows of no elements (the raw op; the Python API refuses them): the row formulas of 0 columns."""
    for device in (CUDA, torch.device("cpu")):
        t, c = torch.randn(3, 0, device=device), torch.ones(3, device=device)
        dl, _ = torch.ops.ddrl.diffusion_loss_rows(t, t, t, c, c, False)
        mean_lp, _ = torch.ops.ddrl.step_logprob_rows(t, t, t, None, c, c, c, True, False)
        sum_lp, _ = torch.ops.ddrl.step_logprob_rows(t, t, t, None, c, c, c, False, False)
        assert dl.isnan().all() and mean_lp.isnan().all()
        assert torch.equal(sum_lp.cpu(), torch.zeros(3))


# ---- determinism and batch invariance ----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [7, 8192, 8193, 20001, 65536])
def test_batch_invariance_bitwise(dtype, cols, seed):
    """A row's result must not depend on what else is in the batch (on-policy ratio == 1)."""
    n = 300 if cols < 10000 else 9
    a, b, c = (randn((n, cols), dtype, CUDA) for _ in range(3))
    std = torch.rand(n, device=CUDA) + 0.1
    nc = torch.rand(n, device=CUDA)

    def lp(s):
        return ops.step_logprob(a[s], b[s], c[s], x_coef=0.9, out_coef=-0.2, std=std[s])

    def dl(s):
        return ops.diffusion_loss(a[s], b[s], c[s], noise_coef=nc[s], data_coef=-1.0, reduction="none")

    full_lp, full_dl = lp(slice(None)), dl(slice(None))
    assert torch.equal(full_lp, lp(slice(None))) and torch.equal(full_dl, dl(slice(None)))  # run to run
    for i in (0, 4, n - 1):
        assert torch.equal(lp(slice(i, i + 1)), full_lp[i:i + 1])
        assert torch.equal(dl(slice(i, i + 1)), full_dl[i:i + 1])
    assert torch.equal(lp(slice(2, 7)), full_lp[2:7])
    assert torch.equal(dl(slice(2, 7)), full_dl[2:7])


# ---- 64-bit offsets ------------------------------------------------------------------------

def _rowwise_sum_f64(fn, rows, cols, step=1 << 27):
    """sum_j fn(row, cols slice) in float64, a slice at a time (bounded temporaries)."""
    out = torch.zeros(rows, dtype=torch.float64, device=CUDA)
    for i in range(rows):
        for s in range(0, cols, step):
            out[i] += fn(i, slice(s, min(cols, s + step))).sum()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("extra", [8, 3], ids=["vector-path", "element-path"])
def test_more_than_2pow31_elements(extra):
    """Two rows of 2^31 + extra bf16 elements: offsets inside a row and row starts both pass 2^31."""
    rows, cols = 2, 2**31 + extra
    tensor_bytes = rows * cols * 2
    need = 6 * tensor_bytes  # three inputs, the forward gradient, pred.grad, reference temporaries
    free = torch.cuda.mem_get_info()[0]
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    gen = torch.Generator(device=CUDA).manual_seed(0)
    pred, x0, noise = (torch.randn(rows, cols, dtype=torch.bfloat16, device=CUDA, generator=gen) for _ in range(3))
    nc, dc = 0.8, -0.6

    def residual(i, s):
        return pred[i, s].double() - (nc * noise[i, s].double() + dc * x0[i, s].double())

    with torch.no_grad():
        want = _rowwise_sum_f64(lambda i, s: residual(i, s) ** 2, rows, cols) / cols
    pred.requires_grad_()
    loss = ops.diffusion_loss(pred, x0, noise, noise_coef=nc, data_coef=dc, reduction="none")
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=0)
    loss.sum().backward()
    with torch.no_grad():
        for i in range(rows):  # every gradient element, rescaled to the residual: 2 r / cols
            for s in range(0, cols, 1 << 27):
                sl = slice(s, min(cols, s + (1 << 27)))
                got = pred.grad[i, sl].double() * (cols / 2)
                torch.testing.assert_close(got, residual(i, sl), **tol(torch.bfloat16))
    pred.grad = None

    with torch.no_grad():
        xc, oc, std = 0.9, -0.3, 1.3
        for reduction in ("mean", "sum"):
            lp = ops.step_logprob(pred, x0, noise, x_coef=xc, out_coef=oc, std=std, reduction=reduction)
            sq = _rowwise_sum_f64(lambda i, s: (pred[i, s].double() - (xc * x0[i, s].double() + oc * noise[i, s].double())) ** 2, rows, cols)
            per_row = -sq / (2 * std**2) - (math.log(std) + 0.5 * math.log(2 * math.pi)) * cols
            want_lp = per_row / cols if reduction == "mean" else per_row
            torch.testing.assert_close(lp.double(), want_lp, rtol=1e-4, atol=0)


# ---- dispatcher integration ------------------------------------------------------------------

def test_cuda_graph_capture(seed):
    """Launches go on the current stream and nothing syncs: the ops can be captured and replayed."""
    pred, x0, noise = (torch.randn(4, 9000, device=CUDA) for _ in range(3))
    std = torch.rand(4, device=CUDA) + 0.5

    def fn():
        return (ops.diffusion_loss(pred, x0, noise, noise_coef=1.0, data_coef=-1.0, reduction="none"),
                ops.step_logprob(pred, x0, noise, x_coef=0.9, out_coef=-0.1, std=std))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        captured = fn()
    pred.copy_(torch.randn_like(pred))
    graph.replay()
    eager = fn()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_cuda(backend, seed):
    def step(pred, x0, noise, x_next, x, std):
        dl = ops.diffusion_loss(pred, x0, noise, noise_coef=1.0, data_coef=-1.0)
        lp = ops.step_logprob(x_next, x, pred, x_coef=0.95, out_coef=-0.05, std=std)
        return dl + lp.mean()

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    pred = torch.randn(4, 2, 8, 8, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    others = [torch.randn(4, 2, 8, 8, device=CUDA, dtype=torch.bfloat16) for _ in range(4)]
    std = torch.rand(4, device=CUDA) + 0.5
    eager_out = step(pred, *others, std)
    (g_eager,) = torch.autograd.grad(eager_out, pred)
    out = compiled(pred, *others, std)
    (g_comp,) = torch.autograd.grad(out, pred)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(g_comp, g_eager)
