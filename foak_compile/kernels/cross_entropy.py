"""Cross-entropy over [rows, vocab] logits, and the chunked lm_head + cross-entropy.

Per row, with ε = label_smoothing, V = vocab and lse = logsumexp(x):
    loss = lse - (1-ε)·x[y] - ε/V·Σx         (torch's label smoothing; ε = 0: lse - x[y])
    dx   = scale · (softmax(x) - (1-ε)·onehot(y) - ε/V)
Rows whose label is ignore_index give loss 0 and gradient 0, and are never read.

The forward streams a row in BLOCK_V pieces with an online logsumexp, so any vocabulary fits
in registers; logits are read in their own dtype and all math is fp32. It keeps one fp32 lse
per row for the backward, which writes the gradient straight in the logits' dtype: no fp32
copy of the logits exists at any point.

The fused lm_head + loss never holds more than one chunk of rows × vocab logits: each token
chunk's logits come from a torch GEMM into a reused buffer, the kernels turn it into
loss/lse (forward) or, in place, into dlogits (backward, after recomputing the GEMM), and
further GEMMs take the hidden / weight gradients from it.

Labels outside [0, V) that are not ignore_index raise (asynchronously on CUDA, like torch's
own device assert); the kernel gives their rows a NaN loss and reads nothing out of bounds.
"""
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .common import TL_DTYPE, cast, use_triton

CHUNK_ELEMENTS = 1 << 27  # logits per chunk of the fused lm_head + loss: 256 MB in bf16


@triton.jit
def _ce_fwd(X, Y, LOSS, LSE, stride_x, n_cols, ignore_index, smooth, smooth_per_col,
            HAS_SMOOTH: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y = tl.load(Y + row)
    keep = y != ignore_index
    in_range = (y >= 0) & (y < n_cols)
    cols0 = tl.arange(0, BLOCK_V)
    limit = tl.where(keep, n_cols, 0)  # ignored rows load nothing
    m = float("-inf")   # running max
    d = 0.0             # running Σ exp(x - m)
    sx = 0.0            # running Σ x (label smoothing only)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + cols0
        mask = cols < limit
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # while every logit so far is -inf, rescale against 0 instead of -inf (no inf - inf)
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - base) + tl.sum(tl.exp(x - base), axis=0)
        m = m_new
        if HAS_SMOOTH:
            sx += tl.sum(tl.where(mask, x, 0.0), axis=0)
    # ignored rows: lse = 0 rather than log(0), so nothing downstream sees an inf
    lse = tl.where(keep, m, 0.0) + tl.log(tl.where(keep, d, 1.0))
    x_y = tl.load(x_row + y, mask=keep & in_range, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        loss = lse - (1.0 - smooth) * x_y - smooth_per_col * sx
    else:
        loss = lse - x_y
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(LOSS + row, tl.where(keep, loss, 0.0))
    tl.store(LSE + row, lse)


@triton.jit
def _ce_bwd(X, DX, Y, LSE, SCALE, stride_x, stride_dx, stride_scale, n_cols, ignore_index,
            smooth, smooth_per_col, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    dx_row = DX + row * stride_dx
    y = tl.load(Y + row)
    keep = y != ignore_index
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row * stride_scale)
    cols0 = tl.arange(0, BLOCK_V)
    limit = tl.where(keep, n_cols, 0)  # ignored rows load nothing
    for start in range(0, n_cols, BLOCK_V):
        cols = start + cols0
        in_row = cols < n_cols
        x = tl.load(x_row + cols, mask=cols < limit, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - smooth_per_col
        g = tl.where(cols == y, g - (1.0 - smooth), g) * scale
        g = tl.where(keep, g, 0.0)  # exact zeros, whatever lse/scale of an ignored row are
        tl.store(dx_row + cols, cast(g, DX.dtype.element_ty), mask=in_row)


def _block(t: torch.Tensor, n_cols: int, block_v: Optional[int]):
    if block_v is None:
        # GPU: 4096 keeps registers low at 8 warps; the interpreter runs faster on wide numpy blocks
        block_v = min(4096 if t.is_cuda else 16384, triton.next_power_of_2(n_cols))
    return block_v, (8 if block_v >= 2048 else 4)


def kernel_supported(x: torch.Tensor) -> bool:
    return use_triton(x) and x.dtype in TL_DTYPE


def check_labels(labels: torch.Tensor, n_cols: int, ignore_index: int) -> None:
    """Raise for a label outside [0, n_cols) that is not ignore_index; async (no sync) on CUDA."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= n_cols))
    torch._assert_async(~bad.any(), "foak cross_entropy: label out of range")


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _smooth(label_smoothing: float, n_cols: int):
    return float(label_smoothing), float(label_smoothing) / n_cols


# ---------------------------------------------------------------------------------------------
# Row kernels on a [rows, vocab] block; callers have checked the labels.

def _forward_rows(x, labels, ignore_index, label_smoothing, loss, lse, block_v=None):
    """Fill loss[r] and lse[r] (fp32) for the rows of x."""
    n_rows, n_cols = x.shape
    if n_rows == 0:
        return
    if not kernel_supported(x):
        loss.copy_(_torch_losses(x, labels, ignore_index, label_smoothing, lse))
        return
    block, warps = _block(x, n_cols, block_v)
    eps, eps_v = _smooth(label_smoothing, n_cols)
    _ce_fwd[(n_rows,)](x, labels, loss, lse, x.stride(0), n_cols, ignore_index, eps, eps_v,
                       HAS_SMOOTH=eps != 0.0, BLOCK_V=block, num_warps=warps)


def _backward_rows(x, labels, lse, scale, ignore_index, label_smoothing, out, block_v=None):
    """out = dloss/dx for the rows of x; `scale` holds one value per row or one for all.
    `out` may be `x` itself: each block is read before it is overwritten."""
    n_rows, n_cols = x.shape
    if n_rows == 0:
        return out
    if not kernel_supported(x):
        out.copy_(_torch_grad(x, labels, lse, scale, ignore_index, label_smoothing))
        return out
    block, warps = _block(x, n_cols, block_v)
    eps, eps_v = _smooth(label_smoothing, n_cols)
    _ce_bwd[(n_rows,)](x, out, labels, lse, scale, x.stride(0), out.stride(0),
                       1 if scale.numel() > 1 else 0, n_cols, ignore_index, eps, eps_v,
                       BLOCK_V=block, num_warps=warps)
    return out


# torch path: devices without Triton (CPU outside the interpreter) and dtypes the kernel lacks.
def _torch_losses(x, labels, ignore_index, label_smoothing, lse_out):
    xf = x.float()
    lse = torch.logsumexp(xf, -1)
    keep = labels != ignore_index
    lse_out.copy_(torch.where(keep, lse, 0.0))  # as the kernel stores it
    x_y = xf.gather(1, torch.where(keep, labels, 0).long()[:, None])[:, 0]
    loss = lse - (1 - label_smoothing) * x_y
    if label_smoothing:
        loss = loss - label_smoothing / x.shape[1] * xf.sum(-1)
    return torch.where(keep, loss, 0.0)


def _torch_grad(x, labels, lse, scale, ignore_index, label_smoothing):
    g = torch.exp(x.float() - lse[:, None]) - label_smoothing / x.shape[1]
    keep = labels != ignore_index
    rows = torch.arange(x.shape[0], device=x.device)[keep]
    g[rows, labels[keep].long()] -= 1 - label_smoothing
    g = g * scale.float()[:, None] if scale.numel() > 1 else g * scale.float()
    return torch.where(keep[:, None], g, 0.0).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Cross-entropy on materialised logits.

def cross_entropy_forward(x: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                          label_smoothing: float = 0.0, block_v: Optional[int] = None):
    """(loss, lse): fp32 per-row loss (0 where ignored) and logsumexp of [N, V] logits."""
    x = _rows(x)
    check_labels(labels, x.shape[1], ignore_index)
    loss = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    lse = torch.empty_like(loss)
    _forward_rows(x, labels.contiguous(), ignore_index, label_smoothing, loss, lse, block_v)
    return loss, lse


def cross_entropy_backward(x: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                           scale: torch.Tensor, ignore_index: int, label_smoothing: float = 0.0,
                           block_v: Optional[int] = None) -> torch.Tensor:
    """dloss/dx in x's dtype, where d(loss_r) = scale[r] (scale: fp32, [N] or [1])."""
    x = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return _backward_rows(x, labels.contiguous(), lse.contiguous(), scale.contiguous(),
                          ignore_index, label_smoothing, out, block_v)


# ---------------------------------------------------------------------------------------------
# lm_head + cross-entropy, chunked over tokens.

def chunk_rows(n_rows: int, n_cols: int, chunk_elements: Optional[int] = None) -> int:
    rows = max(1, (chunk_elements or CHUNK_ELEMENTS) // max(1, n_cols))
    if rows >= 256:
        rows -= rows % 128  # whole GEMM tiles
    return max(1, min(n_rows, rows))


def _chunks(n_rows: int, rows: int):
    return [(s, min(n_rows, s + rows)) for s in range(0, n_rows, rows)]


def _logits_into(out, h, weight, bias):
    """The lm_head's F.linear for a chunk of rows, into `out` (rounded to h's dtype as F.linear does)."""
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def linear_cross_entropy_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                 labels: torch.Tensor, ignore_index: int, label_smoothing: float = 0.0,
                                 chunk_elements: Optional[int] = None, block_v: Optional[int] = None):
    """(loss, lse) per row of cross_entropy(hidden @ weight.T + bias, labels); hidden is [N, H]."""
    n_rows, n_cols = hidden.shape[0], weight.shape[0]
    check_labels(labels, n_cols, ignore_index)
    labels = labels.contiguous()
    loss = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(loss)
    rows = chunk_rows(n_rows, n_cols, chunk_elements)
    buf = hidden.new_empty((rows, n_cols))
    for s, e in _chunks(n_rows, rows):
        logits = _logits_into(buf[: e - s], hidden[s:e], weight, bias)
        _forward_rows(logits, labels[s:e], ignore_index, label_smoothing, loss[s:e], lse[s:e], block_v)
    return loss, lse


@functools.lru_cache(maxsize=None)
def _fp32_addmm_ok(device: str, dtype: torch.dtype) -> bool:
    """Whether `torch.addmm(acc32, a, b, out_dtype=float32, out=acc32)` accumulates half-precision
    products straight into fp32 here (cuBLAS on recent torch; CPU and older torch refuse).
    Probed once on small matrices against the fp32 result, so a refusal or a wrong answer
    both fall back to the slab path."""
    def values(*shape):  # exact in half precision, and no draw from the user's RNG
        return (torch.arange(shape[0] * shape[1], device=device) % 13 - 6).reshape(shape) / 4

    try:
        a, b, acc = values(64, 40).to(dtype), values(48, 40).t().to(dtype), values(64, 48)
        want = acc + a.float() @ b.float()
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return bool(torch.allclose(acc, want, rtol=1e-4, atol=1e-3))
    except (RuntimeError, TypeError):
        return False


class _WeightGrad:
    """Σ over chunks of dlogitsᵀ·h. A single chunk is one GEMM written in the weight's dtype,
    exactly as eager; several accumulate in fp32: in the GEMM's epilogue where torch allows
    half inputs with an fp32 output, otherwise one GEMM per slab of vocab rows so the
    half-precision temporary stays small."""

    def __init__(self, weight: torch.Tensor, single: bool):
        self.dtype, self.single = weight.dtype, single
        if single:
            self.acc = torch.empty_like(weight)
        else:
            self.acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        self.slab = chunk_rows(weight.shape[0], weight.shape[1])

    def add(self, dlogits: torch.Tensor, h: torch.Tensor) -> None:
        if self.single:
            torch.mm(dlogits.t(), h, out=self.acc)
        elif self.dtype == torch.float32:
            self.acc.addmm_(dlogits.t(), h)
        elif _fp32_addmm_ok(str(self.acc.device), self.dtype):
            torch.addmm(self.acc, dlogits.t(), h, out_dtype=torch.float32, out=self.acc)
        else:
            for s, e in _chunks(self.acc.shape[0], self.slab):
                self.acc[s:e] += torch.mm(dlogits[:, s:e].t(), h)

    def result(self) -> torch.Tensor:
        return self.acc.to(self.dtype)


def linear_cross_entropy_backward(scale: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                  bias: Optional[torch.Tensor], labels: torch.Tensor, lse: torch.Tensor,
                                  ignore_index: int, label_smoothing: float, need_hidden: bool,
                                  need_weight: bool, need_bias: bool,
                                  chunk_elements: Optional[int] = None, block_v: Optional[int] = None):
    """(dhidden, dweight, dbias), each None unless needed, where d(loss_r) = scale[r]
    (fp32, [N] or [1]). Recomputes each chunk's logits rather than keep them from the forward."""
    n_rows, n_cols = hidden.shape[0], weight.shape[0]
    need_bias = need_bias and bias is not None
    labels, lse, scale = labels.contiguous(), lse.contiguous(), scale.contiguous()
    rows = chunk_rows(n_rows, n_cols, chunk_elements)
    chunks = _chunks(n_rows, rows)
    dh = torch.empty_like(hidden) if need_hidden else None
    dw = _WeightGrad(weight, len(chunks) <= 1) if need_weight else None
    db = torch.zeros(n_cols, dtype=torch.float32, device=hidden.device) if need_bias else None
    if need_weight and not chunks:
        dw.acc.zero_()
    buf = hidden.new_empty((rows, n_cols)) if (need_hidden or need_weight or need_bias) else None
    for s, e in chunks if buf is not None else []:
        h = hidden[s:e]
        dlogits = _logits_into(buf[: e - s], h, weight, bias)
        _backward_rows(dlogits, labels[s:e], lse[s:e], scale[s:e] if scale.numel() > 1 else scale,
                       ignore_index, label_smoothing, dlogits, block_v)
        if need_hidden:
            torch.mm(dlogits, weight, out=dh[s:e])
        if need_weight:
            dw.add(dlogits, h)
        if need_bias:
            db += dlogits.sum(0, dtype=torch.float32)
    return dh, (dw.result() if need_weight else None), (db.to(bias.dtype) if need_bias else None)
