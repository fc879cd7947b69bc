"""The SwiGLU product h = silu(g) * u and its gradients, for the fused down-projection (ops/lora_swiglu.py).

Forward, rounded as eager rounds it: silu in fp32 then to g's dtype (F.silu), the product of two
tensors of that dtype in fp32 then to it again (the mul):

    s = round(g / (1 + exp(-g)))      h = round(s · u)

so h is eager's bit for bit where the exponential is (on a GPU: libdevice's expf and an IEEE division,
as CUDA's silu; the interpreter's numpy exp can differ from torch's in the last fp32 bit).

Backward, from dh (in g's dtype), all fp32 and each gradient rounded once:

    sig = 1 / (1 + exp(-g))     du = dh · s    (s rounded, as the mul's gradient sees it)
    dg = dh · u · sig · (1 + g · (1 − sig))    (eager rounds dh · u first; one rounding is closer)

Tensors are [rows, cols] with any row stride, so the halves of a split (4-bit siblings) need no copy.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

try:
    from triton.language.extra import libdevice
except ImportError:  # an older Triton without the backend-dispatching module
    from triton.language.extra.cuda import libdevice

from .common import INTERPRET, TL_DTYPE, cast, grid_2d, rows_2d, use_triton, wrap_triton

# libdevice is not available to the interpreter; there tl.exp (numpy) stands in
_LIBDEVICE_EXP = tl.constexpr(not INTERPRET)


@triton.jit
def _exp_neg(g):
    if _LIBDEVICE_EXP:
        e = libdevice.exp(-g)
    else:
        e = tl.exp(-g)
    return e


@triton.jit
def _swiglu_fwd(G, U, H, n_rows, n_cols, stride_g, stride_u, stride_h, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    g = tl.load(G + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + r64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dt = H.dtype.element_ty
    s = cast(tl.div_rn(g, 1.0 + _exp_neg(g)), dt).to(tl.float32)
    tl.store(H + r64 * stride_h + cols[None, :], cast(s * u, dt), mask=mask)


@triton.jit
def _swiglu_bwd(
    DH,
    G,
    U,
    DG,
    DU,
    n_rows,
    n_cols,
    stride_dh,
    stride_g,
    stride_u,
    stride_dg,
    stride_du,
    NEED_G: tl.constexpr,
    NEED_U: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    dh = tl.load(DH + r64 * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    denominator = 1.0 + _exp_neg(g)
    if NEED_U:
        s = cast(tl.div_rn(g, denominator), G.dtype.element_ty).to(tl.float32)
        tl.store(DU + r64 * stride_du + cols[None, :], cast(dh * s, DU.dtype.element_ty), mask=mask)
    if NEED_G:
        u = tl.load(U + r64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = tl.div_rn(1.0, denominator)
        dg = dh * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(DG + r64 * stride_dg + cols[None, :], cast(dg, DG.dtype.element_ty), mask=mask)


def _kernel_ok(g: torch.Tensor) -> bool:
    return use_triton(g) and g.dtype in TL_DTYPE and g.numel() > 0


def swiglu(g: torch.Tensor, u: torch.Tensor, recompute: bool = False) -> torch.Tensor:
    """silu(g) * u, contiguous, of g's dtype; g and u of one shape and dtype. recompute: backward's
    second computation, which a traced graph's CSE must not merge with the forward's (that would keep h
    alive for backward after all): the kernel writes a fresh torch.empty buffer, which CSE leaves alone;
    the torch path multiplies in the other order (the same bits)."""
    if not _kernel_ok(g):
        return (u * F.silu(g) if recompute else F.silu(g) * u).contiguous()
    g2, u2 = rows_2d(g), rows_2d(u)
    n_rows, n_cols = g2.shape
    h = torch.empty((n_rows, n_cols), dtype=g.dtype, device=g.device)
    grid, block_r, block_c = grid_2d(n_rows, n_cols)
    wrap_triton(_swiglu_fwd)[grid](
        g2,
        u2,
        h,
        n_rows,
        n_cols,
        g2.stride(0),
        u2.stride(0),
        h.stride(0),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=4,
    )
    return h.view(g.shape)


def swiglu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, need_g: bool, need_u: bool):
    """(dg, du) of h = silu(g) * u; one that is not needed comes back empty."""
    if not _kernel_ok(g):
        return _torch_backward(dh, g, u, need_g, need_u)
    dh2, g2, u2 = rows_2d(dh), rows_2d(g), rows_2d(u)
    n_rows, n_cols = g2.shape
    dg = torch.empty((n_rows, n_cols), dtype=g.dtype, device=g.device) if need_g else g.new_empty(0)
    du = torch.empty((n_rows, n_cols), dtype=u.dtype, device=u.device) if need_u else u.new_empty(0)
    if need_g or need_u:
        grid, block_r, block_c = grid_2d(n_rows, n_cols)
        wrap_triton(_swiglu_bwd)[grid](
            dh2,
            g2,
            u2,
            dg if need_g else g2,
            du if need_u else u2,
            n_rows,
            n_cols,
            dh2.stride(0),
            g2.stride(0),
            u2.stride(0),
            n_cols,
            n_cols,
            NEED_G=need_g,
            NEED_U=need_u,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            num_warps=4,
        )
    return (dg.view(g.shape) if need_g else dg), (du.view(u.shape) if need_u else du)


def _torch_backward(dh, g, u, need_g, need_u):
    """The kernel's formulas in torch ops (devices without Triton, float64, empty tensors)."""
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    dhf, gf = dh.to(acc), g.to(acc)
    sig = torch.sigmoid(gf)
    dg = (dhf * u.to(acc) * sig * (1 + gf * (1 - sig))).to(g.dtype) if need_g else g.new_empty(0)
    du = (dhf * F.silu(g).to(acc)).to(u.dtype) if need_u else u.new_empty(0)
    return dg.contiguous(), du.contiguous()
