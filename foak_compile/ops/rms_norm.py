"""torch.ops.foak.rms_norm and its backward, over kernels/rms_norm.py."""

from typing import Optional

import torch

from ..kernels import rms_norm as kernel
from .registry import fused_op, register_fake


@fused_op("foak::rms_norm")
def rms_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    mid_dtype: Optional[torch.dtype],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """out_dtype(weight * mid_dtype(x * rsqrt(mean(x², -1) + eps))), statistics in fp32."""
    return kernel.rms_norm_forward(x, weight, eps, mid_dtype, out_dtype)


def _rms_norm_fake(x, weight, eps, mid_dtype, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


register_fake(rms_norm, _rms_norm_fake)


@fused_op("foak::rms_norm_backward")
def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    mid_dtype: Optional[torch.dtype],
    need_dx: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw); a gradient that is not needed comes back as an empty tensor."""
    dx, dw = kernel.rms_norm_backward(dy, x, weight, eps, mid_dtype, need_dx, need_dw)
    return (dx if dx is not None else x.new_empty(0), dw if dw is not None else x.new_empty(0))


def _rms_norm_backward_fake(dy, x, weight, eps, mid_dtype, need_dx, need_dw):
    # outputs are always contiguous, whatever the input strides (the kernel writes them row by row)
    dw = weight.new_empty(weight.shape) if (need_dw and weight is not None) else x.new_empty(0)
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0)), dw


register_fake(rms_norm_backward, _rms_norm_backward_fake)


def _setup_context(ctx, inputs, output):
    x, weight, eps, mid_dtype, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps, ctx.mid_dtype = eps, mid_dtype


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and weight is not None
    dx, dw = torch.ops.foak.rms_norm_backward(dy, x, weight, ctx.eps, ctx.mid_dtype, need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None, None, None


rms_norm.register_autograd(_backward, setup_context=_setup_context)
