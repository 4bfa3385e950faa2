"""Fused diffusion loss: loss_i = weight_i * mean_j (pred_ij - (noise_coef_i * noise_ij + data_coef_i * x0_ij))^2.

One kernel pass reads pred, x0 and noise once, accumulates each row's squared residual in fp32 and,
when a gradient will be needed, writes the residual in the same pass; backward only rescales it
(ddrl::scale_rows, one read and one write) by 2 / cols and the upstream gradient. The target is never materialised. Target conventions:
epsilon (1, 0), sample (0, 1), rectified-flow velocity (1, -1), VP v-prediction (alpha_t, -sigma_t).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ddrl_engine import _loader
from ddrl_engine.ops import selftest
from ddrl_engine.ops.reference import diffusion_loss_eager
from ddrl_engine.ops._rows import Coef, check_same_rows, check_tensor, common_dtype, needs_grad, row_coef
from ddrl_engine.ops.scale_rows import scale_rows

_loader.load_extension()
_OP = "ddrl.diffusion_loss"
REDUCTIONS = ("none", "mean", "sum")


@torch.library.register_fake("ddrl::diffusion_loss_rows")
def _(pred, x0, noise, noise_coef, data_coef, write_grad):
    torch._check(pred.shape == x0.shape and pred.shape == noise.shape, lambda: f"{_OP}: pred, x0 and noise must have the same shape")
    rows = pred.shape[0]
    dtype = common_dtype(pred, x0, noise)
    grad_shape = pred.shape if write_grad else (0,)
    return pred.new_empty((rows,), dtype=torch.float32), pred.new_empty(grad_shape, dtype=dtype)


def _setup_context(ctx, inputs, output):
    pred, x0, noise, noise_coef, data_coef, _ = inputs
    ctx.dtypes = (pred.dtype, x0.dtype, noise.dtype)
    ctx.cols = pred[0].numel() if pred.shape[0] else 1
    # The stored residual is an output only to reach backward: no gradient flows into it, and none is
    # materialised for it (autograd would otherwise fill a zero tensor of the input's size every backward:
    # an allocation, its page faults and a write: diffusion_loss fp32 8 x 1M on CPU, backward 15.5 ms with it,
    # 3.1 ms without).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1], noise_coef, data_coef)


def _backward(ctx, d_rows, _d_grad):
    if d_rows is None:  # no gradient reached the rows (grads are not materialised)
        return None, None, None, None, None, None
    # The forward stored the residual r; d(row loss)/d(pred) = 2 r / cols.
    grad, noise_coef, data_coef = ctx.saved_tensors
    d_rows = d_rows * (2.0 / ctx.cols)
    if any(ctx.needs_input_grad[:3]) and grad.numel() == 0 and d_rows.numel() > 0:
        raise RuntimeError(f"{_OP}: backward needs the gradient written in forward; call "
                           "ddrl_engine.ops.diffusion_loss with grad enabled on the inputs")
    pred_dt, x0_dt, noise_dt = ctx.dtypes
    g_pred = scale_rows(grad, d_rows, pred_dt) if ctx.needs_input_grad[0] else None
    g_x0 = scale_rows(grad, -d_rows * data_coef, x0_dt) if ctx.needs_input_grad[1] else None
    g_noise = scale_rows(grad, -d_rows * noise_coef, noise_dt) if ctx.needs_input_grad[2] else None
    return g_pred, g_x0, g_noise, None, None, None


torch.library.register_autograd("ddrl::diffusion_loss_rows", _backward, setup_context=_setup_context)


def diffusion_loss(
    pred: Tensor,
    x0: Tensor,
    noise: Tensor,
    *,
    noise_coef: Coef,
    data_coef: Coef,
    weight: Coef | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Diffusion loss on rows (dim 0), fp32 result: a scalar, or [N] with reduction="none".

    pred, x0, noise: same shape [N, ...], float32/bfloat16/float16 (mixed allowed), any layout.
    noise_coef, data_coef, weight: a float, a 0-dim tensor (all rows) or a 1-D tensor of N values
    (constants: no gradient).
    Gradients flow to each of pred, x0, noise that requires grad.
    """
    for name, t in (("pred", pred), ("x0", x0), ("noise", noise)):
        check_tensor(_OP, name, t)
    check_same_rows(_OP, {"pred": pred, "x0": x0, "noise": noise})
    if reduction not in REDUCTIONS:
        raise ValueError(f"{_OP}: 'reduction' must be one of {REDUCTIONS}, got {reduction!r}")
    rows = pred.shape[0]
    if rows > 0 and pred.numel() == 0:
        raise ValueError(f"{_OP}: rows of 'pred' have no elements (shape {list(pred.shape)}); a mean over them is undefined")
    nc = row_coef(_OP, "noise_coef", noise_coef, rows, pred.device)
    dc = row_coef(_OP, "data_coef", data_coef, rows, pred.device)
    if selftest.use_reference():  # DDRL_ENGINE_OPS=reference: plain PyTorch (ops.selftest)
        losses = diffusion_loss_eager(pred, x0, noise, noise_coef=nc, data_coef=dc, reduction="none")
    else:
        selftest.ensure_checked(pred.device)
        losses, _ = torch.ops.ddrl.diffusion_loss_rows(pred, x0, noise, nc, dc, needs_grad(pred, x0, noise))
    if weight is not None:
        losses = losses * row_coef(_OP, "weight", weight, rows, pred.device)
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()
