"""Rotary position embedding (HF `rotate_half` convention), forward and backward.

For each token, with per-token cos/sin (already gathered from position_ids) and h = D/2:

    forward:   y1 = x1·c1 − x2·s1        y2 = x2·c2 + x1·s2
    backward:  dx1 = g1·c1 + g2·s2       dx2 = g2·c2 − g1·s1

Both are `y1 = x1·c1 + x2·a1, y2 = x2·c2 + x1·a2` with (a1, a2) = (−s1, s2) or (s2, −s1), so
one kernel serves both directions. The backward is the transpose of the forward, which is a
rotation by −sin only when cos/sin repeat their halves (as HF's do); we never assume that.

One program per token rotates every head of both tensors (q and k, any head counts) and loads
that token's cos/sin once. Tensors are addressed through [B, S, H, D] strides, so both
layouts ([B, H, S, D] and [B, S, H, D]) and non-contiguous views need no copy; cos/sin are
[B or 1, S, D] (stride 0 broadcasts over the batch).

Math is fp32. When the result is bf16/fp16, eager rounds each product and the sum to that
dtype (`round(round(x·c) + round(x'·s))`); `ROUND` reproduces those roundings so results
are bit-exact with eager rather than one rounding more accurate.
"""
import torch
import triton
import triton.language as tl

from .common import TL_DTYPE, cast, use_triton


@triton.jit
def _rotate_heads(X, Y, base_x, base_y, n_heads, half, sxh, sxd, syh, syd, c1, c2, a1, a2, d,
                  ROUND: tl.constexpr, BLOCK_H: tl.constexpr):
    dmask = d < half
    for h0 in range(0, n_heads, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        mask = (hh < n_heads)[:, None] & dmask[None, :]
        px = X + base_x + hh[:, None].to(tl.int64) * sxh + d[None, :] * sxd
        x1 = tl.load(px, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(px + half * sxd, mask=mask, other=0.0).to(tl.float32)
        p1, q1 = x1 * c1[None, :], x2 * a1[None, :]
        p2, q2 = x2 * c2[None, :], x1 * a2[None, :]
        if ROUND:  # eager rounds each product to the result dtype before adding
            p1 = cast(p1, Y.dtype.element_ty).to(tl.float32)
            q1 = cast(q1, Y.dtype.element_ty).to(tl.float32)
            p2 = cast(p2, Y.dtype.element_ty).to(tl.float32)
            q2 = cast(q2, Y.dtype.element_ty).to(tl.float32)
        py = Y + base_y + hh[:, None].to(tl.int64) * syh + d[None, :] * syd
        tl.store(py, cast(p1 + q1, Y.dtype.element_ty), mask=mask)
        tl.store(py + half * syd, cast(p2 + q2, Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(X1, Y1, X2, Y2, COS, SIN, S, H1, H2, half,
                 sx1b, sx1s, sx1h, sx1d, sy1b, sy1s, sy1h, sy1d,
                 sx2b, sx2s, sx2h, sx2d, sy2b, sy2s, sy2h, sy2d,
                 scb, scs, scd, ssb, sss, ssd,
                 BACKWARD: tl.constexpr, HAS_2: tl.constexpr, ROUND1: tl.constexpr, ROUND2: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b, s = pid // S, pid % S
    d = tl.arange(0, BLOCK_D)
    dmask = d < half
    pc, ps = COS + b * scb + s * scs + d * scd, SIN + b * ssb + s * sss + d * ssd
    c1 = tl.load(pc, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(pc + half * scd, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(ps, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(ps + half * ssd, mask=dmask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transpose of the forward rotation
        a1, a2 = s2, -s1
    else:
        a1, a2 = -s1, s2
    _rotate_heads(X1, Y1, b * sx1b + s * sx1s, b * sy1b + s * sy1s, H1, half, sx1h, sx1d, sy1h, sy1d,
                  c1, c2, a1, a2, d, ROUND1, BLOCK_H)
    if HAS_2:
        _rotate_heads(X2, Y2, b * sx2b + s * sx2s, b * sy2b + s * sy2s, H2, half, sx2h, sx2d, sy2h, sy2d,
                      c1, c2, a1, a2, d, ROUND2, BLOCK_H)


def _bshd(t: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """A [B, S, H, D] view of a tensor laid out per `unsqueeze_dim` (1: [B, H, S, D], 2: [B, S, H, D])."""
    return t.transpose(1, 2) if unsqueeze_dim == 1 else t


def check_shapes(xs, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> None:
    """Raise for inputs the kernel (and the torch path) would misread rather than compute."""
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 or 2, not {unsqueeze_dim}")
    if cos.shape != sin.shape or cos.dim() != 3:
        raise ValueError(f"cos/sin must both be [B or 1, S, D], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    for x in xs:
        v = _bshd(x, unsqueeze_dim) if x.dim() == 4 else None
        if v is None or v.shape[-1] % 2 or cos.shape[2] != v.shape[3] or cos.shape[1] != v.shape[1] \
                or cos.shape[0] not in (1, v.shape[0]):
            raise ValueError(f"cannot rotate {tuple(x.shape)} (unsqueeze_dim={unsqueeze_dim}) "
                             f"with cos/sin {tuple(cos.shape)}")


def kernel_supported(*ts: torch.Tensor) -> bool:
    return all(use_triton(t) and t.dtype in TL_DTYPE for t in ts)


def _tile(half: int, heads: int):
    block_d = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(heads), max(1, 4096 // block_d))
    return block_h, block_d, max(1, min(8, block_h * block_d // 256))


def rope(x1, x2, cos, sin, unsqueeze_dim: int, out1_dtype, out2_dtype=None, backward: bool = False):
    """Rotate x1 (and x2, if given) with one launch; returns (y1, y2 or None).

    Outputs have the layout of their inputs (`empty_like`), which the fake kernels mirror.
    """
    xs = [x1] if x2 is None else [x1, x2]
    check_shapes(xs, cos, sin, unsqueeze_dim)
    outs = [torch.empty_like(x1, dtype=out1_dtype)] + ([] if x2 is None else [torch.empty_like(x2, dtype=out2_dtype)])
    if not kernel_supported(*xs, *outs, cos, sin):
        for x, y in zip(xs, outs):
            y.copy_(rope_torch(x, cos, sin, unsqueeze_dim, y.dtype, backward))
        return outs[0], (outs[1] if x2 is not None else None)
    v = [_bshd(t, unsqueeze_dim) for t in xs + outs]
    vx1, vx2 = v[0], v[1] if x2 is not None else v[0]
    vy1, vy2 = v[len(xs)], v[-1]
    B, S, H1, D = vx1.shape
    if B * S == 0:
        return outs[0], (outs[1] if x2 is not None else None)
    bcast = cos.shape[0] == 1  # one row of cos/sin for every sequence of the batch
    block_h, block_d, num_warps = _tile(D // 2, max(H1, vx2.shape[2]))
    _rope_kernel[(B * S,)](
        vx1, vy1, vx2, vy2, cos, sin, S, H1, vx2.shape[2] if x2 is not None else 0, D // 2,
        *vx1.stride(), *vy1.stride(), *vx2.stride(), *vy2.stride(),
        0 if bcast else cos.stride(0), cos.stride(1), cos.stride(2),
        0 if bcast else sin.stride(0), sin.stride(1), sin.stride(2),
        BACKWARD=backward, HAS_2=x2 is not None,
        ROUND1=vy1.dtype != torch.float32, ROUND2=vy2.dtype != torch.float32,
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps)
    return outs[0], (outs[1] if x2 is not None else None)


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
