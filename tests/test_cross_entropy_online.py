"""The frozen-lm_head online-softmax path of linear_cross_entropy (kernels/cross_entropy_online.py)
against float64 torch and against the chunked path, on many row blocks and vocabulary pieces."""

import pytest
import torch

import foak_compile  # noqa: F401
from foak_compile.kernels import cross_entropy as kernel
from foak_compile.kernels import cross_entropy_online as online

from tests.helpers import rel_err
from tests.test_cross_entropy_kernel import EPILOGUES, TOL, _check_linear_ce, _labels


@pytest.fixture
def small_tiles(monkeypatch, foak_config):
    """5 rows per block and 37 columns per piece: 131 columns make 4 pieces, the last one short."""
    foak_config(lce_online=True)
    monkeypatch.setattr(online, "ROWS", 5)
    monkeypatch.setattr(online, "COLS", 37)
    return monkeypatch


def _online_calls(monkeypatch):
    calls = []
    real = online.forward_backward

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(online, "forward_backward", counted)
    return calls


def _inputs(n, h, vocab, dtype, device, scale=1.0):
    hidden = (torch.randn(n, h, device=device) * scale).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, h, device=device) / h**0.5).to(dtype)
    return hidden, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compact", [True, False])
def test_online_vs_float64(dtype, compact, small_tiles, device):
    """Loss and dh for mean and sum, with and without a bias, ignored rows dropped or run as zeros."""
    small_tiles.setattr(kernel, "COMPACT", compact)
    calls = _online_calls(small_tiles)
    n, h, vocab = 23, 24, 131
    hidden, weight = _inputs(n, h, vocab, dtype, device)
    bias = torch.randn(vocab, device=device).to(dtype)
    for reduction, b in (("mean", None), ("sum", bias)):
        _check_linear_ce(hidden, weight, b, _labels(n, vocab, device), reduction=reduction, out_dtype=torch.float32)
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(EPILOGUES))
def test_online_epilogue_vs_float64(dtype, name, small_tiles, device):
    """Softcap's derivative inside P, the linear steps' applied at the end."""
    epi = EPILOGUES[name]
    n, h, vocab = 19, 24, 131
    hidden = (torch.randn(n, h, device=device) * 2).to(dtype).requires_grad_()
    weight = torch.randn(vocab, h, device=device).to(dtype)  # logits ~ ±10: the cap bites
    y = _labels(n, vocab, device)
    # eager rounds each step too (rounded, half dtypes): allow twice its own error
    grad_tol = "eager" if dtype != torch.float32 and epi.rounded else None
    calls = _online_calls(small_tiles)
    _check_linear_ce(hidden, weight, None, y, reduction="sum", epi=epi, grad_tol=grad_tol)
    assert calls


def test_fp16_large_scale_stays_out_of_p(small_tiles, foak_config, device):
    """A logit scale of 64 in fp16: a later piece's max 7.5 above the reference (within TAU, so it
    does not move) gives exp(7.5) ≈ 1808 in P, fine; with the scale's derivative in P it would be
    64 × 1808 > 65504, an inf. The scale is applied to the accumulator at the end instead."""
    n, h, vocab = 6, 8, 131
    hidden = (torch.randn(n, h, device=device) * 1e-3).to(torch.float16).requires_grad_()
    weight = torch.randn(vocab, h, device=device).to(torch.float16)
    bias = torch.zeros(vocab, device=device)
    bias[0] = 0.5  # the first piece's max: the reference, 64 · 0.5 = 32
    bias[50] = 0.5 + 7.5 / 64  # the second piece's: 7.5 above it
    bias = bias.to(torch.float16)
    y = _labels(n, vocab, device, p_ignore=0.0)
    epi = kernel.Epilogue(scale=64.0, rounded=True)
    ours = _check_linear_ce(hidden, weight, bias, y, epi=epi, grad_tol=1.0)
    foak_config(lce_online=False)
    chunked = _check_linear_ce(hidden, weight, bias, y, epi=epi, grad_tol=1.0)
    assert ours[0] < max(2 * chunked[0], 2 * TOL[torch.float16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shift", [15.0, 40.0])
def test_reference_moves_when_a_later_piece_is_larger(dtype, shift, small_tiles, foak_config, device):
    """Logits 15 or 40 higher in the last pieces than in the first: the rows' reference moves past
    TAU and their acc is rescaled (without it dh is off by e^shift; and fp16's TAU is below
    log(65504) ≈ 11, or P = e^15 would overflow)."""
    n, h, vocab = 13, 16, 131
    hidden, weight = _inputs(n, h, vocab, dtype, device)
    bias = torch.zeros(vocab, device=device)
    bias[90:] = shift
    bias = bias.to(dtype)
    y = _labels(n, vocab, device)
    ours = _check_linear_ce(hidden, weight, bias, y, grad_tol=1.0)
    foak_config(lce_online=False)
    chunked = _check_linear_ce(hidden, weight, bias, y, grad_tol=1.0)
    # logits ≈ 40 carry bf16's rounding (ulp 0.25): both paths see the same logits, so the same error
    assert ours[0] < max(2 * chunked[0], 2 * TOL[dtype])


def test_confident_target_keeps_its_precision(device):
    """p_y ≈ 0.99 (each row's hidden state points at its target's weight row): dh = Σ p·W - W_y is
    a small difference. The target's term is added in fp32 (p_y - 1 as one number), so dh is as
    accurate as the chunked path's; summed in P instead, its bf16 rounding of e^(v_y - m) left
    0.12 of dh's largest element wrong here (against 0.003). Reference: float64 softmax of the
    same bf16 logits, so only the gradient's arithmetic is measured."""
    torch.manual_seed(0)
    n, h, vocab = 11, 64, 131
    weight = torch.randn(vocab, h) / h**0.5
    y = torch.randint(37, vocab, (n,))  # targets past the first piece: the reference m is another logit
    hidden = (10 * weight[y] / weight[y].square().sum(-1, keepdim=True)).to(torch.bfloat16).to(device)
    weight, y = weight.to(torch.bfloat16).to(device), y.to(device)
    p = torch.softmax(torch.mm(hidden, weight.t()).double(), -1)
    assert (p[torch.arange(n), y] > 0.97).all()
    p[torch.arange(n), y] -= 1
    ref = p @ weight.double()
    scale = torch.ones(1, device=device)
    errors = []
    for use_online, rows, cols in ((True, 5, 37), (False, None, None)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(online, "ROWS", rows or online.ROWS)
            mp.setattr(online, "COLS", cols or online.COLS)
            dh = kernel.linear_cross_entropy_forward_backward(
                hidden, weight, None, y, -100, 0.0, scale, True, False, False, online=use_online
            )[2]
        errors.append(rel_err(dh, ref))
    assert errors[0] < max(2 * errors[1], 1e-3) and errors[0] < 1e-2


def test_not_taken_where_it_does_not_apply(small_tiles, device):
    """Label smoothing, a trained weight or bias: the chunked path, which computes those."""
    calls = _online_calls(small_tiles)
    hidden, weight = _inputs(9, 8, 131, torch.float32, device)
    bias = torch.randn(131, device=device)
    y = _labels(9, 131, device)
    _check_linear_ce(hidden, weight, None, y, label_smoothing=0.1)
    _check_linear_ce(hidden, weight.clone().requires_grad_(), None, y)
    _check_linear_ce(hidden, weight, bias.requires_grad_(), y)
    _check_linear_ce(hidden, weight, None, y, reduction="none")  # per-row upstream: recompute op
    assert not calls
    _check_linear_ce(hidden, weight, bias.detach(), y)
    assert len(calls) == 1


def test_online_all_ignored_and_nan(small_tiles, device):
    hidden, weight = _inputs(7, 8, 131, torch.float32, device)
    y = torch.full((7,), -100, device=device)
    loss, _ = torch.ops.foak.linear_cross_entropy(hidden, weight, None, y, -100, 0.0, "mean", torch.float32)
    assert loss.isnan()
    loss.backward()
    assert (hidden.grad == 0).all()
    hidden.grad = None
    bias = torch.zeros(131, device=device)
    bias[100] = float("nan")  # every row's logits hold a NaN: NaN loss, NaN dh, as eager
    y = _labels(7, 131, device, p_ignore=0.0)
    loss, _ = torch.ops.foak.linear_cross_entropy(hidden, weight, bias, y, -100, 0.0, "sum", torch.float32)
    loss.backward()
    assert loss.isnan() and hidden.grad.isnan().all()


def test_out_of_range_label(small_tiles, device):
    """Raised on the CPU before the kernels (on CUDA a device assert, which would poison the
    process for later tests); the kernels themselves read nothing out of bounds and mark the row NaN."""
    hidden, weight = _inputs(5, 8, 131, torch.float32, "cpu")
    y = torch.tensor([1, 2, 131, 4, -100])
    with pytest.raises(RuntimeError, match="label out of range"):
        torch.ops.foak.linear_cross_entropy(hidden, weight, None, y, -100, 0.0, "mean", torch.float32)
    loss, lse, dh = online.forward_backward(
        hidden.detach().to(device), weight.to(device), None, y.to(device), -100, torch.ones(1, device=device), None
    )
    assert loss[2].isnan() and loss[[0, 1, 3]].isfinite().all() and loss[4] == 0
    assert dh[[0, 1, 3]].isfinite().all() and (dh[4] == 0).all()


def test_one_block_one_piece_and_explicit_switch(monkeypatch, foak_config, device):
    """Default tiles (the whole problem in one block and one piece here), chosen per call."""
    foak_config(lce_online=False)
    calls = _online_calls(monkeypatch)
    hidden, weight = _inputs(17, 12, 131, torch.bfloat16, device)
    y = _labels(17, 131, device)
    scale = torch.ones(1, device=device)
    loss, lse, dh, dw, db = kernel.linear_cross_entropy_forward_backward(
        hidden.detach(), weight, None, y, -100, 0.0, scale, True, False, False, online=True
    )
    ref = kernel.linear_cross_entropy_forward_backward(
        hidden.detach(), weight, None, y, -100, 0.0, scale, True, False, False, online=False
    )
    assert len(calls) == 1 and dw is None and db is None
    torch.testing.assert_close(loss, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref[1], rtol=1e-5, atol=1e-5)
    assert rel_err(dh, ref[2]) < TOL[torch.bfloat16]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the allocator's peak)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_live_memory_is_what_peak_bytes_says(dtype):
    """Measured: beyond its outputs the op holds one block's piece, accumulator and gathered rows, as
    peak_bytes says, and never more than BUDGET at 4× the tokens (the chunked path would hold 512 rows × vocab)."""
    n_cols, n_hidden = 32001, 256
    weight = torch.randn(n_cols, n_hidden, device="cuda", dtype=dtype) / n_hidden**0.5
    scale = torch.ones(1, device="cuda")
    peaks = []
    for n_rows in (3000, 12000):
        hidden = torch.randn(n_rows, n_hidden, device="cuda", dtype=dtype)
        y = _labels(n_rows, n_cols, "cuda", p_ignore=0.3)
        idx = (y != -100).nonzero().view(-1)
        outputs = n_rows * (8 + n_hidden * hidden.element_size())  # loss, lse (fp32), dh
        # once before: what a process allocates once (cuBLAS's workspace for a new GEMM kind) is not the op's
        online.forward_backward(hidden, weight, None, y, -100, scale, idx)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        res = online.forward_backward(hidden, weight, None, y, -100, scale, idx)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base - outputs)
        del res
        bound = online.peak_bytes(idx.numel(), n_cols, n_hidden, hidden.element_size())
        assert peaks[-1] <= bound * 1.05 + 2**20, (peaks[-1], bound)
    assert (
        max(peaks) <= online.BUDGET * 1.05 + 2**20 and peaks[1] > peaks[0]
    )  # 2 blocks under the bound, then full ones


def _captured(run):
    """(graph, outputs) of `run` recorded into a CUDA graph, after a warm-up off the default stream (as
    torch's docs ask before a capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run()
    return graph, outputs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graph capture)")
@pytest.mark.parametrize("epilogue", ["none", "softcap"])
def test_captured_in_a_cuda_graph(epilogue):
    """The path runs inside a CUDA graph capture (what mode='reduce-overhead' does around the op: no
    host-to-device copy, no sync) and the graph's replay on new hidden states gives the eager results."""
    n_rows, n_hidden, n_cols = 1000, 192, 32001
    dtype = torch.bfloat16
    weight = torch.randn(n_cols, n_hidden, device="cuda", dtype=dtype) / n_hidden**0.5
    hidden = torch.randn(n_rows, n_hidden, device="cuda", dtype=dtype)
    y = _labels(n_rows, n_cols, "cuda", p_ignore=0.3)
    idx = (y != -100).nonzero().view(-1)
    scale = torch.full((1,), 1.0 / idx.numel(), device="cuda")
    epi = kernel.Epilogue(1.0, 1.0, 30.0, False) if epilogue == "softcap" else kernel.NO_EPILOGUE
    run = lambda: online.forward_backward(hidden, weight, None, y, -100, scale, idx, epi, rows=384, cols=4096)
    graph, captured = _captured(run)
    hidden.copy_(torch.randn_like(hidden))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, run()):
        torch.testing.assert_close(got, want)  # a stale output (the capture-time inputs) would differ wholly


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graph capture)")
def test_a_captured_call_takes_the_online_path(monkeypatch, foak_config):
    """The size rule would send this small call to the chunked path; recorded into a CUDA graph it goes online."""
    calls = _online_calls(monkeypatch)
    foak_config(lce_online=None)
    hidden, weight = _inputs(300, 128, 5003, torch.bfloat16, "cuda")
    y = _labels(300, 5003, "cuda")
    scale = torch.ones(1, device="cuda")
    run = lambda: kernel.linear_cross_entropy_forward_backward(
        hidden.detach(), weight, None, y, -100, 0.0, scale, True, False, False
    )
    run()
    assert not calls  # eager: by size, chunked
    graph, captured = _captured(run)
    assert len(calls) == 1  # the captured call only: the warm-up before it is not captured, so chunked
    graph.replay()
    torch.cuda.synchronize()
    want = run()
    torch.testing.assert_close(captured[0], want[0])
    assert rel_err(captured[2], want[2]) < TOL[torch.bfloat16]


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the tiny models run on the CPU, where a GPU box has no Triton interpreter: the op takes its torch path",
)
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_lora_loss_only_step_through_the_online_path(family, small_tiles):
    """A LoRA model (frozen lm_head) compiled with backend="foak", loss only: linear_cross_entropy
    takes the online path (Gemma 2: through its final-logit softcap); loss and LoRA grads vs eager."""
    from tests.test_cross_entropy_pattern import _batch, _compare_loss_only, _counts, _lora
    from tests.models import tiny_model

    calls = _online_calls(small_tiles)
    model = _lora(tiny_model(family))
    be = _compare_loss_only(model, _batch(model))
    assert _counts(be) == {"linear_cross_entropy": 1} and calls


def test_size_rule_and_switch_pick_the_path(monkeypatch, foak_config, device):
    """Unset, the path follows the call's size (online from MIN_LOGITS rows × vocabulary or MIN_HIDDEN hidden);
    config.lce_online True / False overrides it either way; every choice gives the same numbers."""
    calls = _online_calls(monkeypatch)
    n, h = (int(v) for v in torch.randint(9, 40, (2,)))
    hidden, weight = _inputs(n, h, 131, torch.float32, device)
    y = _labels(n, 131, device)
    scale = torch.ones(1, device=device)
    results = []
    logits = n * 131
    cases = [
        (None, logits + 1, h + 1, 0),
        (None, logits, h + 1, 1),
        (None, logits + 1, h, 1),  # (switch,
        (True, logits + 1, h + 1, 1),
        (False, logits, h, 0),
    ]  # thresholds, online?)
    for switch, min_logits, min_hidden, want in cases:
        foak_config(lce_online=switch)
        monkeypatch.setattr(online, "MIN_LOGITS", min_logits)
        monkeypatch.setattr(online, "MIN_HIDDEN", min_hidden)
        before = len(calls)
        results.append(
            kernel.linear_cross_entropy_forward_backward(
                hidden.detach(), weight, None, y, -100, 0.0, scale, True, False, False
            )
        )
        assert len(calls) - before == want, (switch, min_logits, min_hidden)
    for got in results[1:]:
        torch.testing.assert_close(got[0], results[0][0], rtol=1e-5, atol=1e-5)
        assert rel_err(got[2], results[0][2]) < TOL[torch.float32]
    # recorded into a CUDA graph (no host time on replay): online whatever the size, unless switched off
    foak_config(lce_online=None)
    monkeypatch.setattr(online, "MIN_LOGITS", logits + 1)
    monkeypatch.setattr(online, "MIN_HIDDEN", h + 1)
    assert online.preferred(n, h, 131, captured=True) and not online.preferred(n, h, 131)
    foak_config(lce_online=False)
    assert not online.preferred(n, h, 131, captured=True)


def test_block_rows_fill_the_budget_in_equal_whole_tiles():
    """Rows per block by BUDGET: the fewest blocks, equal, rounded up to 64-row tiles within the bound."""
    per_row = online._bytes_per_row(128256, 2048, 2, True, None)
    assert per_row == 8192 * 2 + 2048 * 4 + 20 + 2048 * 2 + 32
    assert online.BUDGET // per_row == 1131  # bf16, hidden 2048, rows gathered
    assert online.block_rows(3080, 128256, 2048, 2) == 1088  # 3 blocks (1088, 1088, 904), not 4
    assert online.block_rows(3060, 128256, 2048, 2) == 1024  # 1024, 1024, 1012
    assert online.block_rows(12288, 128256, 2048, 2) == 1024  # 12 blocks of 1024, not 11 of 1118
    assert online.block_rows(1200, 128256, 2048, 2) == 640  # 2 blocks: 600 rounded up to a tile
    assert online.block_rows(40, 128256, 2048, 2) == 40
    assert online.BUDGET // online._bytes_per_row(128256, 4096, 2, True, None) == 792
    assert online.block_rows(3080, 128256, 4096, 2) == 640  # 5 blocks: 3080 > 4 × 768
    assert online.block_rows(50, 131, 24, 4, rows=7) == 7  # a fixed bound under a tile: equal blocks
    assert online.block_rows(50, 131, 24, 4, rows=20) == 17
    for n in (3080, 12288, 999):
        assert online.peak_bytes(n, 128256, 2048, 2) <= online.BUDGET


def test_default_blocks_vs_float64(monkeypatch, foak_config, device):
    """The default (budget) blocks, several of them in whole 64-row tiles and a short last one."""
    foak_config(lce_online=True)
    monkeypatch.setattr(online, "COLS", 37)
    n, h, vocab = 200, 8, 131
    monkeypatch.setattr(online, "BUDGET", 70 * online._bytes_per_row(vocab, h, 4, True, None))
    calls = _online_calls(monkeypatch)
    hidden, weight = _inputs(n, h, vocab, torch.float32, device)
    y = _labels(n, vocab, device)
    assert 64 < (y != -100).sum() and online.block_rows(int((y != -100).sum()), vocab, h, 4) == 64
    _check_linear_ce(hidden, weight, None, y, reduction="mean", out_dtype=torch.float32)
    assert calls
