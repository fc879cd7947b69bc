"""LoRA dropout with a mask that is a function of (seed, element): the forward drops
x → drop(x), the backward regenerates the very same mask from the seed, so neither the
mask nor the dropped activations are saved.

    keep[i]  = rand(seed, i) >= p          (P(keep) = 1 − p, i = row · n_cols + col)
    drop(x)  = keep ? x · 1/(1−p) : 0      (fp32 math, one rounding)

`dropout_add_` applies the same mask to a gradient and adds it to another one in place:
dx += drop(g), the adapter's share of dX. The torch path (devices without Triton) draws its
mask from a hash of (seed, index) in torch ops: a different mask than the kernel's, but the
same one in forward and backward, which is all autograd needs.
"""
import torch
import triton
import triton.language as tl

from .common import TL_DTYPE, cast, grid_2d, rows_2d, use_triton, wrap_triton


@triton.jit
def _keep(seed, rows, cols, n_cols, p):
    idx = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    return tl.rand(seed, idx) >= p


@triton.jit
def _dropout(X, OUT, n_rows, n_cols, stride_x, stride_out, SEED, p, scale,
             ACCUMULATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
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
        wrap_triton(_dropout)[grid](x2, out, n_rows, n_cols, x2.stride(0), out.stride(0),
                                    _seed_tensor(seed, x2.device), p, 1.0 / (1.0 - p), ACCUMULATE=accumulate,
                                    BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)


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
