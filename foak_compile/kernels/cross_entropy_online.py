"""lm_head + cross-entropy for a frozen lm_head, tiled over the vocabulary: dh by an online softmax.

The token-chunked path (cross_entropy.py) needs a row's whole [vocab] logits before its gradient,
so its memory is rows × vocab per chunk, and small chunks make its dh GEMM (K = vocab, a thin
output) slow. With the lm_head frozen only dh is wanted, and

    dh_r = scale · (Σ_n p_rn · dv_rn · W_n  -  dv_ry · W_y),    p_rn = exp(v_rn - lse_r)

can be summed over vocabulary pieces as they come, the way flash attention sums softmax·V: per
row, exp(v - m) against a reference m, a running sum l, and acc_r = Σ exp(v_rn - m_r)·dv_rn·W_n;
at the end dh = scale·(acc/l + (e_y/l - 1)·dv_y·W_y) and lse = m + log l. So a block of rows
goes once through the vocabulary in pieces: logits piece S = h·W_jᵀ (a torch GEMM into a reused
buffer), one kernel turns S into P = exp(v - m)·dv in place (rows' state updated), acc += P·W_j
(a torch GEMM accumulating in fp32). Two GEMMs per logit, as the chunked path; live memory is
one [rows, piece] buffer and an fp32 [rows, hidden] accumulator, whatever the token count.

- The reference m moves only when a piece's max exceeds it by more than TAU (exp stays in the
  buffer's range), and then the rows that moved have acc rescaled (by the piece's kernel, which
  touches only them): almost always m is set by the first piece and never moves.
- The target's term is kept out of P (its entry is written as 0) and added in fp32 at the end:
  p_y - 1 computed as one fp32 number, not Σ p·W - W_y cancelling after P's rounding.
- Linear epilogue steps (scale, divisor) have a constant derivative, applied to acc at the end
  rather than to P (fp16 P would overflow for a scale > 1); softcap's varies per logit and is in P.
Not here: label smoothing (its ε/V term would need Σ_n dv_n·W_n, a second GEMM), trained
weight or bias (dW needs every p after the full lse: the chunked path's three GEMMs).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import config
from .ce_epilogue import NO_EPILOGUE, Epilogue, _epilogue
from .common import cast, use_triton

# config.lce_online (FOAK_LCE_ONLINE=1 / 0) True / False: always / never, where applicable. None: by size,
# from case-level runs (frozen lm_head, bf16, 25 % of labels ignored, vocab 128256 and 256000, 4096 and 16384
# rows; docs/results.md "Linear + cross-entropy"). The path is host-bound where its GEMMs are small (hidden
# 2048): ~0.7 ms of host time per call and ~0.1 ms per piece (host_overhead.json), which the work hides from
# 4096 x 256000 logits on (0.91x inductor's time) but not reliably at 4096 x 128256 (0.96-1.12x; the chunked
# path: 0.92-0.97x, at 3x Liger's memory).
# So: from hidden 4096, or from MIN_LOGITS rows x vocabulary (between those two; smaller vocabularies were
# not measured).
MIN_LOGITS, MIN_HIDDEN = 800_000_000, 4096


def preferred(n_rows: int, n_hidden: int, n_cols: int, captured: bool = False) -> bool:
    """Whether a call of this size (rows before any are dropped) takes this path when it applies.
    `captured`: the call is being recorded into a CUDA graph, whose replays have none of the host time
    the size rule is about; then always (bf16 1B loss-only step with graphs: as fast as the chunked
    path, with the smaller peak)."""
    forced = config.current().lce_online
    if forced is not None:
        return forced
    return captured or n_rows * n_cols >= MIN_LOGITS or n_hidden >= MIN_HIDDEN


# Tiles. Pieces of COLS vocabulary columns: wider pieces mean fewer GEMM pairs and launches per block, and
# the host's time per piece (~0.1 ms: two GEMM calls and a Triton launch) is what bounds a block at hidden
# 2048 (GPU busy 5.4 of 7.4 ms at 4096 x 128256 x 2048). Rows per block: as
# many as fit in BUDGET bytes of working memory (piece, fp32 accumulator, gathered rows: peak_bytes), so the
# memory is the same whatever the token count. 31 MiB (1131 rows at hidden 2048, 792 at hidden 4096, bf16)
# keeps the peak, dh included, under Liger's at 4096 tokens in the four measured shapes (its 128-row chunk
# of logits: 0.046 / 0.062 / 0.092 GiB at vocab 128256 x hidden 2048 / 128256 x 4096 / 256000 x 4096).
ROWS: Optional[int] = None  # a fixed number of rows per block instead (tests, sweeps)
COLS = 8192
BUDGET = 31 * 2**20
# How far a piece's max may exceed the reference before it moves: exp(TAU) must fit the piece's dtype
# (P is stored there; the sums L and acc are fp32): e^20 ≈ 5e8 for bf16/fp32, e^8 ≈ 3e3 < 65504 for fp16.
TAU = {torch.float32: 20.0, torch.bfloat16: 20.0, torch.float16: 8.0}


def applicable(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    label_smoothing: float,
    need_weight: bool,
    need_bias: bool,
    epi: Epilogue,
) -> bool:
    """Whether this path computes what the chunked path would (see the module doc for what it lacks)."""
    return (
        label_smoothing == 0.0
        and not need_weight
        and not need_bias
        and use_triton(hidden)
        and hidden.dtype in TAU
        and weight.dtype == hidden.dtype
        and weight.shape[0] > 0
    )


def _linear_factor(epi: Epilogue) -> float:
    """dv/dz of the epilogue's linear steps (scale, then division): a constant."""
    return epi.scale / epi.divisor


# Per-row state, [rows, 5] fp32 (the kernels' st + 0 ... st + 4): the reference m, the sum l, the target's
# exp e_y, value v_y and derivative dv_y.


@triton.jit
def _piece(
    S,
    Y,
    STATE,
    ACC,
    EPI_ARGS,
    width,
    col0,
    n_hidden,
    ignore_index,
    EPI: tl.constexpr,
    TAU: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One row of a logits piece S[:, :width] (contiguous; vocabulary columns col0...): update the row's
    STATE, rescale its accumulator row (ACC: contiguous [rows, n_hidden]) when the reference moved (before
    the piece's GEMM adds to it: same stream; no launch of its own), and overwrite the piece with
    P = exp(v - m)·dv/lin (0 at the target and in ignored rows). EPI_ARGS (fp32: mul, div, cap, cdiv,
    lin) is read only with an epilogue. Few arguments: the host's time per launch grows with them."""
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * width
    st = STATE + row * 5
    mul, div, cap, cdiv, lin = 1.0, 1.0, 0.0, 1.0, 1.0
    if EPI != 0:
        mul, div = tl.load(EPI_ARGS), tl.load(EPI_ARGS + 1)
        cap, cdiv, lin = tl.load(EPI_ARGS + 2), tl.load(EPI_ARGS + 3), tl.load(EPI_ARGS + 4)
    y = tl.load(Y + row)
    keep = y != ignore_index
    limit = tl.where(keep, width, 0)  # ignored rows read nothing
    cols0 = tl.arange(0, BLOCK)
    top = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, width, BLOCK):
        cols = start + cols0
        mask = cols < limit
        x = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if EPI != 0:
            x = tl.where(mask, _epilogue(x, mul, div, cap, cdiv, EPI, S.dtype.element_ty)[0], float("-inf"))
        top = tl.maximum(top, x, propagate_nan=tl.PropagateNan.ALL)
    top_row = tl.max(top, axis=0)
    m_old = tl.load(st + 0)
    moves = (m_old == float("-inf")) | (top_row > m_old + TAU)
    m_new = tl.where(moves, tl.maximum(top_row, m_old), m_old)
    base = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing finite yet: exp(-inf - 0) = 0
    # 1 where nothing was summed yet (and in ignored rows): no rescale work for those rows
    alpha = tl.where(m_old == float("-inf"), 1.0, tl.exp(m_old - base))
    # the target, read before the piece is overwritten
    has_y = keep & (y >= col0) & (y < col0 + width)
    x_y = tl.load(s_row + (y - col0), mask=has_y, other=0.0).to(tl.float32)
    d_y = 1.0
    if EPI != 0:
        x_y, d_y = _epilogue(x_y, mul, div, cap, cdiv, EPI, S.dtype.element_ty)
    e_y = tl.exp(x_y - base)
    l_acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, width, BLOCK):
        cols = start + cols0
        mask = cols < limit
        x = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
        if EPI != 0:
            v, d = _epilogue(x, mul, div, cap, cdiv, EPI, S.dtype.element_ty)
        else:
            v = x
        e = tl.where(mask, tl.exp(v - base), 0.0)
        l_acc += e
        p = tl.where(cols == y - col0, 0.0, e)
        if EPI != 0:
            p = p * (d / lin)
        tl.store(s_row + cols, cast(p, S.dtype.element_ty), mask=cols < width)
    tl.store(st + 0, m_new)
    tl.store(st + 1, tl.load(st + 1) * alpha + tl.sum(l_acc, axis=0))
    tl.store(st + 2, tl.load(st + 2) * alpha + tl.where(has_y, e_y, 0.0))
    tl.store(st + 3, tl.where(has_y, x_y, tl.load(st + 3)))
    tl.store(st + 4, tl.where(has_y, d_y, tl.load(st + 4)))
    if alpha != 1.0:  # only rows whose reference moved (never in the first piece: alpha is 1 there)
        for start in range(0, n_hidden, BLOCK_H):
            hcols = start + tl.arange(0, BLOCK_H)
            a = tl.load(ACC + row * n_hidden + hcols, mask=hcols < n_hidden)
            tl.store(ACC + row * n_hidden + hcols, a * alpha, mask=hcols < n_hidden)


@triton.jit
def _finish(
    ACC,
    W,
    Y,
    STATE,
    SCALE,
    DH,
    LOSS,
    LSE,
    stride_w,
    stride_dh,
    n_hidden,
    n_cols,
    ignore_index,
    lin,
    BLOCK: tl.constexpr,
):
    """Per row: lse = m + log l, loss = lse - v_y, dh = scale·(lin·acc/l + (e_y/l - 1)·dv_y·W_y)."""
    row = tl.program_id(0).to(tl.int64)
    st = STATE + row * 5
    y = tl.load(Y + row)
    keep = y != ignore_index
    in_range = (y >= 0) & (y < n_cols)
    m = tl.load(st + 0)
    l = tl.where(keep, tl.load(st + 1), 1.0)  # noqa: E741  (the l of lse = m + log l)
    lse = tl.where(keep, tl.where(m == float("-inf"), 0.0, m), 0.0) + tl.log(l)
    loss = tl.where(in_range, lse - tl.load(st + 3), float("nan"))
    tl.store(LOSS + row, tl.where(keep, loss, 0.0))
    tl.store(LSE + row, lse)
    scale = tl.load(SCALE)
    inv_l = 1.0 / l
    g_y = (tl.load(st + 2) * inv_l - 1.0) * tl.load(st + 4)
    y_safe = tl.where(keep & in_range, y, 0).to(tl.int64)
    acc_limit = tl.where(keep, n_hidden, 0)  # ignored rows read nothing (their acc is not summed)
    w_limit = tl.where(keep & in_range, n_hidden, 0)
    for start in range(0, n_hidden, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_hidden
        a = tl.load(ACC + row * n_hidden + cols, mask=cols < acc_limit, other=0.0)
        w_y = tl.load(W + y_safe * stride_w + cols, mask=cols < w_limit, other=0.0).to(tl.float32)
        g = (a * (lin * inv_l) + g_y * w_y) * scale
        tl.store(DH + row * stride_dh + cols, cast(tl.where(keep, g, 0.0), DH.dtype.element_ty), mask=mask)


def _accumulate(acc: torch.Tensor, p: torch.Tensor, w: torch.Tensor, first: bool) -> None:
    """acc (fp32) = or += p·w for p, w in the logits' dtype, summed in fp32 by the GEMM."""
    if p.dtype == torch.float32:
        torch.mm(p, w, out=acc) if first else acc.addmm_(p, w)
    elif p.is_cuda and first and _MM_FP32_OUT:  # cuBLAS: half inputs, fp32 output
        _mm_fp32(p, w, acc)
    elif p.is_cuda and _ADDMM_FP32_ACC:  # ... and an fp32 accumulator added in the GEMM
        _addmm_fp32(acc, p, w)
    elif p.is_cuda and _MM_FP32_OUT:  # torch < 2.10: addmm.dtype takes no fp32 self with half matrices
        acc.add_(torch.ops.aten.mm.dtype(p, w, torch.float32))
    elif p.is_cuda:  # no out_dtype GEMMs at all: the piece's product rounded once, then added
        acc.copy_(torch.mm(p, w)) if first else acc.add_(torch.mm(p, w))
    else:  # the CPU has no mixed-dtype GEMM: upcast (tests only; products are exact in fp32 either way)
        torch.mm(p.float(), w.float(), out=acc) if first else acc.addmm_(p.float(), w.float())


def _torch_at_least(major: int, minor: int) -> bool:
    return tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (major, minor)


def _public_out_dtype() -> bool:
    """Whether torch.mm / torch.addmm take out_dtype (bound in C++: a few µs less per call than going
    through torch.ops' Python overloads, once per piece). Probed on meta tensors."""
    a = torch.empty(2, 2, dtype=torch.bfloat16, device="meta")
    c = torch.empty(2, 2, dtype=torch.float32, device="meta")
    try:
        torch.mm(a, a, out_dtype=torch.float32, out=c)
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
        return True
    except (TypeError, RuntimeError):
        return False


def _mm_fp32_ops(p, w, acc):
    torch.ops.aten.mm.dtype_out(p, w, torch.float32, out=acc)


def _addmm_fp32_ops(acc, p, w):
    torch.ops.aten.addmm.dtype_out(acc, p, w, torch.float32, out=acc)


def _mm_fp32_public(p, w, acc):
    torch.mm(p, w, out_dtype=torch.float32, out=acc)


def _addmm_fp32_public(acc, p, w):
    torch.addmm(acc, p, w, out_dtype=torch.float32, out=acc)


_mm_fp32, _addmm_fp32 = (
    (_mm_fp32_public, _addmm_fp32_public) if _public_out_dtype() else (_mm_fp32_ops, _addmm_fp32_ops)
)


_MM_FP32_OUT = hasattr(torch.ops.aten.mm, "dtype_out")
_ADDMM_FP32_ACC = hasattr(torch.ops.aten.addmm, "dtype_out") and _torch_at_least(2, 10)


def _device_values(values, device) -> torch.Tensor:
    """fp32 values on the device by fill kernels (the value is a launch argument): no host-to-device
    copy, which would wait for the stream and is refused while a CUDA graph is captured. (`t[i] = v`
    is such a copy: the train step under CUDA graphs failed on it.)"""
    t = torch.empty(len(values), dtype=torch.float32, device=device)
    for i, v in enumerate(values):
        t[i : i + 1].fill_(v)
    return t


def _bytes_per_row(n_cols: int, n_hidden: int, itemsize: int, gather: bool, cols: Optional[int]) -> int:
    """Working memory per row of a block: its piece of logits, fp32 accumulator and state, and when
    ignored rows are dropped its gathered hidden state and the few bytes of its indices and results."""
    held = min(n_cols, cols or COLS) * itemsize + n_hidden * 4 + 5 * 4
    return held + (n_hidden * itemsize + 32 if gather else 0)


def block_rows(
    n_work: int,
    n_cols: int,
    n_hidden: int,
    itemsize: int,
    gather: bool = True,
    rows: Optional[int] = None,
    cols: Optional[int] = None,
) -> int:
    """Rows per block for n_work rows: at most `rows` (or ROWS), by default as many as BUDGET holds, in whole
    64-row GEMM tiles; then the fewest blocks, made equal up to a tile (3080 kept rows, bound 1131, so
    1088: blocks of 1088, 1088 and 904 rather than 4 of 770). Each block costs a pass of launches over the
    whole vocabulary, whatever its rows."""
    cap = rows or ROWS or max(1, BUDGET // _bytes_per_row(n_cols, n_hidden, itemsize, gather, cols))
    cap = min(cap, n_work)
    tile_cap = cap - cap % 64 if cap >= 64 else cap
    even = -(-n_work // -(-n_work // tile_cap))
    return min(tile_cap, -(-even // 64) * 64) if tile_cap >= 64 else even


def forward_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int,
    scale: torch.Tensor,
    idx: Optional[torch.Tensor],
    epi: Epilogue = NO_EPILOGUE,
    rows: Optional[int] = None,
    cols: Optional[int] = None,
):
    """(loss, lse, dh) per row of cross_entropy(epi(hidden @ weight.T + bias), labels) with
    d(loss_r) = scale[0] for every row; `idx`: the rows to run (the others get zeros), or None."""
    n_rows, n_hidden = hidden.shape
    n_cols = weight.shape[0]
    device = hidden.device
    n_work = n_rows if idx is None else idx.numel()
    new = torch.zeros if idx is not None else torch.empty
    loss = new(n_rows, dtype=torch.float32, device=device)
    lse = new(n_rows, dtype=torch.float32, device=device)
    dh = new(hidden.shape, dtype=hidden.dtype, device=device)
    if n_work == 0:
        return loss, lse, dh
    r_max = block_rows(n_work, n_cols, n_hidden, hidden.element_size(), idx is not None, rows, cols)
    width = min(n_cols, cols or COLS)
    piece_buf = hidden.new_empty(r_max * width)  # each piece viewed contiguous at its own width
    acc_buf = torch.empty(r_max * n_hidden, dtype=torch.float32, device=device)
    state = torch.empty(r_max, 5, dtype=torch.float32, device=device)
    init = _device_values([float("-inf"), 0.0, 0.0, 0.0, 1.0], device)  # m, l, e_y, v_y, dv_y
    h_buf = hidden.new_empty((r_max, n_hidden)) if idx is not None else None
    tau = TAU[hidden.dtype]
    lin = _linear_factor(epi)
    epi_args, epi_flags = epi.kernel_args(hidden), epi.flags(hidden)
    epi_vals = _device_values([*epi_args, lin], device) if epi_flags else init
    block = min(4096 if hidden.is_cuda else 16384, triton.next_power_of_2(width))
    block_h = min(4096, triton.next_power_of_2(n_hidden))
    warps = 8 if block >= 2048 else 4
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    # Per piece only the launches remain in the loop (the host's time per piece is what bounds a
    # block of ~1024 rows at hidden 2048): the weight's slices, their transposes and the biases' are made once.
    spans = [(c0, min(n_cols, c0 + width)) for c0 in range(0, n_cols, width)]
    w_pieces = [w[c0:c1] for c0, c1 in spans]
    w_pieces_t = [wp.t() for wp in w_pieces]
    b_pieces = [None if bias is None else bias[c0:c1] for c0, c1 in spans]
    for s in range(0, n_work, r_max):
        e = min(n_work, s + r_max)
        r = e - s
        if idx is None:
            h, y = hidden[s:e], labels[s:e]
        else:
            rows_i = idx[s:e]
            h = torch.index_select(hidden, 0, rows_i, out=h_buf[:r])
            y = labels.index_select(0, rows_i)
        st = state[:r]
        st.copy_(init.expand(r, 5))
        acc = acc_buf[: r * n_hidden].view(r, n_hidden)
        views = {}  # the piece buffer viewed [r, width] (at most two widths: the last piece may be short)
        for j, (c0, c1) in enumerate(spans):
            piece = views.get(c1 - c0)
            if piece is None:
                piece = views[c1 - c0] = piece_buf[: r * (c1 - c0)].view(r, c1 - c0)
            if bias is None:
                torch.mm(h, w_pieces_t[j], out=piece)
            else:
                torch.addmm(b_pieces[j], h, w_pieces_t[j], out=piece)
            _piece[(r,)](
                piece,
                y,
                st,
                acc,
                epi_vals,
                c1 - c0,
                c0,
                n_hidden,
                ignore_index,
                EPI=epi_flags,
                TAU=tau,
                BLOCK=block,
                BLOCK_H=block_h,
                num_warps=warps,
            )
            _accumulate(acc, piece, w_pieces[j], first=j == 0)
        if idx is None:
            loss_c, lse_c, dh_c = loss[s:e], lse[s:e], dh[s:e]
        else:
            loss_c = torch.empty(r, dtype=torch.float32, device=device)
            lse_c = torch.empty_like(loss_c)
            dh_c = h_buf[:r]  # h is read by nothing after the last piece's GEMM
        _finish[(r,)](
            acc,
            w,
            y,
            st,
            scale,
            dh_c,
            loss_c,
            lse_c,
            w.stride(0),
            dh_c.stride(0),
            n_hidden,
            n_cols,
            ignore_index,
            lin,
            BLOCK=block_h,
        )
        if idx is not None:
            loss.index_copy_(0, rows_i, loss_c)
            lse.index_copy_(0, rows_i, lse_c)
            dh.index_copy_(0, rows_i, dh_c)
    return loss, lse, dh


def peak_bytes(
    n_rows: int,
    n_cols: int,
    n_hidden: int,
    itemsize: int,
    gather: bool = True,
    rows: Optional[int] = None,
    cols: Optional[int] = None,
) -> int:
    """What forward_backward holds beyond its outputs (loss, lse, dh) for n_rows rows to run: one block's
    working memory (_bytes_per_row), at most BUDGET by default."""
    r = block_rows(n_rows, n_cols, n_hidden, itemsize, gather, rows, cols)
    return r * _bytes_per_row(n_cols, n_hidden, itemsize, gather, cols)
