"""LoRA dropout with a mask that is a function of (seed, element): the forward drops
x → drop(x), the backward regenerates the very same mask from the seed, so neither the
mask nor the dropped activations are saved.

    keep[i]  = rand(seed, i) >= p          (P(keep) = 1 − p, i = row · n_cols + col)
    drop(x)  = keep ? x · 1/(1−p) : 0      (fp32 math, one rounding)

`dropout_add_` applies the same mask to a gradient and adds it to another one in place:
dx += drop(g), the adapter's share of dX. The torch path (devices without Triton) draws its
mask from a torch.Generator seeded the same way: a different mask than the kernel's, but the
same one in forward and backward, which is all autograd needs.
"""
import torch
import triton
import triton.language as tl

from .common import TL_DTYPE, cast, use_triton


@triton.jit
def _keep(seed, rows, cols, n_cols, p):
    idx = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    return tl.rand(seed, idx) >= p


@triton.jit
def _dropout(X, Y, n_rows, n_cols, stride_x, stride_y, seed, p, scale,
             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.where(_keep(seed, rows, cols, n_cols, p), x * scale, 0.0)
    tl.store(Y + r64 * stride_y + cols[None, :], cast(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _dropout_add(DX, G, n_rows, n_cols, stride_dx, stride_g, seed, p, scale,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    g = tl.load(G + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dx = tl.load(DX + r64 * stride_dx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dx += tl.where(_keep(seed, rows, cols, n_cols, p), g * scale, 0.0)
    tl.store(DX + r64 * stride_dx + cols[None, :], cast(dx, DX.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _grid(n_rows: int, n_cols: int):
    block_c = min(1024, triton.next_power_of_2(max(n_cols, 16)))
    block_r = max(1, 4096 // block_c)
    return (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c)), block_r, block_c


def _check_p(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), not {p}")


def torch_keep(shape, seed: int, p: float, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=g, device=device) >= p


def dropout(x: torch.Tensor, seed: int, p: float, out_dtype: torch.dtype) -> torch.Tensor:
    """drop(x) as a contiguous [rows, cols] tensor of `out_dtype` (x's last dim is cols)."""
    _check_p(p)
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    if not (use_triton(x2) and x2.dtype in TL_DTYPE and out_dtype in TL_DTYPE):
        keep = torch_keep((n_rows, n_cols), seed, p, x2.device)
        return torch.where(keep, x2.float() * (1.0 / (1.0 - p)), 0.0).to(out_dtype)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x2.device)
    if n_rows:
        grid, block_r, block_c = _grid(n_rows, n_cols)
        _dropout[grid](x2, y, n_rows, n_cols, x2.stride(0), y.stride(0), seed, p, 1.0 / (1.0 - p),
                       BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return y


def dropout_add_(dx: torch.Tensor, g: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """dx += drop(g) in place, with the mask `dropout(·, seed, p)` used; both [rows, cols], dx contiguous."""
    _check_p(p)
    assert dx.is_contiguous() and dx.dim() == 2 and g.shape == dx.shape
    n_rows, n_cols = dx.shape
    if not (use_triton(dx) and dx.dtype in TL_DTYPE and g.dtype in TL_DTYPE):
        keep = torch_keep((n_rows, n_cols), seed, p, dx.device)
        dx.copy_(dx.float() + torch.where(keep, g.float() * (1.0 / (1.0 - p)), 0.0))
        return dx
    g2 = _rows(g)
    if n_rows:
        grid, block_r, block_c = _grid(n_rows, n_cols)
        _dropout_add[grid](dx, g2, n_rows, n_cols, dx.stride(0), g2.stride(0), seed, p, 1.0 / (1.0 - p),
                           BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return dx
