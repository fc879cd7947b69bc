"""torch.ops.foak.rope / rope_one and their backward, over kernels/rope.py.

`rope(q, k, cos, sin, unsqueeze_dim)` is HF's apply_rotary_pos_emb for q and k sharing one
cos/sin: one launch forward, one for dq and dk. `rope_one` is the same for a lone tensor.
cos/sin are the per-token [B or 1, S, D] tensors *before* `unsqueeze(unsqueeze_dim)`;
unsqueeze_dim 1 means x is [B, H, S, D], 2 means [B, S, H, D].

The result dtype is eager's promotion of x with cos (cos and sin must share a dtype);
gradients come back in the dtypes of q and k, as autograd would cast them, and in their
layouts (the outputs', which are `empty_like(x)`): whatever layout the upstream grad has,
AccumulateGrad and the backward of HF's `view(...).transpose(1, 2)` then need no copy.
"""

from typing import Optional

import torch

from ..kernels import rope as kernel
from .registry import fused_op, register_fake


def _out_dtype(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.dtype:
    if cos.dtype != sin.dtype:
        raise ValueError(f"cos ({cos.dtype}) and sin ({sin.dtype}) must share a dtype")
    return torch.promote_types(x.dtype, cos.dtype)


@fused_op("foak::rope")
def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q·cos + rotate_half(q)·sin, k·cos + rotate_half(k)·sin), cos/sin unsqueezed at unsqueeze_dim."""
    return kernel.rope(q, k, cos, sin, unsqueeze_dim, _out_dtype(q, cos, sin), _out_dtype(k, cos, sin))


def _rope_fake(q, k, cos, sin, unsqueeze_dim):
    kernel.check_shapes([q, k], cos, sin, unsqueeze_dim)
    return torch.empty_like(q, dtype=_out_dtype(q, cos, sin)), torch.empty_like(k, dtype=_out_dtype(k, cos, sin))


register_fake(rope, _rope_fake)


@fused_op("foak::rope_one")
def rope_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin, cos/sin unsqueezed at unsqueeze_dim."""
    return kernel.rope(x, None, cos, sin, unsqueeze_dim, _out_dtype(x, cos, sin))[0]


def _rope_one_fake(x, cos, sin, unsqueeze_dim):
    kernel.check_shapes([x], cos, sin, unsqueeze_dim)
    return torch.empty_like(x, dtype=_out_dtype(x, cos, sin))


register_fake(rope_one, _rope_one_fake)


@fused_op("foak::rope_backward")
def rope_backward(
    dy1: torch.Tensor,
    dy2: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int,
    dx1_dtype: torch.dtype,
    dx2_dtype: Optional[torch.dtype],
    dx1_stride: Optional[list[int]] = None,
    dx2_stride: Optional[list[int]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx1, dx2) = the transposed rotation of (dy1, dy2); dx2 is empty without dy2.
    dx*_stride: the gradient's layout (default: dy's)."""
    dx1, dx2 = kernel.rope(
        dy1, dy2, cos, sin, unsqueeze_dim, dx1_dtype, dx2_dtype, backward=True, out_strides=(dx1_stride, dx2_stride)
    )
    return dx1, (dx2 if dx2 is not None else dy1.new_empty(0))


def _rope_backward_fake(dy1, dy2, cos, sin, unsqueeze_dim, dx1_dtype, dx2_dtype, dx1_stride=None, dx2_stride=None):
    dx2 = kernel.empty_out(dy2, dx2_dtype, dx2_stride) if dy2 is not None else dy1.new_empty(0)
    return kernel.empty_out(dy1, dx1_dtype, dx1_stride), dx2


register_fake(rope_backward, _rope_backward_fake)


def _no_cos_grad(ctx, first_cos_input: int) -> None:
    # The patterns never rewrite a rotation whose cos/sin require grad; refuse rather than
    # silently return no gradient if the op is called that way.
    if any(ctx.needs_input_grad[first_cos_input : first_cos_input + 2]):
        raise NotImplementedError("foak rope: gradients with respect to cos/sin are not implemented")


def _rotate_back(ctx, grads, dtypes):
    """Gradients for the inputs that need them, one launch for up to two tensors."""
    need = [i for i, g in enumerate(grads) if ctx.needs_input_grad[i]]
    out = [None] * len(grads)
    if need:
        cos, sin = ctx.saved_tensors
        g2 = grads[need[1]] if len(need) > 1 else None
        d2 = dtypes[need[1]] if len(need) > 1 else None
        st2 = ctx.strides[need[1]] if len(need) > 1 else None
        dx1, dx2 = torch.ops.foak.rope_backward(
            grads[need[0]], g2, cos, sin, ctx.unsqueeze_dim, dtypes[need[0]], d2, ctx.strides[need[0]], st2
        )
        out[need[0]] = dx1
        if len(need) > 1:
            out[need[1]] = dx2
    return out


def _setup_rope(ctx, inputs, output):
    q, k, cos, sin, unsqueeze_dim = inputs
    ctx.save_for_backward(cos, sin)
    ctx.unsqueeze_dim, ctx.dtypes = unsqueeze_dim, (q.dtype, k.dtype)
    ctx.strides = (list(output[0].stride()), list(output[1].stride()))  # empty_like(q), empty_like(k)


def _backward_rope(ctx, dq, dk):
    _no_cos_grad(ctx, 2)
    dq_, dk_ = _rotate_back(ctx, [dq, dk], ctx.dtypes)
    return dq_, dk_, None, None, None


def _setup_rope_one(ctx, inputs, output):
    x, cos, sin, unsqueeze_dim = inputs
    ctx.save_for_backward(cos, sin)
    ctx.unsqueeze_dim, ctx.dtypes = unsqueeze_dim, (x.dtype,)
    ctx.strides = (list(output.stride()),)


def _backward_rope_one(ctx, dy):
    _no_cos_grad(ctx, 1)
    (dx,) = _rotate_back(ctx, [dy], ctx.dtypes)
    return dx, None, None, None


rope.register_autograd(_backward_rope, setup_context=_setup_rope)
rope_one.register_autograd(_backward_rope_one, setup_context=_setup_rope_one)
