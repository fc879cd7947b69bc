"""torch.ops.foak.lora_linear_gptq and its backward: a LoRA layer over a GPTQ-quantised base.

    y = out_dtype( x·Wᵀ + bias + s · (drop(x)·Aᵀ)·Bᵀ ),   W dequantised from (qweight, qzeros, scales, g_idx)

The same op as lora_linear_4bit (ops/lora.py, whose forward/backward helpers it uses) with the
weight unpacked by kernels/gptq.py: 2/4/8-bit codes, any group size or act-order g_idx, zero
points in checkpoint format v1 (zero − 1 stored) or v2. The weight is dequantised in forward
and again in backward for dx, never kept; it is produced in GPTQ's [in, out] layout and used
transposed, so no copy is made. All GEMMs run in compute_dtype (gptqmodel's TorchLinear casts
its dequantised weight to the activation's dtype; the pattern passes that dtype).
"""

from typing import Optional

import torch

from ..kernels import gptq
from . import dequant
from .lora import _backward, _check, _fake_backward, _fake_forward, _forward, _no_base_grad
from .lora_schema import GPTQ
from .registry import fused_op, register_fake


def bit_widths(qweight, qzeros, scales, g_idx) -> list:
    """The bit widths (of 2, 4, 8) whose int32 packing the GPTQ tensors' shapes fit, with v2 zero points."""
    fits = []
    for bits in gptq.BITS:
        try:
            gptq.check(qweight, qzeros, scales, g_idx, bits)
            fits.append(bits)
        except ValueError:
            pass
    return fits


def _shape(qweight, qzeros, scales, g_idx, bits, zero_format) -> list:
    n_in, n_out = gptq.check(qweight, qzeros, scales, g_idx, bits, zero_format)
    return [n_out, n_in]


def _weight(qweight, qzeros, scales, g_idx, bits, zero_format, cdt, site: int) -> torch.Tensor:
    """W [out, in] in cdt: a transposed view of the kernel's [in, out] output."""
    return dequant.gptq_weight(qweight, qzeros, scales, g_idx, bits, zero_format, cdt, site).t()


@fused_op("foak::lora_linear_gptq", seeded=True)
def lora_linear_gptq(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    bits: int,
    zero_format: int,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, t, seed) of a LoRA layer whose base weight is GPTQ-packed; see the module doc."""
    _check(x, lora_a, lora_b, _shape(qweight, qzeros, scales, g_idx, bits, zero_format), dropout_p)
    w = _weight(qweight, qzeros, scales, g_idx, bits, zero_format, compute_dtype, dequant.FORWARD)
    return _forward(x, w, bias, lora_a, lora_b, scaling, dropout_p, compute_dtype, out_dtype)


def _lora_linear_gptq_fake(
    x,
    qweight,
    qzeros,
    scales,
    g_idx,
    bias,
    lora_a,
    lora_b,
    scaling,
    dropout_p,
    bits,
    zero_format,
    compute_dtype,
    out_dtype,
):
    shape = _shape(qweight, qzeros, scales, g_idx, bits, zero_format)
    _check(x, lora_a, lora_b, shape, dropout_p)
    return _fake_forward(x, shape, lora_a, compute_dtype, out_dtype, dropout_p)


register_fake(lora_linear_gptq, _lora_linear_gptq_fake)


@fused_op("foak::lora_linear_gptq_backward")
def lora_linear_gptq_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    t: torch.Tensor,
    seed: torch.Tensor,
    scaling: float,
    dropout_p: float,
    bits: int,
    zero_format: int,
    compute_dtype: torch.dtype,
    need_x: bool,
    need_bias: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dbias, dA, dB) of lora_linear_gptq; the weight is dequantised again, only for dx."""

    def weight():
        return _weight(qweight, qzeros, scales, g_idx, bits, zero_format, compute_dtype, dequant.BACKWARD)

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


def _lora_linear_gptq_backward_fake(
    dy,
    x,
    qweight,
    qzeros,
    scales,
    g_idx,
    bias,
    lora_a,
    lora_b,
    t,
    seed,
    scaling,
    dropout_p,
    bits,
    zero_format,
    compute_dtype,
    need_x,
    need_bias,
    need_a,
    need_b,
):
    return _fake_backward(x, bias, lora_a, lora_b, need_x, need_bias, need_a, need_b)


register_fake(lora_linear_gptq_backward, _lora_linear_gptq_backward_fake)


def _setup(ctx, inputs, output):
    i = GPTQ.single.view(inputs)
    ctx.save_for_backward(i.x, i.qweight, i.qzeros, i.scales, i.g_idx, i.bias, i.lora_a, i.lora_b, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.args = (i.scaling, i.dropout_p, i.bits, i.zero_format, i.compute_dtype)


def _backward_gptq(ctx, dy, _dt, _dseed):
    need = GPTQ.single.view(ctx.needs_input_grad)
    _no_base_grad(GPTQ, need)  # qweight, qzeros, scales, g_idx: frozen, no gradient
    x, qweight, qzeros, scales, g_idx, bias, a, b, t, seed = ctx.saved_tensors
    dx, dbias, da, db = torch.ops.foak.lora_linear_gptq_backward(
        dy,
        x,
        qweight,
        qzeros,
        scales,
        g_idx,
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
    return GPTQ.single.grads(ctx.needs_input_grad, x=dx, bias=dbias, lora_a=da, lora_b=db)


lora_linear_gptq.register_autograd(_backward_gptq, setup_context=_setup)
