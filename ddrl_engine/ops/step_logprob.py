"""Fused Gaussian log-probability of one denoising transition per row.

lp_i = reduce_j [-(x_next_ij - mu_ij)^2 / (2 std_i^2) - log std_i - log(2 pi)/2],
mu_ij = x_coef_i * x_ij + out_coef_i * model_out_ij (+ offset_ij), reduce in {mean, sum}.
Rows may be any mix of samples and denoising steps: B samples x K steps is one launch of B*K rows.
The forward pass writes the standardised residual (x_next - mu) / std when a gradient will be
needed; backward rescales it per input in one pass (d lp / d mu = that / std (/ cols), times
model_out: out_coef, x: x_coef, offset: 1, x_next: -1).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ddrl_engine import _loader
from ddrl_engine.ops import selftest
from ddrl_engine.ops.reference import step_logprob_eager
from ddrl_engine.ops._rows import Coef, check_same_rows, check_tensor, common_dtype, needs_grad, row_coef
from ddrl_engine.ops.scale_rows import scale_rows

_loader.load_extension()
_OP = "ddrl.step_logprob"
REDUCTIONS = ("mean", "sum")


@torch.library.register_fake("ddrl::step_logprob_rows")
def _(x_next, x, model_out, offset, x_coef, out_coef, std, mean, write_grad):
    torch._check(x_next.shape == x.shape and x_next.shape == model_out.shape, lambda: f"{_OP}: x_next, x and model_out must have the same shape")
    dtype = common_dtype(x_next, x, model_out, offset)
    grad_shape = x_next.shape if write_grad else (0,)
    return x_next.new_empty((x_next.shape[0],), dtype=torch.float32), x_next.new_empty(grad_shape, dtype=dtype)


def _setup_context(ctx, inputs, output):
    x_next, x, model_out, offset, x_coef, out_coef, std, mean, _ = inputs
    ctx.dtypes = (x_next.dtype, x.dtype, model_out.dtype, None if offset is None else offset.dtype)
    ctx.per_elem = 1.0 / (x_next[0].numel() if x_next.shape[0] else 1) if mean else 1.0
    # The stored residual is an output only to reach backward: no gradient flows into it, and none is
    # materialised for it (autograd would otherwise fill a zero tensor of the input's size every backward:
    # an allocation, its page faults and a write: diffusion_loss fp32 8 x 1M on CPU, backward 15.5 ms with it,
    # 3.1 ms without).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1], x_coef, out_coef, std)


def _backward(ctx, d_rows, _d_grad):
    if d_rows is None:  # no gradient reached the rows (grads are not materialised)
        return None, None, None, None, None, None, None, None, None
    # The forward stored delta / std; d lp / d mu = delta / std^2 (/ cols for a mean).
    grad, x_coef, out_coef, std = ctx.saved_tensors
    d_rows = d_rows * ctx.per_elem / std
    if any(ctx.needs_input_grad[:4]) and grad.numel() == 0 and d_rows.numel() > 0:
        raise RuntimeError(f"{_OP}: backward needs the gradient written in forward; call "
                           "ddrl_engine.ops.step_logprob with grad enabled on the inputs")
    xn_dt, x_dt, mo_dt, off_dt = ctx.dtypes
    need = ctx.needs_input_grad
    g_xn = scale_rows(grad, -d_rows, xn_dt) if need[0] else None
    g_x = scale_rows(grad, d_rows * x_coef, x_dt) if need[1] else None
    g_mo = scale_rows(grad, d_rows * out_coef, mo_dt) if need[2] else None
    g_off = scale_rows(grad, d_rows, off_dt) if need[3] else None
    return g_xn, g_x, g_mo, g_off, None, None, None, None, None


torch.library.register_autograd("ddrl::step_logprob_rows", _backward, setup_context=_setup_context)


def step_logprob(
    x_next: Tensor,
    x: Tensor,
    model_out: Tensor,
    *,
    x_coef: Coef,
    out_coef: Coef,
    std: Coef,
    offset: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Per-row log N(x_next; mu, std^2 I), reduced by "mean" or "sum" over each row: fp32 [N].

    x_next, x, model_out (and offset): same shape [N, ...], float32/bfloat16/float16, any layout.
    x_coef, out_coef, std: a float, a 0-dim tensor or a 1-D tensor of N values (constants: no gradient). std must
    be > 0 (checked for floats and CPU tensors; on CUDA a non-positive std gives NaN for that row,
    since checking would need a host sync inside the sampling loop).
    """
    named = {"x_next": x_next, "x": x, "model_out": model_out}
    if offset is not None:
        named["offset"] = offset
    for name, t in named.items():
        check_tensor(_OP, name, t)
    check_same_rows(_OP, named)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{_OP}: 'reduction' must be one of {REDUCTIONS}, got {reduction!r}")
    rows, device = x_next.shape[0], x_next.device
    if rows > 0 and x_next.numel() == 0:
        raise ValueError(f"{_OP}: rows of 'x_next' have no elements (shape {list(x_next.shape)})")
    xc = row_coef(_OP, "x_coef", x_coef, rows, device)
    oc = row_coef(_OP, "out_coef", out_coef, rows, device)
    sd = row_coef(_OP, "std", std, rows, device, positive=True)
    if selftest.use_reference():  # DDRL_ENGINE_OPS=reference: plain PyTorch (ops.selftest)
        return step_logprob_eager(x_next, x, model_out, x_coef=xc, out_coef=oc, std=sd, offset=offset,
                                  reduction=reduction)
    selftest.ensure_checked(device)
    lp, _ = torch.ops.ddrl.step_logprob_rows(
        x_next, x, model_out, offset, xc, oc, sd, reduction == "mean", needs_grad(x_next, x, model_out, offset)
    )
    return lp
