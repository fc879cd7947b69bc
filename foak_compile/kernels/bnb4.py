"""Dequantising bitsandbytes 4-bit weights (NF4 / FP4, optionally double-quantised absmax).

The format (bitsandbytes `quantize_4bit`): the [out, in] weight is flattened row-major and
cut into blocks of `blocksize` values; each value is a 4-bit index into a 16-entry table
(NF4 or FP4), two per byte, the even element in the high nibble. Block b is scaled by
absmax[b]. With double quantisation (compress_statistics=True) absmax itself is stored as
uint8 indices into a 256-entry table, in blocks of `nested_blocksize` (256) scaled by
nested_absmax, plus a global offset:

    absmax[b] = nested_code[qabsmax[b]] · nested_absmax[b // nested_blocksize] + offset
    w[i]      = dtype(code[q[i]] · absmax[i // blocksize])

Everything is fp32 up to the one rounding to `dtype`, multiply then add, as bitsandbytes
does it; the kernel is launched without FMA contraction so a GPU gives the same bits.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import TL_DTYPE, cast, use_triton, wrap_triton

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

# The two 4-bit formats, by index: NF4 is quantiles of N(0, 1) scaled to [-1, 1] (QLoRA
# paper); FP4 is sign + 2 exponent bits + 1 mantissa bit, normalised by its largest value 12.
_NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

_TABLES: dict = {}


def code_table(quant_type: str, device) -> torch.Tensor:
    """The 16 fp32 values a 4-bit index stands for (FP4 divided by 12 in fp32, like bitsandbytes)."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', not {quant_type!r}")

    def make():
        if quant_type == "nf4":
            return torch.tensor(_NF4, dtype=torch.float32).to(device)
        return (torch.tensor(_FP4_RAW, dtype=torch.float32) / 12.0).to(device)

    if torch._guards.detect_fake_mode() is not None:
        # traced into a graph (an inlined op): a constant of that graph; a cached real tensor
        # cannot mix with fake ones, and a fake one must never reach the cache
        return make()
    key = (quant_type, str(device))
    if key not in _TABLES:
        _TABLES[key] = make()
    return _TABLES[key]


@triton.jit
def _pick(bit, one, zero):
    return tl.where(bit, one, zero)


@triton.jit
def _code_value(idx, FP4: tl.constexpr):
    """code_table(quant_type)[idx] as selects on idx's bits (the table is written into the kernel:
    no table tensor per launch, which a traced launch would make a graph constant and a copy)."""
    b0 = (idx & 1) != 0
    b1 = (idx & 2) != 0
    b2 = (idx & 4) != 0
    b3 = (idx & 8) != 0
    if FP4:  # bit 3 the sign; magnitudes 0, 0.0625, 8, 12, 4, 6, 2, 3, then / 12 (IEEE, as torch divides)
        raw = _pick(
            b2,
            _pick(b1, _pick(b0, 3.0, 2.0), _pick(b0, 6.0, 4.0)),
            _pick(b1, _pick(b0, 12.0, 8.0), _pick(b0, 0.0625, 0.0)),
        )
        v = tl.math.div_rn(raw, tl.full(raw.shape, 12.0, tl.float32))
        v = tl.where(b3, -v, v)
    else:  # _NF4, each literal the exact fp32 value
        neg = _pick(
            b2,
            _pick(b1, _pick(b0, 0.0, -0.09105003625154495), _pick(b0, -0.18477343022823334, -0.28444138169288635)),
            _pick(b1, _pick(b0, -0.39491748809814453, -0.5250730514526367), _pick(b0, -0.6961928009986877, -1.0)),
        )
        pos = _pick(
            b2,
            _pick(b1, _pick(b0, 1.0, 0.7229568362236023), _pick(b0, 0.5626170039176941, 0.44070982933044434)),
            _pick(
                b1,
                _pick(b0, 0.33791524171829224, 0.24611230194568634),
                _pick(b0, 0.16093020141124725, 0.07958029955625534),
            ),
        )
        v = tl.where(b3, pos, neg)
    return v.to(tl.float32)


@triton.jit
def _dequant_4bit(
    Q,
    ABSMAX,
    QABSMAX,
    NESTED_CODE,
    OFFSET,
    OUT,
    out_start,
    n,
    FP4: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    byte = tl.load(Q + i // 2, mask=mask, other=0).to(tl.int32)
    idx = tl.where(i % 2 == 0, byte >> 4, byte & 15)
    v = _code_value(idx, FP4)
    blk = i // BLOCKSIZE
    if NESTED:
        qa = tl.load(QABSMAX + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(NESTED_CODE + qa, mask=mask, other=0.0) * tl.load(
            ABSMAX + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0
        )
        scale = scale + tl.load(OFFSET)
    else:
        scale = tl.load(ABSMAX + blk, mask=mask, other=0.0)
    tl.store(OUT + out_start + i, cast(v * scale, OUT.dtype.element_ty), mask=mask)


def _check(qweight, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset):
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} not in {BLOCKSIZES}")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', not {quant_type!r}")
    n = shape[0] * shape[1]
    if qweight.numel() * qweight.element_size() < (n + 1) // 2:
        raise ValueError(f"{qweight.numel() * qweight.element_size()} packed bytes for a {tuple(shape)} weight")
    blocks = -(-n // blocksize)
    if absmax.numel() < blocks:
        raise ValueError(f"{absmax.numel()} absmax values for {blocks} blocks")
    if (nested_absmax is None) != (nested_code is None) or (nested_absmax is None) != (offset is None):
        raise ValueError("double quantisation needs nested_absmax, nested_code and offset together")


def dequantize_4bit(
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape,
    dtype: torch.dtype,
    nested_absmax=None,
    nested_code=None,
    offset=None,
    nested_blocksize: int = 256,
    out: Optional[torch.Tensor] = None,
    out_row: int = 0,
) -> torch.Tensor:
    """The [out, in] weight in `dtype`. `absmax` is fp32, or uint8 when double-quantised
    (then nested_absmax/nested_code/offset are given). `out`: a contiguous [rows, in] tensor of
    `dtype` (a stacked weight) whose rows from `out_row` on receive the weight; returned whole.
    The kernel is given the whole buffer and an offset, never a row slice: a slice written by
    a kernel traced into inductor's graph is left to its view handling (an illegal address on
    CUDA in the 4-bit siblings op)."""
    shape = tuple(int(s) for s in shape)
    _check(qweight, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset)
    if out is not None and (
        out.dim() != 2
        or out.shape[1] != shape[1]
        or not 0 <= out_row <= out.shape[0] - shape[0]
        or out.dtype != dtype
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous [rows >= {out_row} + {shape[0]}, {shape[1]}] {dtype} tensor, "
            f"not {tuple(out.shape)} {out.dtype}"
        )
    q = qweight.reshape(-1).view(torch.uint8) if qweight.dtype != torch.uint8 else qweight.reshape(-1)
    if not (use_triton(q) and dtype in TL_DTYPE):
        w = dequantize_4bit_torch(
            q, absmax, blocksize, quant_type, shape, dtype, nested_absmax, nested_code, offset, nested_blocksize
        )
        if out is None:
            return w
        out[out_row : out_row + shape[0]].copy_(w)
        return out
    n = shape[0] * shape[1]
    out = torch.empty(shape, dtype=dtype, device=q.device) if out is None else out
    nested = nested_absmax is not None
    scales = nested_absmax.float() if nested else absmax.float()
    block = 1024
    wrap_triton(_dequant_4bit)[(triton.cdiv(n, block),)](  # unused pointers (not nested): any tensor
        q,
        scales,
        absmax if nested else q,
        nested_code.float() if nested else scales,
        offset.float().reshape(1) if nested else scales,
        out,
        out_row * shape[1],
        n,
        FP4=quant_type == "fp4",
        BLOCKSIZE=blocksize,
        NESTED=nested,
        NESTED_BLOCKSIZE=nested_blocksize,
        BLOCK=block,
        num_warps=4,
        enable_fp_fusion=False,
    )  # multiply, then add, like bitsandbytes: the same bits
    return out


def dequantize_4bit_torch(
    q,
    absmax,
    blocksize,
    quant_type,
    shape,
    dtype,
    nested_absmax=None,
    nested_code=None,
    offset=None,
    nested_blocksize: int = 256,
):
    """The same numbers with torch ops: devices without Triton."""
    n = shape[0] * shape[1]
    q = q.reshape(-1)
    idx = torch.stack(((q >> 4), (q & 15)), dim=1).reshape(-1)[:n].long()
    v = code_table(quant_type, q.device)[idx]
    blk = torch.arange(n, device=q.device) // blocksize
    if nested_absmax is not None:
        outer = nested_absmax.float().repeat_interleave(nested_blocksize)[: absmax.numel()]
        scale = nested_code.float()[absmax.long()] * outer + offset.float()
    else:
        scale = absmax.float()
    return (v * scale[blk]).to(dtype).reshape(shape)
