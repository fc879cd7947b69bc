"""Rotary position embedding (HF `rotate_half` convention), forward and backward.

For each token, with per-token cos/sin (already gathered from position_ids) and h = D/2:

    forward:   y1 = x1·c1 − x2·s1        y2 = x2·c2 + x1·s2
    backward:  dx1 = g1·c1 + g2·s2       dx2 = g2·c2 − g1·s1

Both are `y1 = x1·c1 + x2·a1, y2 = x2·c2 + x1·a2` with (a1, a2) = (−s1, s2) or (s2, −s1), so
one kernel serves both directions. The backward is the transpose of the forward, which is a
rotation by −sin only when cos/sin repeat their halves (as HF's do); we never assume that.

Work is split into tiles of BLOCK_T tokens × BLOCK_H heads of one tensor (q's head blocks,
then k's); program ids run over head blocks fastest, so neighbouring programs read
neighbouring memory in either layout and a program moves enough bytes to keep loads in flight.
cos/sin are loaded once per tile as [BLOCK_T, 1, D] and broadcast over its heads. Tensors are
addressed through [B, S, H, D] strides, so both layouts ([B, H, S, D] and [B, S, H, D]) and
non-contiguous views need no copy; cos/sin are [B or 1, S, D] (stride 0 broadcasts over the
batch). Offsets are int32 unless a tensor spans 2**31 elements.

Math is fp32. When the result is bf16/fp16, eager rounds each product and the sum to that
dtype (`round(round(x·c) + round(x'·s))`); `ROUND` reproduces those roundings so results
are bit-exact with eager rather than one rounding more accurate.
"""

import functools

import torch
import triton
import triton.language as tl

from .common import TL_DTYPE, cast, use_triton, wrap_triton


@triton.jit
def _rotate_tile(
    X,
    Y,
    tok_x,
    tok_y,
    tmask,
    h0,
    n_heads,
    half,
    sxh,
    sxd,
    syh,
    syd,
    c1,
    c2,
    a1,
    a2,
    ROUND: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """One [BLOCK_T, BLOCK_H, half] tile of each half of X rotated into Y; c*/a* are [BLOCK_T, 1, BLOCK_D]."""
    hh = h0 + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    # masks only on tokens and heads keep each half-row one contiguous (vectorisable) run
    mask = tmask[:, None, None] & (hh < n_heads)[None, :, None]
    if not EVEN_D:
        mask = mask & (d < half)[None, None, :]
    px = X + tok_x[:, None, None] + (hh * sxh)[None, :, None] + (d * sxd)[None, None, :]
    x1 = tl.load(px, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(px + half * sxd, mask=mask, other=0.0).to(tl.float32)
    p1, q1 = x1 * c1, x2 * a1
    p2, q2 = x2 * c2, x1 * a2
    if ROUND:  # eager rounds each product to the result dtype before adding
        p1 = cast(p1, Y.dtype.element_ty).to(tl.float32)
        q1 = cast(q1, Y.dtype.element_ty).to(tl.float32)
        p2 = cast(p2, Y.dtype.element_ty).to(tl.float32)
        q2 = cast(q2, Y.dtype.element_ty).to(tl.float32)
    py = Y + tok_y[:, None, None] + (hh * syh)[None, :, None] + (d * syd)[None, None, :]
    tl.store(py, cast(p1 + q1, Y.dtype.element_ty), mask=mask)
    tl.store(py + half * syd, cast(p2 + q2, Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    X1,
    Y1,
    X2,
    Y2,
    COS,
    SIN,
    n_tokens,
    S,
    H1,
    H2,
    half,
    NHB1,
    NHB,
    sx1b,
    sx1s,
    sx1h,
    sx1d,
    sy1b,
    sy1s,
    sy1h,
    sy1d,
    sx2b,
    sx2s,
    sx2h,
    sx2d,
    sy2b,
    sy2s,
    sy2h,
    sy2d,
    scb,
    scs,
    scd,
    ssb,
    sss,
    ssd,
    BACKWARD: tl.constexpr,
    ROUND1: tl.constexpr,
    ROUND2: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    INT64: tl.constexpr,
):
    pid = tl.program_id(0)
    hb = pid % NHB  # head blocks fastest: programs running together touch nearby memory
    t = (pid // NHB) * BLOCK_T + tl.arange(0, BLOCK_T)
    if INT64:
        t = t.to(tl.int64)
    tmask = t < n_tokens
    b = t // S
    s = t - b * S
    d = tl.arange(0, BLOCK_D)
    cmask = tmask[:, None, None]
    if not EVEN_D:
        cmask = cmask & (d < half)[None, None, :]
    pc = COS + (b * scb + s * scs)[:, None, None] + (d * scd)[None, None, :]
    ps = SIN + (b * ssb + s * sss)[:, None, None] + (d * ssd)[None, None, :]
    c1 = tl.load(pc, mask=cmask, other=0.0).to(tl.float32)
    c2 = tl.load(pc + half * scd, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.load(ps, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(ps + half * ssd, mask=cmask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transpose of the forward rotation
        a1, a2 = s2, -s1
    else:
        a1, a2 = -s1, s2
    if hb < NHB1:
        _rotate_tile(
            X1,
            Y1,
            b * sx1b + s * sx1s,
            b * sy1b + s * sy1s,
            tmask,
            hb * BLOCK_H,
            H1,
            half,
            sx1h,
            sx1d,
            sy1h,
            sy1d,
            c1,
            c2,
            a1,
            a2,
            ROUND1,
            BLOCK_H,
            BLOCK_D,
            EVEN_D,
        )
    else:
        _rotate_tile(
            X2,
            Y2,
            b * sx2b + s * sx2s,
            b * sy2b + s * sy2s,
            tmask,
            (hb - NHB1) * BLOCK_H,
            H2,
            half,
            sx2h,
            sx2d,
            sy2h,
            sy2d,
            c1,
            c2,
            a1,
            a2,
            ROUND2,
            BLOCK_H,
            BLOCK_D,
            EVEN_D,
        )


def _bshd(t: torch.Tensor, unsqueeze_dim: int):
    """(sizes, strides) of the [B, S, H, D] view of a tensor laid out per `unsqueeze_dim`
    (1: [B, H, S, D], 2: [B, S, H, D]); permuted tuples, as views cost host time per launch."""
    sz, st = tuple(t.shape), t.stride()
    if unsqueeze_dim == 1:
        return (sz[0], sz[2], sz[1], sz[3]), (st[0], st[2], st[1], st[3])
    return sz, st


def check_shapes(xs, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> None:
    """Raise for inputs the kernel (and the torch path) would misread rather than compute."""
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 or 2, not {unsqueeze_dim}")
    if cos.shape != sin.shape or cos.dim() != 3:
        raise ValueError(f"cos/sin must both be [B or 1, S, D], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    for x in xs:
        v = _bshd(x, unsqueeze_dim)[0] if x.dim() == 4 else None
        if v is None or v[-1] % 2 or cos.shape[2] != v[3] or cos.shape[1] != v[1] or cos.shape[0] not in (1, v[0]):
            raise ValueError(
                f"cannot rotate {tuple(x.shape)} (unsqueeze_dim={unsqueeze_dim}) with cos/sin {tuple(cos.shape)}"
            )
    if len(xs) == 2:  # one launch walks the first tensor's tokens for both
        (b1, s1, _, d1), (b2, s2, _, d2) = (_bshd(x, unsqueeze_dim)[0] for x in xs)
        if (b1, s1, d1) != (b2, s2, d2):
            raise ValueError(
                f"tensors rotated together must have the same batch, sequence and head_dim: "
                f"{tuple(xs[0].shape)} and {tuple(xs[1].shape)} (unsqueeze_dim={unsqueeze_dim})"
            )


def kernel_supported(*ts: torch.Tensor) -> bool:
    return all(use_triton(t) and t.dtype in TL_DTYPE for t in ts)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1  # triton.next_power_of_2 costs µs per call


@functools.lru_cache(maxsize=None)
def _tile(half: int, h1: int, h2: int):
    """(BLOCK_T, BLOCK_H, BLOCK_D, num_warps) for head_dim 2·half and head counts h1, h2 (0: none).

    In the tile sweep (`python -m benchmarks.suite rope -- --sweep`, docs/results.md) every tile from 512 to 8192 elements
    per half and 2 to 8 warps ran within a few % of the best: the kernel streams at about the
    speed of a copy of as many bytes whatever the tile. ~2048 elements per half on 2 warps (four
    16-byte loads per thread and half in flight) was the most consistent across shapes and runs."""
    block_d = _pow2(half)
    # head blocks that divide both head counts (GQA: 32 q, 8 kv) waste no lanes
    block_h = min(_pow2(min(h for h in (h1, h2) if h)), max(1, 1024 // block_d), 8)
    block_t = max(1, min(16, 2048 // (block_h * block_d)))
    return block_t, block_h, block_d, 2


def _needs_int64(*layouts) -> bool:
    """Whether, for some (sizes, strides), an element lies 2**31 or more elements past the start
    (torch strides are >= 0)."""
    for sz, sts in layouts:  # plain loops: this runs on every launch
        span = 0
        for n, st in zip(sz, sts):
            span += (n - 1) * st
        if span >= 2**31:
            return True
    return False


def empty_out(x: torch.Tensor, dtype: torch.dtype, stride=None) -> torch.Tensor:
    """An output shaped like x: x's layout (`empty_like`) or, if given, `stride`."""
    if stride is None:
        return torch.empty_like(x, dtype=dtype)
    return torch.empty_strided(x.shape, stride, dtype=dtype, device=x.device)


def rope(
    x1, x2, cos, sin, unsqueeze_dim: int, out1_dtype, out2_dtype=None, backward: bool = False, out_strides=(None, None)
):
    """Rotate x1 (and x2, if given) with one launch; returns (y1, y2 or None).

    Outputs have the layout of their inputs (`empty_like`) or the strides in `out_strides`
    (the backward writes dx in x's layout, whatever layout dy came in); the fake kernels mirror this.
    """
    xs = [x1] if x2 is None else [x1, x2]
    check_shapes(xs, cos, sin, unsqueeze_dim)
    outs = [empty_out(x1, out1_dtype, out_strides[0])] + (
        [] if x2 is None else [empty_out(x2, out2_dtype, out_strides[1])]
    )
    y2 = outs[1] if x2 is not None else None
    if not kernel_supported(*xs, *outs, cos, sin):
        for x, y in zip(xs, outs):
            y.copy_(rope_torch(x, cos, sin, unsqueeze_dim, y.dtype, backward))
        return outs[0], y2
    (B, S, H1, D), sx1 = _bshd(x1, unsqueeze_dim)
    sy1 = _bshd(outs[0], unsqueeze_dim)[1]
    if x2 is None:  # the second tensor's arguments are never read: no program has its head blocks
        x2_, y2_, H2, sx2, sy2 = x1, outs[0], 0, sx1, sy1
    else:
        x2_, y2_ = x2, y2
        (_, _, H2, _), sx2 = _bshd(x2, unsqueeze_dim)
        sy2 = _bshd(y2, unsqueeze_dim)[1]
    if B * S == 0 or H1 + H2 == 0:
        return outs[0], y2
    half = D // 2
    block_t, block_h, block_d, num_warps = _tile(half, H1, H2)
    nhb1, nhb2 = -(-H1 // block_h), -(-H2 // block_h)
    # stride 0 over the batch: one row of cos/sin for every sequence
    sc = (0 if cos.shape[0] == 1 else cos.stride(0),) + cos.stride()[1:]
    ss = (0 if sin.shape[0] == 1 else sin.stride(0),) + sin.stride()[1:]
    shp1, shp2, shc = (B, S, H1, D), (B, S, H2, D), tuple(cos.shape)
    int64 = _needs_int64((shp1, sx1), (shp1, sy1), (shp2, sx2), (shp2, sy2), (shc, sc), (shc, ss))
    wrap_triton(_rope_kernel)[(-(-(B * S) // block_t) * (nhb1 + nhb2),)](
        x1,
        outs[0],
        x2_,
        y2_,
        cos,
        sin,
        B * S,
        S,
        H1,
        H2,
        half,
        nhb1,
        nhb1 + nhb2,
        *sx1,
        *sy1,
        *sx2,
        *sy2,
        *sc,
        *ss,
        BACKWARD=backward,
        ROUND1=outs[0].dtype != torch.float32,
        ROUND2=y2_.dtype != torch.float32,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        EVEN_D=block_d == half,
        INT64=int64,
        num_warps=num_warps,
        # no FMA: it would skip the product roundings that make bf16/fp16 match eager, and
        # (after LLVM narrows the math to bf16) it did so only for some tiles
        enable_fp_fusion=False,
    )
    return outs[0], y2


# torch path (CPU outside the interpreter, other dtypes): the same formula and roundings.
def rope_torch(x, cos, sin, unsqueeze_dim: int, out_dtype, backward: bool = False):
    h = x.shape[-1] // 2
    acc = torch.float64 if torch.float64 in (x.dtype, cos.dtype, sin.dtype, out_dtype) else torch.float32
    c = cos.unsqueeze(unsqueeze_dim).to(acc)
    s = sin.unsqueeze(unsqueeze_dim).to(acc)
    xf = x.to(acc)
    x1, x2 = xf[..., :h], xf[..., h:]
    a1, a2 = (s[..., h:], -s[..., :h]) if backward else (-s[..., :h], s[..., h:])

    def r(t):
        return t if out_dtype in (torch.float32, acc) else t.to(out_dtype).to(acc)

    y = torch.cat((r(x1 * c[..., :h]) + r(x2 * a1), r(x2 * c[..., h:]) + r(x1 * a2)), dim=-1)
    return y.to(out_dtype)
