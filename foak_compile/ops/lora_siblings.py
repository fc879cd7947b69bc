"""torch.ops.foak.lora_linear_siblings / lora_linear_4bit_siblings / lora_linear_gptq_siblings: LoRA
layers that read the same input (q/k/v, gate/up) in one op.

    y_i = out_dtype( x·W_iᵀ + bias_i + s_i · (x·A_iᵀ)·B_iᵀ )      for every sibling i

Dense bases, no LoRA dropout (each layer's mask would differ). What grouping saves over one
lora_linear per layer: the adapters' down-projections become one GEMM against the stacked
[ΣA_i] (x read once, forward and for dA), the input gradient is accumulated in place by
one GEMM per base plus one for all adapters (no separate adds of per-layer dx), and fewer
launches. Returns [y_1, ..., y_k, t] with t = x·[ΣA_i]ᵀ, [..., Σr] (what the dB_i need).

Over bitsandbytes 4-bit bases (lora_linear_4bit_siblings) the base GEMMs group too: the weights
are dequantised into the rows of one stacked [Σout, in] buffer (forward, and again in backward,
never kept), so the bases are one GEMM each way; the op returns the stacked output [..., Σout]
and the graph splits it per layer (a split's gradient is the stacked gradient again). Over GPTQ
bases (lora_linear_gptq_siblings) the same, the weights side by side in GPTQ's own [in, Σout]
layout (kernels/gptq.py writes each at its column offset).

Precision as lora_linear (ops/lora.py): every GEMM in the bases' dtype, adapters cast to it.
"""

import itertools
from typing import Optional

import torch

from ..kernels import gptq
from ..kernels import lora as lora_kernel
from . import dequant
from .dequant import pairs as _pairs
from .lora_schema import BNB4, DENSE, GPTQ, per_layer
from .registry import fused_op, register_fake


def _check(x, weights, biases, a, b, scalings):
    k = len(weights)
    if k < 2 or not (len(biases) == len(a) == len(b) == len(scalings) == k):
        raise ValueError(
            f"lora_linear_siblings: {k} weights, {len(biases)} biases, {len(a)} A, {len(b)} B, "
            f"{len(scalings)} scalings (at least two siblings, one of each)"
        )
    cdt = weights[0].dtype
    for w, ai, bi in zip(weights, a, b):
        out_f, in_f = w.shape
        if w.dtype != cdt or in_f != x.shape[-1] or ai.shape[1] != in_f or tuple(bi.shape) != (out_f, ai.shape[0]):
            raise ValueError(
                f"lora_linear_siblings: shapes do not chain: x {tuple(x.shape)}, W {tuple(w.shape)} "
                f"{w.dtype}, A {tuple(ai.shape)}, B {tuple(bi.shape)}"
            )
    return cdt


@fused_op("foak::lora_linear_siblings")
def lora_linear_siblings(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[Optional[torch.Tensor]],
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scalings: list[float],
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    cdt = _check(x, weights, biases, lora_a, lora_b, scalings)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(cdt)
    t = torch.mm(x2, torch.cat([a.to(cdt) for a in lora_a]).t())
    ys, start = [], 0
    for w, bias, a, b, s in zip(weights, biases, lora_a, lora_b, scalings):
        y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(cdt), x2, w.t())
        r = a.shape[0]
        lora_kernel.low_rank_add_(y, t[:, start : start + r], b.to(cdt), s)
        start += r
        ys.append(y.view(*lead, y.shape[-1]).to(out_dtype))
    return ys + [t.view(*lead, t.shape[-1])]


def _fake(x, weights, biases, lora_a, lora_b, scalings, out_dtype):
    cdt = _check(x, weights, biases, lora_a, lora_b, scalings)
    lead = x.shape[:-1]
    return [x.new_empty(*lead, w.shape[0], dtype=out_dtype) for w in weights] + [
        x.new_empty(*lead, sum(a.shape[0] for a in lora_a), dtype=cdt)
    ]


register_fake(lora_linear_siblings, _fake)


@fused_op("foak::lora_linear_siblings_backward")
def lora_linear_siblings_backward(
    dys: list[torch.Tensor],
    x: torch.Tensor,
    weights: list[torch.Tensor],
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    t: torch.Tensor,
    scalings: list[float],
    need_x: bool,
) -> list[torch.Tensor]:
    """[dx (empty unless need_x), dA_1..dA_k, dB_1..dB_k]."""
    cdt = weights[0].dtype
    x2 = x.reshape(-1, x.shape[-1]).to(cdt)
    dy2 = [dy.reshape(-1, dy.shape[-1]).to(cdt) for dy in dys]
    dt, das, dbs = _adapter_grads(dy2, x2, t, lora_a, lora_b, scalings, cdt)
    dx = x.new_empty(0)
    if need_x:
        dx2 = torch.mm(dy2[0], weights[0])
        for dy, w in zip(dy2[1:], weights[1:]):  # accumulated in place: no per-layer dx to add up
            dx2.addmm_(dy, w)
        lora_kernel.low_rank_add_(dx2, dt, torch.cat([a.to(cdt) for a in lora_a]).t(), 1.0)
        dx = dx2.view(x.shape).to(x.dtype)
    return [dx] + das + dbs


def _adapter_grads(dys, x2, t, lora_a, lora_b, scalings, cdt):
    """(dt [M, Σr], dAs, dBs) from each sibling's output gradient dys[i] [M, out_i]: dB_i = s_i·dY_iᵀ·t_i
    and dt_i = s_i·dY_i·B_i (the scaling folded into the small operands), then every dA in one GEMM."""
    t2 = t.reshape(-1, t.shape[-1])
    dts, dbs, start = [], [], 0
    for dy, a, b, s in zip(dys, lora_a, lora_b, scalings):
        r = a.shape[0]
        dbs.append(torch.mm(dy.t(), _scaled(t2[:, start : start + r], s, cdt)).to(b.dtype))
        dts.append(torch.mm(dy, _scaled(b, s, cdt)))
        start += r
    dt = torch.cat(dts, dim=1)
    da_cat = torch.mm(dt.t(), x2)
    das, start = [], 0
    for a in lora_a:
        das.append(da_cat[start : start + a.shape[0]].to(a.dtype, copy=True))  # outputs may not alias
        start += a.shape[0]
    return dt, das, dbs


def _backward_fake(dys, x, weights, lora_a, lora_b, t, scalings, need_x):
    return (
        [x.new_empty(x.shape) if need_x else x.new_empty(0)]
        + [a.new_empty(a.shape) for a in lora_a]
        + [b.new_empty(b.shape) for b in lora_b]
    )


register_fake(lora_linear_siblings_backward, _backward_fake)


def _scaled(v, s, cdt):
    """s·v in cdt; a half-precision v is scaled in fp32 first (one rounding)."""
    if v.dtype in (torch.bfloat16, torch.float16):
        return (v.float() * s).to(cdt)
    return (v * s).to(cdt)


def _leaf_grads(values):
    """None per element for a list of tensors; one None for a list holding a None (a pytree leaf)."""
    return [None] * len(values) if all(v is not None for v in values) else None


def _frozen_grads(family, inputs) -> dict:
    """No gradient for the bases' tensors and biases, named as the siblings op's inputs; the gradient's
    structure mirrors the inputs': a bias list holding a None is one leaf."""
    return {f: _leaf_grads(getattr(inputs, f)) for f in map(per_layer, family.tensors + ("bias",))}


def _setup(ctx, inputs, output):
    i = DENSE.siblings.view(inputs)
    ctx.k = len(i.weights)
    ctx.save_for_backward(i.x, output[-1], *i.weights, *i.lora_a, *i.lora_b)
    ctx.mark_non_differentiable(output[-1])
    ctx.scalings = list(i.scalings)
    ctx.none_grads = _frozen_grads(DENSE, i)


def _backward(ctx, grads):
    k = ctx.k
    x, t, *rest = ctx.saved_tensors
    weights, a, b = rest[:k], rest[k : 2 * k], rest[2 * k :]
    if any(w.requires_grad for w in weights):
        raise NotImplementedError("foak lora_linear_siblings: the base weights are frozen; no gradient for them")
    dys = [
        g if g is not None else torch.zeros(x.shape[:-1] + (w.shape[0],), dtype=x.dtype, device=x.device)
        for g, w in zip(grads[:k], weights)
    ]
    out = torch.ops.foak.lora_linear_siblings_backward(
        dys, x, list(weights), list(a), list(b), t, ctx.scalings, ctx.needs_input_grad[0]
    )
    dx = out[0] if ctx.needs_input_grad[0] else None
    return DENSE.siblings.grads(x=dx, lora_a=list(out[1 : 1 + k]), lora_b=list(out[1 + k :]), **ctx.none_grads)


lora_linear_siblings.register_autograd(_backward, setup_context=_setup)


# --- bitsandbytes 4-bit bases: one stacked weight ----------------------------------------------


def _stacked_weight(
    qweights,
    absmaxes,
    nested_absmaxes,
    nested_codes,
    offsets,
    quant_type,
    blocksize,
    nested_blocksize,
    shapes,
    cdt,
    site: int,
):
    """The siblings' dequantised weights as the rows of one [Σout, in] tensor."""
    return dequant.stacked_weight(
        qweights,
        absmaxes,
        nested_absmaxes,
        nested_codes,
        offsets,
        quant_type,
        blocksize,
        nested_blocksize,
        shapes,
        cdt,
        site,
    )


def _check_4bit(x, qweights, biases, lora_a, lora_b, scalings, weight_shapes, name="lora_linear_4bit_siblings"):
    """The siblings' (out, in) shapes, after checking they chain with x, A, B and the biases."""
    shapes = _pairs(weight_shapes)
    k = len(shapes)
    if k < 2 or not (len(qweights) == len(biases) == len(lora_a) == len(lora_b) == len(scalings) == k):
        raise ValueError(f"{name}: at least two siblings, one of each argument")
    for (o, i), bias, a, b in zip(shapes, biases, lora_a, lora_b):
        if (
            i != x.shape[-1]
            or a.shape[1] != i
            or tuple(b.shape) != (o, a.shape[0])
            or (bias is not None and tuple(bias.shape) != (o,))
        ):
            raise ValueError(
                f"{name}: shapes do not chain: x {tuple(x.shape)}, W ({o}, {i}), A {tuple(a.shape)}, B {tuple(b.shape)}"
            )
    return shapes


@fused_op("foak::lora_linear_4bit_siblings")
def lora_linear_4bit_siblings(
    x: torch.Tensor,
    qweights: list[torch.Tensor],
    absmaxes: list[torch.Tensor],
    nested_absmaxes: list[Optional[torch.Tensor]],
    nested_codes: list[Optional[torch.Tensor]],
    offsets: list[Optional[torch.Tensor]],
    biases: list[Optional[torch.Tensor]],
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scalings: list[float],
    quant_type: str,
    blocksize: int,
    nested_blocksize: int,
    weight_shapes: list[int],
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """[y, t]: y = the siblings' outputs side by side [..., Σout], t = x·[ΣA_i]ᵀ [..., Σr].
    weight_shapes: (out, in) of each sibling, flattened."""
    shapes, cdt = _check_4bit(x, qweights, biases, lora_a, lora_b, scalings, weight_shapes), compute_dtype
    w = _stacked_weight(
        qweights,
        absmaxes,
        nested_absmaxes,
        nested_codes,
        offsets,
        quant_type,
        blocksize,
        nested_blocksize,
        shapes,
        cdt,
        dequant.FORWARD,
    )
    return _stacked_forward(x, w.t(), biases, lora_a, lora_b, scalings, shapes, cdt, out_dtype)


def _stacked_forward(x, w_in_out, biases, lora_a, lora_b, scalings, shapes, cdt, out_dtype):
    """[y, t] of siblings over one stacked base weight given as [in, Σout] (a view for bitsandbytes'
    [Σout, in] rows, GPTQ's own layout)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(cdt)
    if all(b is None for b in biases):
        y = torch.mm(x2, w_in_out)
    else:  # zeros for the unbiased: one rounding for GEMM + bias, as addmm per layer
        bias = torch.cat([b.to(cdt) if b is not None else x2.new_zeros(o) for b, (o, _) in zip(biases, shapes)])
        y = torch.addmm(bias, x2, w_in_out)
    t = torch.mm(x2, torch.cat([a.to(cdt) for a in lora_a]).t())
    start, rs = 0, 0
    for (o, _), a, b, s in zip(shapes, lora_a, lora_b, scalings):
        r = a.shape[0]
        lora_kernel.low_rank_add_(y, t[:, rs : rs + r], b.to(cdt), s, col0=start)
        start, rs = start + o, rs + r
    return [y.view(*lead, y.shape[-1]).to(out_dtype), t.view(*lead, t.shape[-1])]


def _fake_4bit(
    x,
    qweights,
    absmaxes,
    nested_absmaxes,
    nested_codes,
    offsets,
    biases,
    lora_a,
    lora_b,
    scalings,
    quant_type,
    blocksize,
    nested_blocksize,
    weight_shapes,
    compute_dtype,
    out_dtype,
):
    lead, shapes = x.shape[:-1], _check_4bit(x, qweights, biases, lora_a, lora_b, scalings, weight_shapes)
    return [
        x.new_empty(*lead, sum(o for o, _ in shapes), dtype=out_dtype),
        x.new_empty(*lead, sum(a.shape[0] for a in lora_a), dtype=compute_dtype),
    ]


register_fake(lora_linear_4bit_siblings, _fake_4bit)


@fused_op("foak::lora_linear_4bit_siblings_backward")
def lora_linear_4bit_siblings_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    qweights: list[torch.Tensor],
    absmaxes: list[torch.Tensor],
    nested_absmaxes: list[Optional[torch.Tensor]],
    nested_codes: list[Optional[torch.Tensor]],
    offsets: list[Optional[torch.Tensor]],
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    t: torch.Tensor,
    scalings: list[float],
    quant_type: str,
    blocksize: int,
    nested_blocksize: int,
    weight_shapes: list[int],
    compute_dtype: torch.dtype,
    need_x: bool,
) -> list[torch.Tensor]:
    """[dx (empty unless need_x), dA_1..dA_k, dB_1..dB_k] from the stacked output's gradient."""
    shapes = _pairs(weight_shapes)

    def weight_in_out():
        return _stacked_weight(
            qweights,
            absmaxes,
            nested_absmaxes,
            nested_codes,
            offsets,
            quant_type,
            blocksize,
            nested_blocksize,
            shapes,
            compute_dtype,
            dequant.BACKWARD,
        ).t()

    return _stacked_backward(dy, x, weight_in_out, lora_a, lora_b, t, scalings, shapes, compute_dtype, need_x)


def _stacked_backward(dy, x, weight_in_out, lora_a, lora_b, t, scalings, shapes, cdt, need_x):
    """The backward of _stacked_forward; weight_in_out() dequantises the [in, Σout] weight again."""
    x2 = x.reshape(-1, x.shape[-1]).to(cdt)
    dy2 = dy.reshape(-1, dy.shape[-1]).to(cdt)
    ends = list(itertools.accumulate(o for o, _ in shapes))
    pieces = [dy2[:, e - o : e] for (o, _), e in zip(shapes, ends)]
    dt, das, dbs = _adapter_grads(pieces, x2, t, lora_a, lora_b, scalings, cdt)
    dx = x.new_empty(0)
    if need_x:
        dx2 = torch.mm(dy2, weight_in_out().t())  # every base's share in one GEMM against the stacked weight
        lora_kernel.low_rank_add_(dx2, dt, torch.cat([a.to(cdt) for a in lora_a]).t(), 1.0)
        dx = dx2.view(x.shape).to(x.dtype)
    return [dx] + das + dbs


def _backward_4bit_fake(
    dy,
    x,
    qweights,
    absmaxes,
    nested_absmaxes,
    nested_codes,
    offsets,
    lora_a,
    lora_b,
    t,
    scalings,
    quant_type,
    blocksize,
    nested_blocksize,
    weight_shapes,
    compute_dtype,
    need_x,
):
    return (
        [x.new_empty(x.shape) if need_x else x.new_empty(0)]
        + [a.new_empty(a.shape) for a in lora_a]
        + [b.new_empty(b.shape) for b in lora_b]
    )


register_fake(lora_linear_4bit_siblings_backward, _backward_4bit_fake)


def _setup_4bit(ctx, inputs, output):
    i = BNB4.siblings.view(inputs)
    ctx.k = len(i.qweights)
    nested = i.nested_absmaxes[0] is not None
    ctx.nested = nested
    ctx.save_for_backward(
        i.x,
        output[1],
        *i.qweights,
        *i.absmaxes,
        *i.lora_a,
        *i.lora_b,
        *(i.nested_absmaxes + i.nested_codes + i.offsets if nested else []),
    )
    ctx.mark_non_differentiable(output[1])
    ctx.args = (list(i.scalings), i.quant_type, i.blocksize, i.nested_blocksize, list(i.weight_shapes), i.compute_dtype)
    ctx.none_grads = _frozen_grads(BNB4, i)


def _backward_4bit(ctx, grads):
    k = ctx.k
    x, t, *rest = ctx.saved_tensors
    q, am, a, b = rest[:k], rest[k : 2 * k], rest[2 * k : 3 * k], rest[3 * k : 4 * k]
    nested = rest[4 * k :]
    na, nc, off = (
        (list(nested[:k]), list(nested[k : 2 * k]), list(nested[2 * k :]))
        if ctx.nested
        else ([None] * k, [None] * k, [None] * k)
    )
    scalings, quant_type, blocksize, nested_blocksize, weight_shapes, cdt = ctx.args
    out = torch.ops.foak.lora_linear_4bit_siblings_backward(
        grads[0],
        x,
        list(q),
        list(am),
        na,
        nc,
        off,
        list(a),
        list(b),
        t,
        scalings,
        quant_type,
        blocksize,
        nested_blocksize,
        weight_shapes,
        cdt,
        ctx.needs_input_grad[0],
    )
    dx = out[0] if ctx.needs_input_grad[0] else None
    return BNB4.siblings.grads(x=dx, lora_a=list(out[1 : 1 + k]), lora_b=list(out[1 + k :]), **ctx.none_grads)


lora_linear_4bit_siblings.register_autograd(_backward_4bit, setup_context=_setup_4bit)


# --- GPTQ bases: one stacked weight in GPTQ's [in, out] layout -----------------------------------


def _gptq_dims(qweights, qzeros, scales, g_idxs, bits, zero_format):
    """(in, out) of each sibling's GPTQ tensors (kernels/gptq.check), one set per sibling."""
    if not len(qweights) == len(qzeros) == len(scales) == len(g_idxs):
        raise ValueError("lora_linear_gptq_siblings: one qweight, qzeros, scales and g_idx per sibling")
    return [gptq.check(q, z, s, g, bits, zero_format) for q, z, s, g in zip(qweights, qzeros, scales, g_idxs)]


def _gptq_shapes(x, qweights, qzeros, scales, g_idxs, biases, lora_a, lora_b, scalings, bits, zero_format):
    """The siblings' (out, in); _check_4bit also checks every in_features is x's last dim."""
    shapes = [(o, i) for i, o in _gptq_dims(qweights, qzeros, scales, g_idxs, bits, zero_format)]
    return _check_4bit(
        x,
        qweights,
        biases,
        lora_a,
        lora_b,
        scalings,
        [v for shape in shapes for v in shape],
        name="lora_linear_gptq_siblings",
    )


@fused_op("foak::lora_linear_gptq_siblings")
def lora_linear_gptq_siblings(
    x: torch.Tensor,
    qweights: list[torch.Tensor],
    qzeros: list[torch.Tensor],
    scales: list[torch.Tensor],
    g_idxs: list[torch.Tensor],
    biases: list[Optional[torch.Tensor]],
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scalings: list[float],
    bits: int,
    zero_format: int,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """[y, t] as lora_linear_4bit_siblings, over GPTQ bases (ops/lora_gptq.py's tensors per sibling):
    the weights dequantised side by side into one [in, Σout] buffer, one GEMM each way."""
    shapes = _gptq_shapes(x, qweights, qzeros, scales, g_idxs, biases, lora_a, lora_b, scalings, bits, zero_format)
    w = dequant.gptq_stacked_weight(qweights, qzeros, scales, g_idxs, bits, zero_format, compute_dtype, dequant.FORWARD)
    return _stacked_forward(x, w, biases, lora_a, lora_b, scalings, shapes, compute_dtype, out_dtype)


def _fake_gptq(
    x, qweights, qzeros, scales, g_idxs, biases, lora_a, lora_b, scalings, bits, zero_format, compute_dtype, out_dtype
):
    shapes = _gptq_shapes(x, qweights, qzeros, scales, g_idxs, biases, lora_a, lora_b, scalings, bits, zero_format)
    lead = x.shape[:-1]
    return [
        x.new_empty(*lead, sum(o for o, _ in shapes), dtype=out_dtype),
        x.new_empty(*lead, sum(a.shape[0] for a in lora_a), dtype=compute_dtype),
    ]


register_fake(lora_linear_gptq_siblings, _fake_gptq)


@fused_op("foak::lora_linear_gptq_siblings_backward")
def lora_linear_gptq_siblings_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    qweights: list[torch.Tensor],
    qzeros: list[torch.Tensor],
    scales: list[torch.Tensor],
    g_idxs: list[torch.Tensor],
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    t: torch.Tensor,
    scalings: list[float],
    bits: int,
    zero_format: int,
    compute_dtype: torch.dtype,
    need_x: bool,
) -> list[torch.Tensor]:
    """[dx (empty unless need_x), dA_1..dA_k, dB_1..dB_k]; the weights dequantised again for dx."""
    shapes = [(o, i) for i, o in _gptq_dims(qweights, qzeros, scales, g_idxs, bits, zero_format)]

    def weight_in_out():
        return dequant.gptq_stacked_weight(
            qweights, qzeros, scales, g_idxs, bits, zero_format, compute_dtype, dequant.BACKWARD
        )

    return _stacked_backward(dy, x, weight_in_out, lora_a, lora_b, t, scalings, shapes, compute_dtype, need_x)


def _backward_gptq_fake(
    dy, x, qweights, qzeros, scales, g_idxs, lora_a, lora_b, t, scalings, bits, zero_format, compute_dtype, need_x
):
    return (
        [x.new_empty(x.shape) if need_x else x.new_empty(0)]
        + [a.new_empty(a.shape) for a in lora_a]
        + [b.new_empty(b.shape) for b in lora_b]
    )


register_fake(lora_linear_gptq_siblings_backward, _backward_gptq_fake)


def _setup_gptq(ctx, inputs, output):
    i = GPTQ.siblings.view(inputs)
    ctx.k = len(i.qweights)
    ctx.save_for_backward(i.x, output[1], *i.qweights, *i.qzeros, *i.scales, *i.g_idxs, *i.lora_a, *i.lora_b)
    ctx.mark_non_differentiable(output[1])
    ctx.args = (list(i.scalings), i.bits, i.zero_format, i.compute_dtype)
    ctx.none_grads = _frozen_grads(GPTQ, i)


def _backward_gptq(ctx, grads):
    k = ctx.k
    x, t, *rest = ctx.saved_tensors
    q, z, s, g, a, b = (list(rest[i * k : (i + 1) * k]) for i in range(6))
    scalings, bits, zero_format, cdt = ctx.args
    out = torch.ops.foak.lora_linear_gptq_siblings_backward(
        grads[0], x, q, z, s, g, a, b, t, scalings, bits, zero_format, cdt, ctx.needs_input_grad[0]
    )
    dx = out[0] if ctx.needs_input_grad[0] else None
    return GPTQ.siblings.grads(x=dx, lora_a=list(out[1 : 1 + k]), lora_b=list(out[1 + k :]), **ctx.none_grads)


lora_linear_gptq_siblings.register_autograd(_backward_gptq, setup_context=_setup_gptq)
