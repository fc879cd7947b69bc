"""RMSNorm forward and backward.

y = round_out( w * round_mid( x * rsqrt(mean(x^2) + eps) ) ), all math in fp32.
`mid` reproduces models that cast the normalised value back to the input dtype before the
weight multiply (HF Llama); without it the product is rounded once (Gemma, F.rms_norm).

Rows are processed in [BLOCK_R, BLOCK_H] tiles with the whole row in registers, so small
hidden sizes (Qwen3's q/k norm over head_dim) still give each program enough work. The
backward recomputes rstd from the row it loads anyway, so the forward saves nothing but x.
dW is reduced per persistent program into an fp32 [programs, H] buffer and summed once.
"""

import torch
import triton
import triton.language as tl

from .common import TL_DTYPE, cast, persistent_programs, use_triton, wrap_triton

MAX_BLOCK_H = 32768  # whole row in registers; longer rows take the torch path
PER_SM = 1  # persistent backward programs per SM when dW is reduced (rows >= 1024)
STAGES = 3  # software pipelining of that persistent loop


@triton.jit
def _rms_norm_fwd(
    X,
    W,
    Y,
    n_rows,
    n_cols,
    stride_x,
    stride_y,
    eps,
    HAS_W: tl.constexpr,
    HAS_MID: tl.constexpr,
    MID: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < n_cols
    mask = (rows < n_rows)[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    y = x * rstd[:, None]
    if HAS_MID:
        y = cast(y, MID).to(tl.float32)
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], cast(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd(
    DY,
    X,
    W,
    DX,
    DW_PART,
    n_rows,
    n_cols,
    stride_dy,
    stride_x,
    stride_dx,
    eps,
    HAS_W: tl.constexpr,
    HAS_MID: tl.constexpr,
    MID: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_DW: tl.constexpr,
    STAGES: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < n_cols
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    # pipelined: the next tile's loads are in flight while this one reduces
    for blk in tl.range(pid, tl.cdiv(n_rows, BLOCK_R), tl.num_programs(0), num_stages=STAGES):
        rows = blk * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (rows < n_rows)[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # rows past the end: rstd 0, not rsqrt(eps), which is inf for eps = 0 and would put
        # 0 * inf = NaN into the dW column sums
        rstd = tl.where(rows < n_rows, tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps), 0.0)
        n = x * rstd[:, None]
        if HAS_W:
            g = dy * w[None, :]
            if NEED_DW:
                n_w = n
                if HAS_MID:
                    n_w = cast(n, MID).to(tl.float32)
                dw_acc += tl.sum(dy * n_w, axis=0)
        else:
            g = dy
        if NEED_DX:
            # d/dx [x * rstd] applied to g: rstd * (g - n * mean(g * n))
            dot = tl.sum(g * n, axis=1) / n_cols
            dx = (g - n * dot[:, None]) * rstd[:, None]
            tl.store(DX + rows64 * stride_dx + cols[None, :], cast(dx, DX.dtype.element_ty), mask=mask)
    if NEED_DW:
        tl.store(DW_PART + pid * n_cols + cols, dw_acc, mask=cmask)


def _tile(n_cols: int, rows_per_tile: int = 4096):
    """(BLOCK_R, BLOCK_H, num_warps): ~4k elements a program, 4 warps; the best of the tile sweep
    (`python -m benchmarks.suite rms-norm -- --sweep`, docs/results.md)."""
    block_h = triton.next_power_of_2(n_cols)
    block_r = max(1, min(64, rows_per_tile // block_h))
    num_warps = max(4, min(16, block_r * block_h // 1024))
    return block_r, block_h, num_warps


def _dw_tile(n_cols: int):
    """The dW backward amortises its column reduction over taller tiles."""
    return _tile(n_cols, 8192 if n_cols >= 1024 else 4096)


def _dw_schedule(n_cols: int):
    """(programs per SM, pipeline stages) of the persistent dW backward, from the same sweep:
    long rows want one deeply pipelined program per SM, short rows more programs."""
    return (PER_SM, STAGES) if n_cols >= 1024 else (4, 2)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.reshape(-1, t.shape[-1])


def kernel_supported(x: torch.Tensor) -> bool:
    return use_triton(x) and x.dtype in TL_DTYPE and triton.next_power_of_2(x.shape[-1]) <= MAX_BLOCK_H


def rms_norm_forward(x, weight, eps: float, mid_dtype, out_dtype):
    if not kernel_supported(x) or x.numel() == 0:  # empty: nothing to launch (and no [-1, 0] reshape)
        return rms_norm_torch(x, weight, eps, mid_dtype, out_dtype)
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    w = weight.contiguous() if weight is not None else x2
    block_r, block_h, num_warps = _tile(n_cols)
    wrap_triton(_rms_norm_fwd)[(triton.cdiv(n_rows, block_r),)](
        x2,
        w,
        y,
        n_rows,
        n_cols,
        x2.stride(0),
        y.stride(0),
        eps,
        HAS_W=weight is not None,
        HAS_MID=mid_dtype is not None,
        MID=TL_DTYPE.get(mid_dtype, tl.float32),
        BLOCK_R=block_r,
        BLOCK_H=block_h,
        num_warps=num_warps,
    )
    return y.view(x.shape)


def rms_norm_backward(dy, x, weight, eps: float, mid_dtype, need_dx: bool, need_dw: bool):
    """Returns (dx or None, dw or None); dw in the weight's dtype."""
    if not kernel_supported(x) or x.numel() == 0:  # empty: dw is zeros, not an unwritten partial
        return rms_norm_torch_backward(dy, x, weight, eps, mid_dtype, need_dx, need_dw)
    need_dw = need_dw and weight is not None
    x2, dy2 = _rows(x), _rows(dy)
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device) if need_dx else None
    block_r, block_h, num_warps = _dw_tile(n_cols) if need_dw else _tile(n_cols)
    n_blocks = triton.cdiv(n_rows, block_r)
    # Only a dW reduction needs persistent programs (one fp32 partial row each); LoRA's frozen
    # norms take one tile per program.
    per_sm, stages = _dw_schedule(n_cols)
    programs = persistent_programs(x, n_blocks, per_sm) if need_dw else n_blocks
    dw_part = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device) if need_dw else None
    w = weight.contiguous() if weight is not None else x2
    wrap_triton(_rms_norm_bwd)[(programs,)](
        dy2,
        x2,
        w,
        dx if need_dx else x2,
        dw_part if need_dw else x2,
        n_rows,
        n_cols,
        dy2.stride(0),
        x2.stride(0),
        n_cols,
        eps,
        HAS_W=weight is not None,
        HAS_MID=mid_dtype is not None,
        MID=TL_DTYPE.get(mid_dtype, tl.float32),
        NEED_DX=need_dx,
        NEED_DW=need_dw,
        STAGES=stages if need_dw else 1,
        BLOCK_R=block_r,
        BLOCK_H=block_h,
        num_warps=num_warps,
    )
    dw = dw_part.sum(0).to(weight.dtype) if need_dw else None
    return (dx.view(x.shape) if need_dx else None), dw


# torch path: devices without Triton (CPU outside the interpreter) and rows too long for one tile.
def _normalize(x, eps):
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm_torch(x, weight, eps, mid_dtype, out_dtype):
    y = _normalize(x, eps)
    if mid_dtype is not None:
        y = y.to(mid_dtype).float()
    if weight is not None:
        y = y * weight.float()
    return y.to(out_dtype).contiguous()  # same strides as the kernel's output and the fake


def rms_norm_torch_backward(dy, x, weight, eps, mid_dtype, need_dx, need_dw):
    """The kernel's formulas in torch ops (no autograd: this runs below the autograd key)."""
    xf, dyf = x.float(), dy.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    n = xf * rstd
    dx = dw = None
    if need_dw and weight is not None:
        n_w = n.to(mid_dtype).float() if mid_dtype is not None else n
        # no reshape(-1, H): it fails for H == 0; an empty x gives zeros like autograd
        dw = (dyf * n_w).reshape(x.numel() // max(1, x.shape[-1]), x.shape[-1]).sum(0).to(weight.dtype)
    if need_dx:
        g = dyf * weight.float() if weight is not None else dyf
        dx = ((g - n * (g * n).mean(-1, keepdim=True)) * rstd).to(x.dtype).contiguous()
    return dx, dw
