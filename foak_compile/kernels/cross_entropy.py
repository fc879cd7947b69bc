"""Cross-entropy over [rows, vocab] logits, and the chunked lm_head + cross-entropy.

Per row, with ε = label_smoothing, V = vocab and lse = logsumexp(x):
    loss = lse - (1-ε)·x[y] - ε/V·Σx         (torch's label smoothing; ε = 0: lse - x[y])
    dx   = scale · (softmax(x) - (1-ε)·onehot(y) - ε/V)
Rows whose label is ignore_index give loss 0 and gradient 0, and are never read.

The forward streams a row in BLOCK_V pieces with an online logsumexp kept per lane (one
cross-lane reduction per row, one exp per logit), so any vocabulary fits in registers; logits
are read in their own dtype and all math is fp32. Given the gradient's scale it goes on to
write dx over the logits in the same launch; otherwise it keeps one fp32 lse per row for a
later backward. No fp32 copy of the logits exists at any point.

The fused lm_head + loss never holds more than one chunk of rows × vocab logits, in a reused
buffer filled by a torch GEMM. When the loss is reduced to a scalar (mean/sum) and gradients
are wanted, the forward takes them too, chunk by chunk: logits GEMM → the kernel turns the
buffer into dlogits in place → dh_chunk = dlogits·W and dW += dlogitsᵀ·h (in the weight's
dtype, beta=1, one GEMM per chunk): three GEMMs, as eager, and no recompute; the backward
only multiplies by the upstream scalar. Otherwise (no gradient, or reduction 'none' whose
per-row upstream gradient is unknown in the forward) the forward keeps lse and the backward
recomputes each chunk's logits (four GEMMs).

Rows whose label is ignore_index are dropped before the GEMMs: their loss and gradient are zero,
so the GEMMs only run over the tokens that count. On CUDA that costs one host sync for their
count, so it is done only when the previous call ignored ≥ 10 % of its rows (prompt-masked SFT;
a pretraining-style batch ignores one token per sequence) and never while a graph is captured.

The lm_head + loss ops also apply what a model does to its logits between lm_head and loss (an
`Epilogue`: Granite's z/s, Cohere's z·s, Gemma 2's softcap c·tanh(z/c)) to each logit as the kernels
read it, rounding each step to the logits' dtype where the model computed it in that dtype, and
multiply the gradient by its derivative: the capped logits never exist either.

Labels outside [0, V) that are not ignore_index raise (asynchronously on CUDA, like torch's
own device assert); the kernel gives their rows a NaN loss and reads nothing out of bounds.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import cross_entropy_online as online_path
from .ce_epilogue import NO_EPILOGUE, Epilogue, _epilogue
from .common import TL_DTYPE, cast, use_triton


@triton.jit
def _ce_fwd(
    X,
    Y,
    LOSS,
    LSE,
    SCALE,
    stride_x,
    n_rows,
    n_cols,
    ignore_index,
    smooth,
    smooth_per_col,
    mul,
    div,
    cap,
    cdiv,
    EPI: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """loss and lse of rows pid, pid + grid, ...; with WRITE_GRAD also dx (scaled by SCALE[0])
    written over each row. A smaller grid than n_rows keeps fewer rows in flight, so that the
    gradient pass finds its row still in L2."""
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):  # int64: row * stride
        _ce_fwd_row(
            X + row * stride_x,
            Y + row,
            LOSS + row,
            LSE + row,
            SCALE,
            n_cols,
            ignore_index,
            smooth,
            smooth_per_col,
            mul,
            div,
            cap,
            cdiv,
            EPI,
            HAS_SMOOTH,
            WRITE_GRAD,
            BLOCK_V,
        )


@triton.jit
def _ce_fwd_row(
    x_row,
    Y,
    LOSS,
    LSE,
    SCALE,
    n_cols,
    ignore_index,
    smooth,
    smooth_per_col,
    mul,
    div,
    cap,
    cdiv,
    EPI: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    y = tl.load(Y)
    keep = y != ignore_index
    in_range = (y >= 0) & (y < n_cols)
    cols0 = tl.arange(0, BLOCK_V)
    limit = tl.where(keep, n_cols, 0)  # ignored rows load nothing
    # Per-lane running max m and Σ exp(x - m): no cross-warp reduction inside the loop. The
    # new max is m or x, so one of the two rescale factors is exp(0): one exp per logit.
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK_V], tl.float32)
    sx = tl.zeros([BLOCK_V], tl.float32)  # Σ x (label smoothing only)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + cols0
        mask = cols < limit
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if EPI != 0:
            x = tl.where(mask, _epilogue(x, mul, div, cap, cdiv, EPI, x_row.dtype.element_ty)[0], float("-inf"))
        hi = tl.maximum(m, x, propagate_nan=tl.PropagateNan.ALL)
        lo = tl.minimum(m, x, propagate_nan=tl.PropagateNan.ALL)
        # while a lane has seen only -inf, measure against 0 instead (no -inf - -inf)
        t = tl.exp(lo - tl.where(hi == float("-inf"), 0.0, hi))
        d = tl.where(x > m, d * t + 1.0, d + t)
        m = hi
        if HAS_SMOOTH:
            sx += tl.where(mask, x, 0.0)
    m_row = tl.max(m, axis=0)
    base = tl.where(m_row == float("-inf"), 0.0, m_row)
    d_row = tl.sum(d * tl.exp(m - base), axis=0)
    # ignored rows: lse = 0 rather than log(0), so nothing downstream sees an inf
    lse = tl.where(keep, base, 0.0) + tl.log(tl.where(keep, d_row, 1.0))
    x_y = tl.load(x_row + y, mask=keep & in_range, other=0.0).to(tl.float32)
    if EPI != 0:
        x_y = _epilogue(x_y, mul, div, cap, cdiv, EPI, x_row.dtype.element_ty)[0]
    if HAS_SMOOTH:
        loss = lse - (1.0 - smooth) * x_y - smooth_per_col * tl.sum(sx, axis=0)
    else:
        loss = lse - x_y
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(LOSS, tl.where(keep, loss, 0.0))
    tl.store(LSE, lse)
    if WRITE_GRAD:
        scale = tl.load(SCALE)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + cols0
            x = tl.load(x_row + cols, mask=cols < limit, other=0.0).to(tl.float32)
            g = _grad(x, y, cols, lse, scale, smooth, smooth_per_col, mul, div, cap, cdiv, EPI, x_row.dtype.element_ty)
            g = tl.where(keep, g, 0.0)  # ignored rows: zeros, which the GEMMs then read
            tl.store(x_row + cols, cast(g, x_row.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def _grad(x, y, cols, lse, scale, smooth, smooth_per_col, mul, div, cap, cdiv, EPI: tl.constexpr, DTYPE: tl.constexpr):
    """dloss/dx for a block of raw logits x of one row (through the epilogue when there is one)."""
    if EPI != 0:
        v, dv = _epilogue(x, mul, div, cap, cdiv, EPI, DTYPE)
    else:
        v = x
    g = tl.exp(v - lse) - smooth_per_col
    g = tl.where(cols == y, g - (1.0 - smooth), g) * scale
    if EPI != 0:
        g = g * dv
    return g


@triton.jit
def _ce_bwd(
    X,
    DX,
    Y,
    LSE,
    SCALE,
    stride_x,
    stride_dx,
    stride_scale,
    n_cols,
    ignore_index,
    smooth,
    smooth_per_col,
    mul,
    div,
    cap,
    cdiv,
    EPI: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
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
        g = _grad(x, y, cols, lse, scale, smooth, smooth_per_col, mul, div, cap, cdiv, EPI, X.dtype.element_ty)
        g = tl.where(keep, g, 0.0)  # exact zeros, whatever lse/scale of an ignored row are
        tl.store(dx_row + cols, cast(g, DX.dtype.element_ty), mask=in_row)


def _block(t: torch.Tensor, n_cols: int, block_v: Optional[int]):
    """(BLOCK_V, num_warps) of the backward kernel."""
    if block_v is None:
        # GPU: 4096 keeps registers low at 8 warps; the interpreter runs faster on wide numpy blocks
        block_v = min(4096 if t.is_cuda else 16384, triton.next_power_of_2(n_cols))
    return block_v, (8 if block_v >= 2048 else 4)


def _fwd_block(t: torch.Tensor, n_cols: int, block_v: Optional[int]):
    """(BLOCK_V, num_warps) of the forward kernel. The sweep (benchmarks.suite cross-entropy -- --sweep) on 512-1024 rows of
    128k-256k bf16 logits: 2048 × 16 warps reaches 85-90% of the copy bandwidth with the gradient
    pass; 4096 × 8 warps, 55-70%."""
    if block_v is None:
        block_v = min(2048 if t.is_cuda else 16384, triton.next_power_of_2(n_cols))
    return block_v, (16 if block_v >= 2048 else 4)


def kernel_supported(x: torch.Tensor) -> bool:
    return use_triton(x) and x.dtype in TL_DTYPE


class LabelOutOfRange(IndexError, RuntimeError):
    """A label outside [0, vocab) that is not ignore_index. An IndexError like torch's own on CPU
    ("Target 7 is out of bounds."), and a RuntimeError like the device assert on CUDA."""


def check_labels(labels: torch.Tensor, n_cols: int, ignore_index: int) -> None:
    """Raise for a label outside [0, n_cols) that is not ignore_index; async (no sync) on CUDA."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= n_cols))
    if labels.device.type == "cpu":  # the check costs no sync here: raise torch's error class
        if bad.any():
            target = labels[bad][0].item()
            raise LabelOutOfRange(
                f"foak cross_entropy: label out of range: Target {target} is out of bounds "
                f"(vocab {n_cols}, ignore_index {ignore_index})"
            )
        return
    torch._assert_async(~bad.any(), "foak cross_entropy: label out of range")


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _smooth(label_smoothing: float, n_cols: int):
    return float(label_smoothing), float(label_smoothing) / n_cols


# ---------------------------------------------------------------------------------------------
# Row kernels on a [rows, vocab] block; callers have checked the labels.


def _forward_rows(
    x,
    labels,
    ignore_index,
    label_smoothing,
    loss,
    lse,
    block_v=None,
    grad_scale=None,
    num_warps=None,
    programs=None,
    epi=NO_EPILOGUE,
):
    """Fill loss[r] and lse[r] (fp32) for the rows of x (through `epi`); given `grad_scale` (fp32
    [1]), also overwrite x with dloss/dx where d(loss_r) = grad_scale for every row. `programs`:
    the grid (default one program per row)."""
    n_rows, n_cols = x.shape
    if x.numel() == 0:  # no rows, or no classes (then every row is ignored: check_labels raised otherwise)
        loss.zero_()
        lse.zero_()
        return
    if not kernel_supported(x):
        loss.copy_(_torch_losses(x, labels, ignore_index, label_smoothing, lse, epi))
        if grad_scale is not None:
            x.copy_(_torch_grad(x, labels, lse, grad_scale, ignore_index, label_smoothing, epi))
        return
    block, warps = _fwd_block(x, n_cols, block_v)
    eps, eps_v = _smooth(label_smoothing, n_cols)
    write = grad_scale is not None
    warps = num_warps or warps
    grid = min(n_rows, programs or n_rows)
    _ce_fwd[(grid,)](
        x,
        labels,
        loss,
        lse,
        grad_scale if write else lse,
        x.stride(0),
        n_rows,
        n_cols,
        ignore_index,
        eps,
        eps_v,
        *epi.kernel_args(x),
        EPI=epi.flags(x),
        HAS_SMOOTH=eps != 0.0,
        WRITE_GRAD=write,
        BLOCK_V=block,
        num_warps=warps,
    )


def _backward_rows(x, labels, lse, scale, ignore_index, label_smoothing, out, block_v=None, epi=NO_EPILOGUE):
    """out = dloss/dx for the rows of x; `scale` holds one value per row or one for all.
    `out` may be `x` itself: each block is read before it is overwritten."""
    n_rows, n_cols = x.shape
    if x.numel() == 0:
        return out
    if not kernel_supported(x):
        out.copy_(_torch_grad(x, labels, lse, scale, ignore_index, label_smoothing, epi))
        return out
    block, warps = _block(x, n_cols, block_v)
    eps, eps_v = _smooth(label_smoothing, n_cols)
    _ce_bwd[(n_rows,)](
        x,
        out,
        labels,
        lse,
        scale,
        x.stride(0),
        out.stride(0),
        1 if scale.numel() > 1 else 0,
        n_cols,
        ignore_index,
        eps,
        eps_v,
        *epi.kernel_args(x),
        EPI=epi.flags(x),
        BLOCK_V=block,
        num_warps=warps,
    )
    return out


# torch path: devices without Triton (CPU outside the interpreter) and dtypes the kernel lacks.
def _torch_epilogue(x, epi):
    """(fp32 logits after the epilogue, dv/dx or None), rounded as the kernels round them."""
    dtype = x.dtype if epi.rounded else torch.float32
    v, d = x.float(), None
    if epi.scale != 1.0:
        v, d = (v * epi.scale).to(dtype).float(), epi.scale
    if epi.divisor != 1.0:
        v, d = (v / epi.divisor).to(dtype).float(), (1.0 if d is None else d) / epi.divisor
    if epi.softcap:
        t = torch.tanh((v / epi.softcap).to(dtype).float()).to(dtype).float()
        v, d = (t * epi.softcap).to(dtype).float(), (1.0 if d is None else d) * (1 - t * t)
    return v, d


def _torch_losses(x, labels, ignore_index, label_smoothing, lse_out, epi=NO_EPILOGUE):
    xf = _torch_epilogue(x, epi)[0]
    lse = torch.logsumexp(xf, -1)
    keep = labels != ignore_index
    lse_out.copy_(torch.where(keep, lse, 0.0))  # as the kernel stores it
    x_y = xf.gather(1, torch.where(keep, labels, 0).long()[:, None])[:, 0]
    loss = lse - (1 - label_smoothing) * x_y
    if label_smoothing:
        loss = loss - label_smoothing / x.shape[1] * xf.sum(-1)
    return torch.where(keep, loss, 0.0)


def _torch_grad(x, labels, lse, scale, ignore_index, label_smoothing, epi=NO_EPILOGUE):
    v, dv = _torch_epilogue(x, epi)
    g = torch.exp(v - lse[:, None]) - label_smoothing / x.shape[1]
    keep = labels != ignore_index
    rows = torch.arange(x.shape[0], device=x.device)[keep]
    g[rows, labels[keep].long()] -= 1 - label_smoothing
    g = g * scale.float()[:, None] if scale.numel() > 1 else g * scale.float()
    if dv is not None:
        g = g * dv
    return torch.where(keep[:, None], g, 0.0).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Cross-entropy on materialised logits.


def cross_entropy_forward(
    x: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float = 0.0,
    block_v: Optional[int] = None,
):
    """(loss, lse): fp32 per-row loss (0 where ignored) and logsumexp of [N, V] logits."""
    x = _rows(x)
    check_labels(labels, x.shape[1], ignore_index)
    loss = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    lse = torch.empty_like(loss)
    _forward_rows(x, labels.contiguous(), ignore_index, label_smoothing, loss, lse, block_v)
    return loss, lse


def cross_entropy_backward(
    x: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    label_smoothing: float = 0.0,
    block_v: Optional[int] = None,
) -> torch.Tensor:
    """dloss/dx in x's dtype, where d(loss_r) = scale[r] (scale: fp32, [N] or [1])."""
    x = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return _backward_rows(
        x, labels.contiguous(), lse.contiguous(), scale.contiguous(), ignore_index, label_smoothing, out, block_v
    )


# ---------------------------------------------------------------------------------------------
# lm_head + cross-entropy, chunked over tokens.

# Rows per chunk of the fused lm_head + loss. The chunk (rows × vocab logits) is the only memory
# beyond the gradients themselves. By default it holds at most as many values as the hidden
# states (so as much as dh, which exists anyway), in a power of two of rows, but no fewer than
# CHUNK_ROWS_MIN: the rows are the GEMMs' M (logits, dh) and K (dW += dlogitsᵀ·h), and below
# ~512 the dW GEMM, which reads and writes all of dW per chunk, turns memory-bound (the sweep,
# weight trained: 256 rows take 1.45-1.6× the time of 1024 rows, 512 rows 1.05-1.15×, 2048 rows
# 0.83-0.99×). On the benchmark's shapes this gives 512 rows: Liger's memory where its own chunk
# is 512 rows; where Liger's is smaller (few tokens) its peak is not met, to keep the GEMMs fast.
CHUNK_ROWS_MIN, CHUNK_ROWS_MAX = 512, 4096
CHUNK_ELEMENTS: Optional[int] = None  # a fixed number of logits per chunk instead (tests, sweeps)
# Drop ignored rows before the GEMMs (tests turn it off to exercise the kernel's zero rows).
COMPACT = True


def chunk_rows(n_rows: int, n_cols: int, n_hidden: int, chunk_elements: Optional[int] = None) -> int:
    budget = chunk_elements or CHUNK_ELEMENTS
    if budget is None:
        rows = 1 << max(0, (n_rows * n_hidden // max(1, n_cols)).bit_length() - 1)
        rows = min(CHUNK_ROWS_MAX, max(CHUNK_ROWS_MIN, rows))
    else:
        rows = max(1, budget // max(1, n_cols))
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


class _IgnoredFraction:
    """The share of ignored rows recent calls saw, copied to the host without a sync. Compacting
    costs a host sync (nonzero's count), which in a host-bound step leaves the GPU idle while the
    backward is launched; it pays only when many rows are ignored (prompt-masked SFT), so on a
    device the decision follows the last count that has landed (the first calls run every row).
    On the CPU a count costs nothing. Both paths give the same loss, lse and dh; dW may differ in
    its last bit (other chunk boundaries), so with torch.use_deterministic_algorithms(True) every
    call compacts, as before this heuristic."""

    def __init__(self):
        self.pending = []  # (event, pinned count, rows), oldest first
        self.landed: Optional[float] = None

    def previous(self) -> Optional[float]:
        while self.pending and self.pending[0][0].query():
            _, count, rows = self.pending.pop(0)
            self.landed = 1.0 - float(count.item()) / max(1, rows)
        return self.landed

    def record(self, keep: torch.Tensor) -> None:
        if len(self.pending) >= 4:  # the host far ahead of the device: keep what is in flight
            return
        count = torch.empty((), dtype=torch.int64, pin_memory=True)
        count.copy_(keep.sum(), non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(keep.device))  # the stream the copy went to
        self.pending.append((event, count, keep.numel()))


_IGNORED = _IgnoredFraction()
COMPACT_MIN_IGNORED = 0.1  # on a device: compact when the last counted call ignored at least this share


def _captured(t: torch.Tensor) -> bool:
    """Whether work on t's device is being recorded into a CUDA graph (no host syncs; replays have no host time)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _kept_rows(labels: torch.Tensor, ignore_index: int) -> Optional[torch.Tensor]:
    """Indices of the rows whose label is not ignore_index, or None to run every row: when
    none is ignored, when COMPACT is off, while a CUDA graph is captured (the count needs
    a host sync), or on a device when recent calls ignored few rows (_IgnoredFraction)."""
    if not COMPACT or _captured(labels):
        return None
    keep = labels != ignore_index
    if labels.is_cuda and not torch.are_deterministic_algorithms_enabled():
        ignored = _IGNORED.previous()
        _IGNORED.record(keep)
        if ignored is None or ignored < COMPACT_MIN_IGNORED:
            return None
    idx = keep.nonzero().view(-1)  # syncs on a device
    return None if idx.numel() == labels.numel() else idx


def _buffers(hidden, n_cols, rows, n_work, gather):
    """(logits [r, V], hidden rows [r, H] or None, r ≤ n_work). Gathered hidden rows (and then
    their dh) live in the tail of the same budget of rows × V values, so nothing else is
    allocated per chunk."""
    if not gather:
        r = min(rows, n_work)
        return hidden.new_empty((r, n_cols)), None, r
    n_hidden = hidden.shape[1]
    r = min(n_work, max(1, (rows * n_cols - 64) // (n_cols + n_hidden)))
    tail = -(-r * n_cols // 64) * 64  # 128-byte aligned (bf16) for the GEMMs
    flat = hidden.new_empty(tail + r * n_hidden)
    return flat[: r * n_cols].view(r, n_cols), flat[tail:].view(r, n_hidden), r


def _chunked(
    hidden,
    weight,
    bias,
    labels,
    ignore_index,
    label_smoothing,
    *,
    lse=None,
    scale=None,
    need_hidden=False,
    need_weight=False,
    need_bias=False,
    chunk_elements=None,
    block_v=None,
    epi=NO_EPILOGUE,
):
    """The chunk loop behind the lm_head + loss entry points.

    lse None: forward, returns (loss, lse, dh, dw, db); with `scale` (fp32 [1]: d(total)/d(loss_r)
    for every row) it also takes the gradients asked for, from the same logits.
    lse given: backward, recomputes the logits; `scale` is then [N] or [1]; returns (dh, dw, db).
    Gradients not asked for are None."""
    n_rows, n_cols = hidden.shape[0], weight.shape[0]
    forward = lse is None
    need_bias = need_bias and bias is not None
    grads = need_hidden or need_weight or need_bias
    device = hidden.device
    labels = labels.contiguous()
    idx = _kept_rows(labels, ignore_index)
    n_work = n_rows if idx is None else idx.numel()
    new = torch.zeros if idx is not None else torch.empty  # dropped rows: loss, lse, dh = 0
    if forward:
        loss = new(n_rows, dtype=torch.float32, device=device)
        lse = new(n_rows, dtype=torch.float32, device=device)
    else:
        lse, scale = lse.contiguous(), scale.contiguous()
    dh = new(hidden.shape, dtype=hidden.dtype, device=device) if need_hidden else None
    # contiguous whatever the weight's strides: the fake impls promise that layout
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=device) if need_weight else None
    db = torch.zeros(n_cols, dtype=torch.float32, device=device) if need_bias else None
    if need_weight and n_work == 0:
        dw.zero_()
    if n_work and (forward or grads):
        rows = chunk_rows(n_rows, n_cols, hidden.shape[1], chunk_elements)
        buf, hbuf, rows = _buffers(hidden, n_cols, rows, n_work, idx is not None)
        for i, (s, e) in enumerate(_chunks(n_work, rows)):
            if idx is None:
                h, y = hidden[s:e], labels[s:e]
            else:
                rows_i = idx[s:e]
                h = torch.index_select(hidden, 0, rows_i, out=hbuf[: e - s])
                y = labels.index_select(0, rows_i)
            logits = _logits_into(buf[: e - s], h, weight, bias)
            if forward:
                loss_c, lse_c = (
                    (loss[s:e], lse[s:e])
                    if idx is None
                    else (
                        torch.empty(e - s, dtype=torch.float32, device=device),
                        torch.empty(e - s, dtype=torch.float32, device=device),
                    )
                )
                _forward_rows(
                    logits,
                    y,
                    ignore_index,
                    label_smoothing,
                    loss_c,
                    lse_c,
                    block_v,
                    grad_scale=scale if grads else None,
                    epi=epi,
                )
                if idx is not None:
                    loss.index_copy_(0, rows_i, loss_c)
                    lse.index_copy_(0, rows_i, lse_c)
            else:
                if idx is None:
                    lse_c, scale_c = lse[s:e], (scale[s:e] if scale.numel() > 1 else scale)
                else:
                    lse_c = lse.index_select(0, rows_i)
                    scale_c = scale.index_select(0, rows_i) if scale.numel() > 1 else scale
                _backward_rows(logits, y, lse_c, scale_c, ignore_index, label_smoothing, logits, block_v, epi)
            if need_weight:
                # accumulated in the weight's dtype (the GEMM adds in fp32, then rounds once per
                # chunk): no fp32 [V, H] buffer
                if i == 0:
                    torch.mm(logits.t(), h, out=dw)
                else:
                    dw.addmm_(logits.t(), h)
            if need_bias:
                db += logits.sum(0, dtype=torch.float32)
            if need_hidden:  # after dW: a gathered h's buffer takes its dh
                if idx is None:
                    torch.mm(logits, weight, out=dh[s:e])
                else:
                    dh.index_copy_(0, rows_i, torch.mm(logits, weight, out=hbuf[: e - s]))
    db = db.to(bias.dtype) if need_bias else None
    return (loss, lse, dh, dw, db) if forward else (dh, dw, db)


def linear_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float = 0.0,
    chunk_elements: Optional[int] = None,
    block_v: Optional[int] = None,
    epi: Epilogue = NO_EPILOGUE,
):
    """(loss, lse) per row of cross_entropy(epi(hidden @ weight.T + bias), labels); hidden is [N, H]."""
    check_labels(labels, weight.shape[0], ignore_index)
    loss, lse, *_ = _chunked(
        hidden,
        weight,
        bias,
        labels,
        ignore_index,
        label_smoothing,
        chunk_elements=chunk_elements,
        block_v=block_v,
        epi=epi,
    )
    return loss, lse


def linear_cross_entropy_forward_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    scale: torch.Tensor,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    chunk_elements: Optional[int] = None,
    block_v: Optional[int] = None,
    epi: Epilogue = NO_EPILOGUE,
    online: Optional[bool] = None,
):
    """(loss, lse, dhidden, dweight, dbias): the forward's per-row loss and lse, and the gradients
    asked for (else None) of Σ_r scale·loss_r, scale being one fp32 value ([1]) for all rows.
    `online` (default: cross_entropy_online.preferred, by size, or always inside a CUDA graph capture): a
    frozen lm_head's dh by the vocabulary-tiled online softmax of cross_entropy_online.py, where it applies."""
    check_labels(labels, weight.shape[0], ignore_index)
    wanted = online_path.preferred(*hidden.shape, weight.shape[0], _captured(hidden)) if online is None else online
    if (
        wanted
        and need_hidden
        and online_path.applicable(hidden, weight, label_smoothing, need_weight, need_bias and bias is not None, epi)
    ):
        labels = labels.contiguous()
        loss, lse, dh = online_path.forward_backward(
            hidden, weight, bias, labels, ignore_index, scale, _kept_rows(labels, ignore_index), epi
        )
        return loss, lse, dh, None, None
    return _chunked(
        hidden,
        weight,
        bias,
        labels,
        ignore_index,
        label_smoothing,
        scale=scale,
        need_hidden=need_hidden,
        need_weight=need_weight,
        need_bias=need_bias,
        chunk_elements=chunk_elements,
        block_v=block_v,
        epi=epi,
    )


def linear_cross_entropy_backward(
    scale: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    chunk_elements: Optional[int] = None,
    block_v: Optional[int] = None,
    epi: Epilogue = NO_EPILOGUE,
):
    """(dhidden, dweight, dbias), each None unless needed, where d(loss_r) = scale[r]
    (fp32, [N] or [1]). Recomputes each chunk's logits rather than keep them from the forward."""
    return _chunked(
        hidden,
        weight,
        bias,
        labels,
        ignore_index,
        label_smoothing,
        lse=lse,
        scale=scale,
        need_hidden=need_hidden,
        need_weight=need_weight,
        need_bias=need_bias,
        chunk_elements=chunk_elements,
        block_v=block_v,
        epi=epi,
    )
