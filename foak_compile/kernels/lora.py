"""LoRA dropout with a mask that is a function of (seed, element): the forward drops
x → drop(x), the backward regenerates the very same mask from the seed, so neither the
mask nor the dropped activations are saved.

    keep[i]  = rand(seed, i) >= p          (P(keep) = 1 − p, i = row · n_cols + col)
    drop(x)  = keep ? x · 1/(1−p) : 0      (fp32 math, one rounding)

`dropout_add_` applies the same mask to a gradient and adds it to another one in place:
dx += drop(g), the adapter's share of dX.

`low_rank_add_` adds the adapter's rank-r product into the base GEMM's output in place,
y += alpha · u·vᵀ (u [M, r], v [N, r]), one rounding, reading and writing y once. cuBLAS's
in-place addmm does the same, but an inlined op is functionalised (ops/registry.py) and the
addmm becomes out-of-place: a copy of y, then a GEMM that reads the copy. A Triton launch that
mutates y is reinplaced by inductor instead. The torch path (devices without Triton) draws its
mask from a hash of (seed, index) in torch ops: a different mask than the kernel's, but the
same one in forward and backward, which is all autograd needs.
"""

import torch
import triton
import triton.language as tl

from .common import INTERPRET, TL_DTYPE, cast, grid_2d, rows_2d, use_triton, wrap_triton

_DOT_IN_FP32 = tl.constexpr(INTERPRET)


@triton.jit
def _keep(seed, rows, cols, n_cols, p):
    idx = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    return tl.rand(seed, idx) >= p


@triton.jit
def _dropout(
    X,
    OUT,
    n_rows,
    n_cols,
    stride_x,
    stride_out,
    SEED,
    p,
    scale,
    ACCUMULATE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """OUT = drop(X), or OUT += drop(X) with ACCUMULATE; the seed is read from memory so a
    CUDA graph or an inlined op replays with the seed of the step, not a baked-in constant."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.where(_keep(tl.load(SEED), rows, cols, n_cols, p), x * scale, 0.0)
    if ACCUMULATE:
        y += tl.load(OUT + r64 * stride_out + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + r64 * stride_out + cols[None, :], cast(y, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _low_rank_add(
    Y,
    U,
    V,
    M,
    N,
    R,
    col0,
    stride_y,
    stride_um,
    stride_ur,
    stride_vn,
    stride_vr,
    alpha,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Y[:, col0:col0+N] += alpha · U·Vᵀ over one [BLOCK_M, BLOCK_N] tile, accumulated in fp32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r64, c64 = rows.to(tl.int64), cols.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_R):
        ks = k0 + tl.arange(0, BLOCK_R)
        u = tl.load(
            U + r64[:, None] * stride_um + ks[None, :] * stride_ur,
            mask=(rows < M)[:, None] & (ks < R)[None, :],
            other=0.0,
        )
        v = tl.load(
            V + c64[None, :] * stride_vn + ks[:, None] * stride_vr,
            mask=(cols < N)[None, :] & (ks < R)[:, None],
            other=0.0,
        )
        if _DOT_IN_FP32:  # the interpreter has no half-precision dot; the products are exact in fp32 anyway
            u, v = u.to(tl.float32), v.to(tl.float32)
        acc += tl.dot(u, v, input_precision=PRECISION)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    ptr = Y + r64[:, None] * stride_y + (col0 + c64)[None, :]
    y = tl.load(ptr, mask=mask, other=0.0).to(tl.float32) + alpha * acc
    tl.store(ptr, cast(y, Y.dtype.element_ty), mask=mask)


def low_rank_add_(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor, alpha: float, col0: int = 0) -> torch.Tensor:
    """y[:, col0:col0+N] += alpha · u·vᵀ in place; y [M, ≥col0+N] with unit column stride, u [M, r],
    v [N, r] (any strides), all of one dtype. Returns y."""
    (m, r), n = u.shape, v.shape[0]
    assert y.dim() == 2 and y.stride(1) == 1 and y.shape[0] == m and col0 + n <= y.shape[1] and v.shape[1] == r
    if not (use_triton(y) and y.dtype in TL_DTYPE and u.dtype == v.dtype == y.dtype):
        y[:, col0 : col0 + n].addmm_(u, v.t(), alpha=alpha)
        return y
    if m and n and r:
        block_r = min(64, max(16, triton.next_power_of_2(r)))
        grid = (triton.cdiv(m, 64), triton.cdiv(n, 128))
        wrap_triton(_low_rank_add)[grid](
            y,
            u,
            v,
            m,
            n,
            r,
            col0,
            y.stride(0),
            u.stride(0),
            u.stride(1),
            v.stride(0),
            v.stride(1),
            alpha,
            PRECISION="ieee" if y.dtype == torch.float32 or INTERPRET else "tf32",
            BLOCK_M=64,
            BLOCK_N=128,
            BLOCK_R=block_r,
            num_warps=4,
        )
    return y


def _check_p(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), not {p}")


_M32 = 0xFFFFFFFF


def torch_keep(shape, seed, p: float, device) -> torch.Tensor:
    """The torch path's mask: a counter-based hash of (seed, element index), so it is a pure
    function of the seed tensor (traceable, no host sync) like the kernel's tl.rand; a different
    stream than the kernel's, but the same one in forward and backward. Constants stay below
    2**31 so every product fits in int64."""
    seed = _seed_tensor(seed, device).to(device)
    n = 1
    for d in shape:
        n *= d
    h = (torch.arange(n, device=device, dtype=torch.int64) + seed * 0x27D4EB2D) & _M32
    for c in (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39):  # xorshift-multiply rounds (lowbias32-style)
        h = ((h ^ (h >> 16)) * c) & _M32
    h = h ^ (h >> 16)
    return ((h >> 8).to(torch.float32) * (1.0 / 2**24) >= p).reshape(shape)


def _seed_tensor(seed, device) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        return seed.reshape(1)
    return torch.tensor([seed], dtype=torch.int64, device=device)


def _launch(x2, out, seed, p, accumulate):
    n_rows, n_cols = x2.shape
    if n_rows:
        grid, block_r, block_c = grid_2d(n_rows, n_cols)
        wrap_triton(_dropout)[grid](
            x2,
            out,
            n_rows,
            n_cols,
            x2.stride(0),
            out.stride(0),
            _seed_tensor(seed, x2.device),
            p,
            1.0 / (1.0 - p),
            ACCUMULATE=accumulate,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            num_warps=4,
        )


def dropout(x: torch.Tensor, seed, p: float, out_dtype: torch.dtype) -> torch.Tensor:
    """drop(x) as a contiguous [rows, cols] tensor of `out_dtype` (x's last dim is cols); seed is
    an int or a one-element int64 tensor on x's device."""
    _check_p(p)
    x2 = rows_2d(x)
    if not (use_triton(x2) and x2.dtype in TL_DTYPE and out_dtype in TL_DTYPE):
        keep = torch_keep(x2.shape, seed, p, x2.device)
        return torch.where(keep, x2.float() * (1.0 / (1.0 - p)), 0.0).to(out_dtype)
    y = torch.empty(x2.shape, dtype=out_dtype, device=x2.device)
    _launch(x2, y, seed, p, False)
    return y


def dropout_add_(dx: torch.Tensor, g: torch.Tensor, seed, p: float) -> torch.Tensor:
    """dx += drop(g) in place, with the mask `dropout(·, seed, p)` used; both [rows, cols], dx contiguous."""
    _check_p(p)
    assert dx.is_contiguous() and dx.dim() == 2 and g.shape == dx.shape
    if not (use_triton(dx) and dx.dtype in TL_DTYPE and g.dtype in TL_DTYPE):
        keep = torch_keep(dx.shape, seed, p, dx.device)
        dx.copy_(dx.float() + torch.where(keep, g.float() * (1.0 / (1.0 - p)), 0.0))
        return dx
    _launch(rows_2d(g), dx, seed, p, True)
    return dx
