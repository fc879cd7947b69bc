"""Dequantising GPTQ weights (the packed layout of GPTQ checkpoints, gptqmodel, auto-gptq).

The layout, for a linear layer y = x·W with W stored transposed, [in, out]:

    qweight [ceil(in·bits/32), out] int32  code of W[i, j] = qweight[i // pf, j] >> (bits·(i % pf)) & maxq
    qzeros  [groups, ceil(out·bits/32)] int32   zero of group g, column j: the same packing along j
    scales  [groups, out] float (fp16 in checkpoints)
    g_idx   [in] int   the group of each input row (act-order permutes it; i // group_size otherwise;
                       all zero for group_size -1, i.e. one scale per output channel)

with pf = 32 // bits values per word, maxq = 2**bits - 1, and

    W[i, j] = scales.dtype( scales[g, j] · (code[i, j] − zero[g, j]) ),  g = g_idx[i]

the product exact in fp32 and rounded once to the scales' dtype, as torch rounds
`scales[g_idx] * (codes - zeros)` (gptqmodel's TorchLinear), then cast to the requested dtype
(gptqmodel casts that weight to the activation's dtype: a second rounding, reproduced).

Zero points: checkpoint format v1 ("gptq", auto-gptq) stores zero − 1, format v2 ("gptq_v2")
the zero itself. gptqmodel converts v1 → v2 when it loads a checkpoint by adding 1 to every
field of each packed int32 word at once (0x11111111 for 4 bits), carries included; with
zero_format=1 the kernel decodes a v1 word the same way, so both give identical bits.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import TL_DTYPE, cast, use_triton, wrap_triton

BITS = (2, 4, 8)  # whole fields per 32-bit word; 3-bit and the planar 5/6/7-bit layouts are not


def _v1_offset(bits: int) -> int:
    """1 in every `bits`-wide field of a 32-bit word: v1 → v2 zero points."""
    return sum(1 << (bits * k) for k in range(32 // bits))


@triton.jit
def _dequant_gptq(
    QW,
    QZ,
    S,
    G,
    OUT,
    n_in,
    n_out,
    stride_qz,
    stride_out,
    out_col,
    V1_OFFSET,
    BITS: tl.constexpr,
    V1: tl.constexpr,
    ROUND_TWICE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    PF: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    rows = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)  # input features
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features
    rmask = rows < n_in
    mask = rmask[:, None] & (cols < n_out)[None, :]
    r64 = rows.to(tl.int64)
    word = tl.load(QW + (r64 // PF)[:, None] * n_out + cols[None, :], mask=mask, other=0)
    # the arithmetic shift of a negative word only fills bits the mask drops
    code = (word >> ((rows % PF) * BITS)[:, None]) & MAXQ
    g = tl.load(G + rows, mask=rmask, other=0).to(tl.int64)
    zword = tl.load(QZ + g[:, None] * stride_qz + (cols // PF)[None, :], mask=mask, other=0)
    if V1:  # one 32-bit add over the word, carries and all, like gptqmodel's v1 → v2 conversion
        zword = (zword.to(tl.int64) + V1_OFFSET) & 0xFFFFFFFF
    zero = (zword >> ((cols % PF) * BITS)[None, :]) & MAXQ
    scale = tl.load(S + g[:, None] * n_out + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = scale * (code - zero).to(tl.float32)  # |code − zero| ≤ 255: exact for 16-bit scales
    if ROUND_TWICE:  # to the scales' dtype first, as the library's dequantised weight is
        w = cast(w, S.dtype.element_ty).to(tl.float32)
    tl.store(OUT + r64[:, None] * stride_out + (out_col + cols)[None, :], cast(w, OUT.dtype.element_ty), mask=mask)


def check(qweight, qzeros, scales, g_idx, bits: int, zero_format: int = 2) -> tuple:
    """(in_features, out_features) of a consistent GPTQ tensor set; ValueError otherwise."""
    if bits not in BITS:
        raise ValueError(f"GPTQ bits must be one of {BITS}, not {bits}")
    if zero_format not in (1, 2):
        raise ValueError(f"zero_format must be 1 (v1, zero − 1 stored) or 2 (v2), not {zero_format}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"qweight/qzeros must be int32 words, not {qweight.dtype}/{qzeros.dtype}")
    if not scales.is_floating_point() or g_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"scales must be floating and g_idx integer, not {scales.dtype}/{g_idx.dtype}")
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2 or g_idx.dim() != 1:
        raise ValueError("qweight, qzeros, scales must be 2-D and g_idx 1-D")
    n_in, (groups, n_out) = g_idx.shape[0], scales.shape
    pf = 32 // bits
    if tuple(qweight.shape) != (-(-n_in // pf), n_out):
        raise ValueError(f"qweight {tuple(qweight.shape)} does not hold a {n_in}x{n_out} {bits}-bit weight")
    if tuple(qzeros.shape) != (groups, -(-n_out // pf)):
        raise ValueError(f"qzeros {tuple(qzeros.shape)} does not hold {groups}x{n_out} {bits}-bit zeros")
    return n_in, n_out


def dequantize(
    qweight,
    qzeros,
    scales,
    g_idx,
    bits: int,
    dtype: torch.dtype,
    zero_format: int = 2,
    out: Optional[torch.Tensor] = None,
    out_col: int = 0,
) -> torch.Tensor:
    """The weight in GPTQ's own orientation, [in_features, out_features], in `dtype`.
    g_idx values must lie in [0, groups) (not checked: that would synchronise with the device).
    `out`: a contiguous [in, cols] tensor of `dtype` (siblings' stacked weight) whose columns from
    `out_col` on receive the weight; returned whole. The kernel gets the whole buffer and an offset
    (a written view is left to inductor's view handling, see bnb4.dequantize_4bit)."""
    n_in, n_out = check(qweight, qzeros, scales, g_idx, bits, zero_format)
    if out is not None and (
        out.dim() != 2
        or out.shape[0] != n_in
        or not 0 <= out_col <= out.shape[1] - n_out
        or out.dtype != dtype
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous [{n_in}, cols >= {out_col} + {n_out}] {dtype} tensor, "
            f"not {tuple(out.shape)} {out.dtype}"
        )
    if not (use_triton(qweight) and dtype in TL_DTYPE and scales.dtype in TL_DTYPE):
        w = dequantize_torch(qweight, qzeros, scales, g_idx, bits, dtype, zero_format)
        if out is None:
            return w
        out[:, out_col : out_col + n_out].copy_(w)
        return out
    out = torch.empty((n_in, n_out), dtype=dtype, device=qweight.device) if out is None else out
    if n_in * n_out == 0:
        return out
    block_k, block_n = 32, 128
    grid = (triton.cdiv(n_in, block_k), triton.cdiv(n_out, block_n))
    wrap_triton(_dequant_gptq)[grid](
        qweight.contiguous(),
        qzeros.contiguous(),
        scales.contiguous(),
        g_idx.contiguous(),
        out,
        n_in,
        n_out,
        qzeros.shape[1],
        out.shape[1],
        out_col,
        _v1_offset(bits),
        BITS=bits,
        V1=zero_format == 1,
        ROUND_TWICE=scales.dtype != dtype,
        BLOCK_K=block_k,
        BLOCK_N=block_n,
        num_warps=4,
    )
    return out


def _unpack(words: torch.Tensor, bits: int, dim: int, n: int) -> torch.Tensor:
    """The `bits`-wide fields of int32 words along `dim`, field k of a word at position pf·w + k."""
    pf = 32 // bits
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int64)
    w = words.to(torch.int64).unsqueeze(dim + 1)
    shape = [1] * w.dim()
    shape[dim + 1] = pf
    fields = (w >> shifts.view(shape)) & ((1 << bits) - 1)
    fields = fields.flatten(dim, dim + 1)
    return fields.narrow(dim, 0, n)


def dequantize_torch(
    qweight, qzeros, scales, g_idx, bits: int, dtype: torch.dtype, zero_format: int = 2
) -> torch.Tensor:
    """The same numbers with torch ops: devices without Triton."""
    n_in, n_out = check(qweight, qzeros, scales, g_idx, bits, zero_format)
    codes = _unpack(qweight, bits, 0, n_in)  # [in, out]
    words = qzeros.to(torch.int64)
    if zero_format == 1:
        words = (words + _v1_offset(bits)) & 0xFFFFFFFF
    zeros = _unpack(words, bits, 1, n_out)  # [groups, out]
    g = g_idx.long()
    w = scales.float()[g] * (codes - zeros[g]).float()
    return w.to(scales.dtype).to(dtype)
