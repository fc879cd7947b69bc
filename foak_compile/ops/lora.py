"""torch.ops.foak.lora_linear / lora_linear_4bit and their backward: a LoRA layer in one op.

    y = out_dtype( x·Wᵀ + bias + s · (drop(x)·Aᵀ)·Bᵀ )

`lora_linear` takes a dense base weight W; `lora_linear_4bit` a bitsandbytes 4-bit one (the
packed weight and its quant state), dequantised by kernels/bnb4.py in forward and again in
backward, so the dequantised weight is never kept. Both return (y, t, seed): t = drop(x)·Aᵀ
[..., r] is what dB needs, seed regenerates the dropout mask in backward (kernels/lora.py);
neither is differentiable.

Precision: every GEMM runs in the base's compute dtype (W's dtype, or the 4-bit layer's
compute dtype) with the adapter weights cast to it, as under torch.autocast; peft's default
fp32 adapters on a bf16 base are therefore multiplied in bf16, where eager peft would
multiply in fp32. The adapter's update is added into the base GEMM's output in place
(kernels/lora.low_rank_add_), one rounding for the sum. Gradients come back in each input's dtype; the frozen base gets none
(the base weight must not require grad). dropout_p may be 0 (no mask, no seed used).

Work: forward = base GEMM + two rank-r GEMMs; backward = dX (one GEMM + rank-r update,
through the same mask), dA and dB only when needed (ctx.needs_input_grad).
"""

from typing import Callable, Optional

import torch

from . import dequant
from ..kernels import bnb4
from ..kernels import lora as kernel
from .lora_schema import BNB4, DENSE
from .registry import fused_op, register_fake

BNB4_BLOCKSIZES = bnb4.BLOCKSIZES  # the 4-bit block sizes lora_linear_4bit dequantises
_SEED_BOUND = 2**31 - 1  # keeps the kernels' seed argument one (int32) specialisation


def _new_seed(p: float, device) -> torch.Tensor:
    # On x's device: no host sync, capturable by CUDA graphs; drawn from torch's generator, so
    # torch.manual_seed reproduces it and activation checkpointing (which restores RNG state)
    # replays the same mask. Without dropout: an empty tensor, no kernel launched.
    if p == 0.0:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.randint(0, _SEED_BOUND, (1,), dtype=torch.int64, device=device)


def _check(x, a, b, weight_shape, p):
    out_f, in_f = weight_shape
    r = a.shape[0]
    if x.shape[-1] != in_f or tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
        raise ValueError(
            f"shapes do not chain: x {tuple(x.shape)}, W {tuple(weight_shape)}, A {tuple(a.shape)}, B {tuple(b.shape)}"
        )
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), not {p}")


def _forward(x, weight: torch.Tensor, bias, a, b, scaling: float, p: float, cdt, out_dtype):
    x2 = x.reshape(-1, x.shape[-1]).to(cdt)
    w = weight.to(cdt)
    y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(cdt), x2, w.t())
    seed = _new_seed(p, x.device)
    xd = kernel.dropout(x2, seed, p, cdt) if p > 0 else x2
    t = torch.mm(xd, a.to(cdt).t())
    kernel.low_rank_add_(y, t, b.to(cdt), scaling)
    lead = x.shape[:-1]
    return y.view(*lead, y.shape[-1]).to(out_dtype), t.view(*lead, t.shape[-1]), seed


def _fake_forward(x, weight_shape, a, cdt, out_dtype, p):
    lead = x.shape[:-1]
    return (
        x.new_empty(*lead, weight_shape[0], dtype=out_dtype),
        x.new_empty(*lead, a.shape[0], dtype=cdt),
        x.new_empty(1 if p > 0 else 0, dtype=torch.int64),
    )


def _backward(
    dy,
    x,
    get_weight: Callable[[], torch.Tensor],
    bias,
    a,
    b,
    t,
    seed,
    scaling: float,
    p: float,
    cdt,
    need_x: bool,
    need_bias: bool,
    need_a: bool,
    need_b: bool,
):
    """(dx, dbias, da, db); a gradient that is not needed comes back as an empty tensor."""
    dy2 = dy.reshape(-1, dy.shape[-1]).to(cdt)
    dx, dbias, da, db = (x.new_empty(0) for _ in range(4))  # distinct: outputs may not alias
    if need_b:  # dB = s · dYᵀ·t, the scaling folded into the small operand
        db = torch.mm(dy2.t(), (t.reshape(-1, t.shape[-1]).float() * scaling).to(cdt)).to(b.dtype)
    if need_bias and bias is not None:
        dbias = dy2.sum(0, dtype=torch.float32).to(bias.dtype)
    if need_x or need_a:
        dt = torch.mm(dy2, (b.float() * scaling).to(cdt))  # s · dY·B, [M, r]
        x2 = x.reshape(-1, x.shape[-1]).to(cdt)
        if need_a:
            xd = kernel.dropout(x2, seed, p, cdt) if p > 0 else x2
            da = torch.mm(dt.t(), xd).to(a.dtype)
        if need_x:
            dx2 = torch.mm(dy2, get_weight())
            if p > 0:  # the adapter's share passes back through the forward's mask
                kernel.dropout_add_(dx2, torch.mm(dt, a.to(cdt)), seed, p)
            else:
                kernel.low_rank_add_(dx2, dt, a.to(cdt).t(), 1.0)
            dx = dx2.view(x.shape).to(x.dtype)
    return dx, dbias, da, db


def _fake_backward(x, bias, a, b, need_x, need_bias, need_a, need_b):
    return (
        x.new_empty(x.shape) if need_x else x.new_empty(0),
        bias.new_empty(bias.shape) if (need_bias and bias is not None) else x.new_empty(0),
        a.new_empty(a.shape) if need_a else x.new_empty(0),
        b.new_empty(b.shape) if need_b else x.new_empty(0),
    )


def _no_base_grad(family, need) -> None:
    # The pattern never rewrites a layer whose base weight is trained; refuse rather than
    # silently return no gradient if the op is called that way. need: needs_input_grad, named.
    if any(getattr(need, f) for f in family.tensors):
        raise NotImplementedError("foak lora: the base weight is frozen; no gradient for it is implemented")


# --- dense base ---------------------------------------------------------------------------------


@fused_op("foak::lora_linear", seeded=True)
def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, t, seed) with y = out_dtype(x·Wᵀ + bias + scaling·(drop(x)·Aᵀ)·Bᵀ), computed in W's dtype."""
    _check(x, lora_a, lora_b, weight.shape, dropout_p)
    return _forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, weight.dtype, out_dtype)


def _lora_linear_fake(x, weight, bias, lora_a, lora_b, scaling, dropout_p, out_dtype):
    _check(x, lora_a, lora_b, weight.shape, dropout_p)
    return _fake_forward(x, weight.shape, lora_a, weight.dtype, out_dtype, dropout_p)


register_fake(lora_linear, _lora_linear_fake)


@fused_op("foak::lora_linear_backward")
def lora_linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    t: torch.Tensor,
    seed: torch.Tensor,
    scaling: float,
    dropout_p: float,
    need_x: bool,
    need_bias: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dbias, dA, dB) of lora_linear; empty where not needed."""
    return _backward(
        dy,
        x,
        lambda: weight,
        bias,
        lora_a,
        lora_b,
        t,
        seed,
        scaling,
        dropout_p,
        weight.dtype,
        need_x,
        need_bias,
        need_a,
        need_b,
    )


def _lora_linear_backward_fake(
    dy, x, weight, bias, lora_a, lora_b, t, seed, scaling, dropout_p, need_x, need_bias, need_a, need_b
):
    return _fake_backward(x, bias, lora_a, lora_b, need_x, need_bias, need_a, need_b)


register_fake(lora_linear_backward, _lora_linear_backward_fake)


def _setup_dense(ctx, inputs, output):
    i = DENSE.single.view(inputs)
    ctx.save_for_backward(i.x, i.weight, i.bias, i.lora_a, i.lora_b, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.scaling, ctx.p = i.scaling, i.dropout_p


def _backward_dense(ctx, dy, _dt, _dseed):
    need = DENSE.single.view(ctx.needs_input_grad)
    _no_base_grad(DENSE, need)
    x, weight, bias, a, b, t, seed = ctx.saved_tensors
    dx, dbias, da, db = torch.ops.foak.lora_linear_backward(
        dy, x, weight, bias, a, b, t, seed, ctx.scaling, ctx.p, need.x, need.bias, need.lora_a, need.lora_b
    )
    return DENSE.single.grads(ctx.needs_input_grad, x=dx, bias=dbias, lora_a=da, lora_b=db)


lora_linear.register_autograd(_backward_dense, setup_context=_setup_dense)


# --- bitsandbytes 4-bit base ---------------------------------------------------------------------


@fused_op("foak::lora_linear_4bit", seeded=True)
def lora_linear_4bit(
    x: torch.Tensor,
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    quant_type: str,
    blocksize: int,
    nested_blocksize: int,
    weight_shape: list[int],
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lora_linear over the bitsandbytes 4-bit weight (qweight, absmax[, nested_absmax, nested_code,
    offset]) of shape weight_shape, dequantised to compute_dtype."""
    _check(x, lora_a, lora_b, weight_shape, dropout_p)
    w = dequant.weight(
        qweight,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        quant_type,
        blocksize,
        nested_blocksize,
        weight_shape,
        compute_dtype,
        dequant.FORWARD,
    )
    return _forward(x, w, bias, lora_a, lora_b, scaling, dropout_p, compute_dtype, out_dtype)


def _lora_linear_4bit_fake(
    x,
    qweight,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    bias,
    lora_a,
    lora_b,
    scaling,
    dropout_p,
    quant_type,
    blocksize,
    nested_blocksize,
    weight_shape,
    compute_dtype,
    out_dtype,
):
    _check(x, lora_a, lora_b, weight_shape, dropout_p)
    return _fake_forward(x, weight_shape, lora_a, compute_dtype, out_dtype, dropout_p)


register_fake(lora_linear_4bit, _lora_linear_4bit_fake)


@fused_op("foak::lora_linear_4bit_backward")
def lora_linear_4bit_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    t: torch.Tensor,
    seed: torch.Tensor,
    scaling: float,
    dropout_p: float,
    quant_type: str,
    blocksize: int,
    nested_blocksize: int,
    weight_shape: list[int],
    compute_dtype: torch.dtype,
    need_x: bool,
    need_bias: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dbias, dA, dB) of lora_linear_4bit; the weight is dequantised again, only for dx."""

    def weight():
        return dequant.weight(
            qweight,
            absmax,
            nested_absmax,
            nested_code,
            offset,
            quant_type,
            blocksize,
            nested_blocksize,
            weight_shape,
            compute_dtype,
            dequant.BACKWARD,
        )

    return _backward(
        dy,
        x,
        weight,
        bias,
        lora_a,
        lora_b,
        t,
        seed,
        scaling,
        dropout_p,
        compute_dtype,
        need_x,
        need_bias,
        need_a,
        need_b,
    )


def _lora_linear_4bit_backward_fake(
    dy,
    x,
    qweight,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    bias,
    lora_a,
    lora_b,
    t,
    seed,
    scaling,
    dropout_p,
    quant_type,
    blocksize,
    nested_blocksize,
    weight_shape,
    compute_dtype,
    need_x,
    need_bias,
    need_a,
    need_b,
):
    return _fake_backward(x, bias, lora_a, lora_b, need_x, need_bias, need_a, need_b)


register_fake(lora_linear_4bit_backward, _lora_linear_4bit_backward_fake)


def _setup_4bit(ctx, inputs, output):
    i = BNB4.single.view(inputs)
    ctx.save_for_backward(
        i.x,
        i.qweight,
        i.absmax,
        i.nested_absmax,
        i.nested_code,
        i.offset,
        i.bias,
        i.lora_a,
        i.lora_b,
        output[1],
        output[2],
    )
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.args = (
        i.scaling,
        i.dropout_p,
        i.quant_type,
        i.blocksize,
        i.nested_blocksize,
        list(i.weight_shape),
        i.compute_dtype,
    )


def _backward_4bit(ctx, dy, _dt, _dseed):
    need = BNB4.single.view(ctx.needs_input_grad)
    _no_base_grad(BNB4, need)
    x, qweight, absmax, nested_absmax, nested_code, offset, bias, a, b, t, seed = ctx.saved_tensors
    dx, dbias, da, db = torch.ops.foak.lora_linear_4bit_backward(
        dy,
        x,
        qweight,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        bias,
        a,
        b,
        t,
        seed,
        *ctx.args,
        need.x,
        need.bias,
        need.lora_a,
        need.lora_b,
    )
    return BNB4.single.grads(ctx.needs_input_grad, x=dx, bias=dbias, lora_a=da, lora_b=db)


lora_linear_4bit.register_autograd(_backward_4bit, setup_context=_setup_4bit)
