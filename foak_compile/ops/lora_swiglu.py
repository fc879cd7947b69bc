"""torch.ops.foak.lora_linear_swiglu / lora_linear_4bit_swiglu: a SwiGLU MLP's LoRA down-projection
with the gating product fused in.

    h = silu(gate) * up                                     (kernels/swiglu.py, rounded as eager)
    y = out_dtype( h·Wᵀ + bias + s · (drop(h)·Aᵀ)·Bᵀ )      (lora_linear's math, ops/lora.py)

What fusing buys: h is never saved for backward. gate and up are (the product's gradient needs
them anyway) and backward recomputes h from them for dA, so a layer keeps one [tokens, ffn]
activation less than silu → mul → lora_linear does. Backward: dh as lora_linear's dx (through
the forward's dropout mask, regenerated from its seed), then one kernel gives dgate and dup.

Both return (y, t, seed) as lora_linear / lora_linear_4bit do, with the same precision, dropout
and frozen-base rules; h is in gate's dtype (gate and up must share shape and dtype).
"""

from typing import Optional

import torch

from ..kernels import swiglu
from . import dequant
from .lora import _backward as _lora_backward
from .lora import _check, _fake_backward, _fake_forward, _forward, _no_base_grad
from .lora_schema import BNB4, DENSE
from .registry import fused_op, register_fake


def _check_pair(gate, up, a, b, weight_shape, p):
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"lora_linear_swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} "
            f"{up.dtype} must share shape and dtype"
        )
    _check(gate, a, b, weight_shape, p)


def _backward(
    dy, gate, up, get_weight, bias, a, b, t, seed, scaling, p, cdt, need_gate, need_up, need_bias, need_a, need_b
):
    """(dgate, dup, dbias, da, db); a gradient that is not needed comes back as an empty tensor."""
    need_h = need_gate or need_up
    # only dA reads h's values; dh takes no more than its shape and dtype, which gate has
    h = swiglu.swiglu(gate, up, recompute=True) if need_a else gate
    dh, dbias, da, db = _lora_backward(
        dy, h, get_weight, bias, a, b, t, seed, scaling, p, cdt, need_h, need_bias, need_a, need_b
    )
    if need_h:
        dgate, dup = swiglu.swiglu_backward(dh, gate, up, need_gate, need_up)
    else:
        dgate, dup = gate.new_empty(0), up.new_empty(0)
    return dgate, dup, dbias, da, db


def _backward_fake(gate, up, bias, a, b, need_gate, need_up, need_bias, need_a, need_b):
    _, dbias, da, db = _fake_backward(gate, bias, a, b, False, need_bias, need_a, need_b)
    return (
        gate.new_empty(gate.shape) if need_gate else gate.new_empty(0),
        up.new_empty(up.shape) if need_up else up.new_empty(0),
        dbias,
        da,
        db,
    )


# --- dense base ---------------------------------------------------------------------------------


@fused_op("foak::lora_linear_swiglu", seeded=True)
def lora_linear_swiglu(
    gate: torch.Tensor,
    up: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, t, seed) of lora_linear(silu(gate) * up, weight, bias, lora_a, lora_b, scaling, dropout_p, out_dtype)."""
    _check_pair(gate, up, lora_a, lora_b, weight.shape, dropout_p)
    return _forward(swiglu.swiglu(gate, up), weight, bias, lora_a, lora_b, scaling, dropout_p, weight.dtype, out_dtype)


def _dense_fake(gate, up, weight, bias, lora_a, lora_b, scaling, dropout_p, out_dtype):
    _check_pair(gate, up, lora_a, lora_b, weight.shape, dropout_p)
    return _fake_forward(gate, weight.shape, lora_a, weight.dtype, out_dtype, dropout_p)


register_fake(lora_linear_swiglu, _dense_fake)


@fused_op("foak::lora_linear_swiglu_backward")
def lora_linear_swiglu_backward(
    dy: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    t: torch.Tensor,
    seed: torch.Tensor,
    scaling: float,
    dropout_p: float,
    need_gate: bool,
    need_up: bool,
    need_bias: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dgate, dup, dbias, dA, dB) of lora_linear_swiglu; empty where not needed."""
    return _backward(
        dy,
        gate,
        up,
        lambda: weight,
        bias,
        lora_a,
        lora_b,
        t,
        seed,
        scaling,
        dropout_p,
        weight.dtype,
        need_gate,
        need_up,
        need_bias,
        need_a,
        need_b,
    )


def _dense_backward_fake(
    dy,
    gate,
    up,
    weight,
    bias,
    lora_a,
    lora_b,
    t,
    seed,
    scaling,
    dropout_p,
    need_gate,
    need_up,
    need_bias,
    need_a,
    need_b,
):
    return _backward_fake(gate, up, bias, lora_a, lora_b, need_gate, need_up, need_bias, need_a, need_b)


register_fake(lora_linear_swiglu_backward, _dense_backward_fake)


def _setup_dense(ctx, inputs, output):
    i = DENSE.swiglu.view(inputs)
    # not h: backward recomputes it
    ctx.save_for_backward(i.gate, i.up, i.weight, i.bias, i.lora_a, i.lora_b, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.scaling, ctx.p = i.scaling, i.dropout_p


def _autograd_dense(ctx, dy, _dt, _dseed):
    need = DENSE.swiglu.view(ctx.needs_input_grad)
    _no_base_grad(DENSE, need)
    gate, up, weight, bias, a, b, t, seed = ctx.saved_tensors
    dgate, dup, dbias, da, db = torch.ops.foak.lora_linear_swiglu_backward(
        dy,
        gate,
        up,
        weight,
        bias,
        a,
        b,
        t,
        seed,
        ctx.scaling,
        ctx.p,
        need.gate,
        need.up,
        need.bias,
        need.lora_a,
        need.lora_b,
    )
    return DENSE.swiglu.grads(ctx.needs_input_grad, gate=dgate, up=dup, bias=dbias, lora_a=da, lora_b=db)


lora_linear_swiglu.register_autograd(_autograd_dense, setup_context=_setup_dense)


# --- bitsandbytes 4-bit base ---------------------------------------------------------------------


@fused_op("foak::lora_linear_4bit_swiglu", seeded=True)
def lora_linear_4bit_swiglu(
    gate: torch.Tensor,
    up: torch.Tensor,
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
    """lora_linear_4bit (arguments as there) of silu(gate) * up."""
    _check_pair(gate, up, lora_a, lora_b, weight_shape, dropout_p)
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
    return _forward(swiglu.swiglu(gate, up), w, bias, lora_a, lora_b, scaling, dropout_p, compute_dtype, out_dtype)


def _4bit_fake(
    gate,
    up,
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
    _check_pair(gate, up, lora_a, lora_b, weight_shape, dropout_p)
    return _fake_forward(gate, weight_shape, lora_a, compute_dtype, out_dtype, dropout_p)


register_fake(lora_linear_4bit_swiglu, _4bit_fake)


@fused_op("foak::lora_linear_4bit_swiglu_backward")
def lora_linear_4bit_swiglu_backward(
    dy: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
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
    need_gate: bool,
    need_up: bool,
    need_bias: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dgate, dup, dbias, dA, dB) of lora_linear_4bit_swiglu; the weight is dequantised again, only for dh."""

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
        gate,
        up,
        weight,
        bias,
        lora_a,
        lora_b,
        t,
        seed,
        scaling,
        dropout_p,
        compute_dtype,
        need_gate,
        need_up,
        need_bias,
        need_a,
        need_b,
    )


def _4bit_backward_fake(
    dy,
    gate,
    up,
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
    need_gate,
    need_up,
    need_bias,
    need_a,
    need_b,
):
    return _backward_fake(gate, up, bias, lora_a, lora_b, need_gate, need_up, need_bias, need_a, need_b)


register_fake(lora_linear_4bit_swiglu_backward, _4bit_backward_fake)


def _setup_4bit(ctx, inputs, output):
    i = BNB4.swiglu.view(inputs)
    ctx.save_for_backward(
        i.gate,
        i.up,
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


def _autograd_4bit(ctx, dy, _dt, _dseed):
    need = BNB4.swiglu.view(ctx.needs_input_grad)
    _no_base_grad(BNB4, need)
    gate, up, qweight, absmax, nested_absmax, nested_code, offset, bias, a, b, t, seed = ctx.saved_tensors
    dgate, dup, dbias, da, db = torch.ops.foak.lora_linear_4bit_swiglu_backward(
        dy,
        gate,
        up,
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
        need.gate,
        need.up,
        need.bias,
        need.lora_a,
        need.lora_b,
    )
    return BNB4.swiglu.grads(ctx.needs_input_grad, gate=dgate, up=dup, bias=dbias, lora_a=da, lora_b=db)


lora_linear_4bit_swiglu.register_autograd(_autograd_4bit, setup_context=_setup_4bit)
