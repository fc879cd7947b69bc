"""torch.ops.foak.dequantize_4bit / dequantize_4bit_stacked and dequantize_gptq / dequantize_gptq_stacked:
the bitsandbytes 4-bit and the GPTQ dequant as opaque ops, which the quantised LoRA ops call while the
backend compiles for CUDA graphs (or always / never: config.opaque_dequant, FOAK_OPAQUE_DEQUANT=1 / 0).
GPTQ follows the rule NF4 was measured by; its own effect is not measured yet.

Inlined (ops/registry.py), a 4-bit LoRA op's body launches the dequant kernel through
`wrap_triton`, so AOTAutograd and inductor trace, functionalise, analyse and code-generate that
launch for every projection, forward and backward: the NF4 step's first call took 1.30-1.50× of
inductor's where bf16's took ~0.95× (docs/decisions.md). Called through one of these ops the
dequant is one opaque node per weight (per sibling group: one for the stacked weight) that
inductor calls as an extern kernel, at a host cost per call (~0.27 ms) that CUDA graphs' replays
do not pay: with CUDA graphs the opaque dequant compiles faster at the same speed and memory,
without them it costs a third of the tokens/s, hence the rule. Two traps, both handled:
- the joint graph's CSE (torch/_functorch/compile_utils.fx_graph_cse) merged the forward's and the
  backward's dequant of a weight, identical calls, into one node whose output the partitioner then
  kept for backward (+1.8 GiB). `site` (FORWARD, BACKWARD) makes the calls differ; a tag does not
  stop that pass (it skips only a fixed list of aten random ops);
- a `wrap_triton` launch called eagerly, as inside an opaque op's body at run time, went through
  torch's higher-order-op dispatch (torch's own comment: ~1 ms) unless that is switched off: the
  ops' bodies run under registry.direct_launches.
"""

from typing import Optional

import torch

from .. import config
from ..kernels import bnb4, gptq
from .registry import direct_launches


def opaque() -> bool:
    """Whether a quantised LoRA op being traced calls the opaque dequant: config.opaque_dequant
    (FOAK_OPAQUE_DEQUANT=1 / 0: always / never) or, unset, only while the backend compiles for CUDA graphs
    (config.cuda_graphs: a mode with triton.cudagraphs, "reduce-overhead", "max-autotune"), whose replays
    take the op's host cost away (see the module docstring)."""
    cfg = config.current()
    return cfg.cuda_graphs if cfg.opaque_dequant is None else cfg.opaque_dequant


FORWARD, BACKWARD = 0, 1  # the `site` of a call: not used by the kernel, it keeps the two calls apart


@torch.library.custom_op("foak::dequantize_4bit", mutates_args=())
@direct_launches
def dequantize_4bit(
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    quant_type: str,
    blocksize: int,
    nested_blocksize: int,
    weight_shape: list[int],
    dtype: torch.dtype,
    site: int,
) -> torch.Tensor:
    """kernels/bnb4.dequantize_4bit: the [out, in] weight in `dtype`; `site`: FORWARD or BACKWARD."""
    return bnb4.dequantize_4bit(
        qweight,
        absmax,
        blocksize,
        quant_type,
        weight_shape,
        dtype,
        nested_absmax,
        nested_code,
        offset,
        nested_blocksize,
    )


@dequantize_4bit.register_fake
def _(
    qweight,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    quant_type,
    blocksize,
    nested_blocksize,
    weight_shape,
    dtype,
    site,
):
    return qweight.new_empty(weight_shape, dtype=dtype)


@torch.library.custom_op("foak::dequantize_4bit_stacked", mutates_args=())
@direct_launches
def dequantize_4bit_stacked(
    qweights: list[torch.Tensor],
    absmaxes: list[torch.Tensor],
    nested_absmaxes: list[Optional[torch.Tensor]],
    nested_codes: list[Optional[torch.Tensor]],
    offsets: list[Optional[torch.Tensor]],
    quant_type: str,
    blocksize: int,
    nested_blocksize: int,
    weight_shapes: list[int],
    dtype: torch.dtype,
    site: int,
) -> torch.Tensor:
    """The weights (shapes flattened: out_1, in, out_2, in, ...) as the rows of one [Σout, in] tensor."""
    return stacked(
        qweights,
        absmaxes,
        nested_absmaxes,
        nested_codes,
        offsets,
        quant_type,
        blocksize,
        nested_blocksize,
        pairs(weight_shapes),
        dtype,
    )


@dequantize_4bit_stacked.register_fake
def _(
    qweights,
    absmaxes,
    nested_absmaxes,
    nested_codes,
    offsets,
    quant_type,
    blocksize,
    nested_blocksize,
    weight_shapes,
    dtype,
    site,
):
    shapes = pairs(weight_shapes)
    return qweights[0].new_empty((sum(o for o, _ in shapes), shapes[0][1]), dtype=dtype)


def pairs(flat):
    """(out, in) shapes from their flattened list (an op schema's list[int])."""
    return [(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]


def stacked(
    qweights, absmaxes, nested_absmaxes, nested_codes, offsets, quant_type, blocksize, nested_blocksize, shapes, dtype
) -> torch.Tensor:
    """The siblings' dequantised weights as the rows of one [Σout, in] tensor, a launch per weight."""
    w = torch.empty(sum(o for o, _ in shapes), shapes[0][1], dtype=dtype, device=qweights[0].device)
    start = 0
    for q, am, na, nc, off, (o, i) in zip(qweights, absmaxes, nested_absmaxes, nested_codes, offsets, shapes):
        bnb4.dequantize_4bit(
            q, am, blocksize, quant_type, (o, i), dtype, na, nc, off, nested_blocksize, out=w, out_row=start
        )
        start += o
    return w


def weight(
    qweight,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    quant_type,
    blocksize,
    nested_blocksize,
    weight_shape,
    dtype,
    site: int,
) -> torch.Tensor:
    """What a 4-bit op calls: the kernel launch inline, or the opaque op (opaque())."""
    if opaque():
        return torch.ops.foak.dequantize_4bit(
            qweight,
            absmax,
            nested_absmax,
            nested_code,
            offset,
            quant_type,
            blocksize,
            nested_blocksize,
            list(weight_shape),
            dtype,
            site,
        )
    return bnb4.dequantize_4bit(
        qweight,
        absmax,
        blocksize,
        quant_type,
        weight_shape,
        dtype,
        nested_absmax,
        nested_code,
        offset,
        nested_blocksize,
    )


def stacked_weight(
    qweights,
    absmaxes,
    nested_absmaxes,
    nested_codes,
    offsets,
    quant_type,
    blocksize,
    nested_blocksize,
    shapes,
    dtype,
    site: int,
) -> torch.Tensor:
    """The stacked weight of a sibling group: launches inline, or one opaque op (opaque())."""
    if opaque():
        flat = [int(v) for shape in shapes for v in shape]
        return torch.ops.foak.dequantize_4bit_stacked(
            list(qweights),
            list(absmaxes),
            list(nested_absmaxes),
            list(nested_codes),
            list(offsets),
            quant_type,
            blocksize,
            nested_blocksize,
            flat,
            dtype,
            site,
        )
    return stacked(
        qweights,
        absmaxes,
        nested_absmaxes,
        nested_codes,
        offsets,
        quant_type,
        blocksize,
        nested_blocksize,
        shapes,
        dtype,
    )


# --- GPTQ: the weight in GPTQ's [in, out] layout (kernels/gptq.py) ------------------------------


@torch.library.custom_op("foak::dequantize_gptq", mutates_args=())
@direct_launches
def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_format: int,
    dtype: torch.dtype,
    site: int,
) -> torch.Tensor:
    """kernels/gptq.dequantize: the [in, out] weight in `dtype`; `site`: FORWARD or BACKWARD."""
    return gptq.dequantize(qweight, qzeros, scales, g_idx, bits, dtype, zero_format)


@dequantize_gptq.register_fake
def _(qweight, qzeros, scales, g_idx, bits, zero_format, dtype, site):
    return qweight.new_empty(gptq.check(qweight, qzeros, scales, g_idx, bits, zero_format), dtype=dtype)


@torch.library.custom_op("foak::dequantize_gptq_stacked", mutates_args=())
@direct_launches
def dequantize_gptq_stacked(
    qweights: list[torch.Tensor],
    qzeros: list[torch.Tensor],
    scales: list[torch.Tensor],
    g_idxs: list[torch.Tensor],
    bits: int,
    zero_format: int,
    dtype: torch.dtype,
    site: int,
) -> torch.Tensor:
    """The weights side by side as the columns of one [in, Σout] tensor."""
    return gptq_stacked(qweights, qzeros, scales, g_idxs, bits, zero_format, dtype)


@dequantize_gptq_stacked.register_fake
def _(qweights, qzeros, scales, g_idxs, bits, zero_format, dtype, site):
    dims = [gptq.check(q, z, s, g, bits, zero_format) for q, z, s, g in zip(qweights, qzeros, scales, g_idxs)]
    return qweights[0].new_empty((dims[0][0], sum(o for _, o in dims)), dtype=dtype)


def gptq_stacked(qweights, qzeros, scales, g_idxs, bits, zero_format, dtype) -> torch.Tensor:
    """The siblings' dequantised weights side by side, [in, Σout]: each written at its column offset."""
    dims = [(q.shape[1], g.shape[0]) for q, g in zip(qweights, g_idxs)]  # (out, in); each launch checks its set
    w = torch.empty(dims[0][1], sum(o for o, _ in dims), dtype=dtype, device=qweights[0].device)
    col = 0
    for q, z, s, g, (o, _) in zip(qweights, qzeros, scales, g_idxs, dims):
        gptq.dequantize(q, z, s, g, bits, dtype, zero_format, out=w, out_col=col)
        col += o
    return w


def gptq_weight(qweight, qzeros, scales, g_idx, bits, zero_format, dtype, site: int) -> torch.Tensor:
    """What a GPTQ op calls: [in, out], by the kernel launch inline or the opaque op (opaque())."""
    if opaque():
        return torch.ops.foak.dequantize_gptq(qweight, qzeros, scales, g_idx, bits, zero_format, dtype, site)
    return gptq.dequantize(qweight, qzeros, scales, g_idx, bits, dtype, zero_format)


def gptq_stacked_weight(qweights, qzeros, scales, g_idxs, bits, zero_format, dtype, site: int) -> torch.Tensor:
    """The stacked [in, Σout] weight of a GPTQ sibling group: launches inline, or one opaque op."""
    if opaque():
        return torch.ops.foak.dequantize_gptq_stacked(
            list(qweights), list(qzeros), list(scales), list(g_idxs), bits, zero_format, dtype, site
        )
    return gptq_stacked(qweights, qzeros, scales, g_idxs, bits, zero_format, dtype)
