"""torch.ops.foak.cross_entropy / linear_cross_entropy and their kernels against float64 torch."""

import pytest
import torch
import torch.nn.functional as F

import foak_compile  # noqa: F401
from foak_compile.kernels import ce_epilogue
from foak_compile.kernels import cross_entropy as kernel
from foak_compile.kernels.common import use_triton
from tests.helpers import rel_err

# gradients are stored in the logits' dtype: one rounding of values up to ~1
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _labels(n, vocab, device, ignore_index=-100, p_ignore=0.3):
    y = torch.randint(0, vocab, (n,), device=device)
    y[torch.rand(n, device=device) < p_ignore] = ignore_index
    if (y == ignore_index).all():
        y[0] = 0
    return y


def _upstream(ref):
    return torch.randn_like(ref) if ref.dim() else torch.tensor(1.0 + torch.rand(()).item(), dtype=ref.dtype)


def _check_ce(x, y, ignore_index=-100, reduction="mean", label_smoothing=0.0, out_dtype=torch.float32):
    """Loss and dlogits of the op against F.cross_entropy in float64 on the same values."""
    assert use_triton(x), "kernel path must be exercised (CUDA or TRITON_INTERPRET=1)"
    xr = x.clone().requires_grad_()
    loss, lse = torch.ops.foak.cross_entropy(xr, y, ignore_index, label_smoothing, reduction, out_dtype)
    xd = x.double().requires_grad_()
    ref = F.cross_entropy(
        xd.view(-1, x.shape[-1]),
        y.view(-1),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    ref = ref.view(y.shape) if reduction == "none" else ref
    assert loss.dtype == out_dtype and loss.shape == ref.shape and lse.dtype == torch.float32
    g = _upstream(ref)
    loss.backward(g.to(out_dtype))
    ref.backward(g)
    loss_tol = 2e-6 if out_dtype == torch.float32 else TOL[out_dtype]
    assert rel_err(loss, ref) < loss_tol
    assert xr.grad.dtype == x.dtype and xr.grad.shape == x.shape
    assert rel_err(xr.grad, xd.grad) < TOL[x.dtype]
    return loss, xr.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,vocab", [(7, 131), (37, 131), (5, 32001), (3, 128256)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_op_vs_float64(dtype, n, vocab, reduction, device):
    x = (torch.randn(n, vocab, device=device) * 4).to(dtype)
    _check_ce(x, _labels(n, vocab, device), reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_smoothing(dtype, device):
    x = (torch.randn(23, 131, device=device) * 3).to(dtype)
    for reduction in ("mean", "sum", "none"):
        _check_ce(x, _labels(23, 131, device), reduction=reduction, label_smoothing=0.1)


def test_out_dtype_and_leading_dims(device):
    """bf16 logits without an upcast: fp32 math, the loss rounded once to bf16; [B, T, V] logits."""
    x = torch.randn(3, 5, 131, device=device, dtype=torch.bfloat16)
    y = _labels(15, 131, device)
    _check_ce(x, y, out_dtype=torch.bfloat16)
    _check_ce(x, y.view(3, 5), reduction="none")


def test_ignore_index_semantics(device):
    x = torch.randn(9, 131, device=device)
    # an ignore_index inside the vocabulary ignores that class's rows
    y = torch.randint(0, 131, (9,), device=device)
    y[::3] = 5
    _check_ce(x, y, ignore_index=5)
    _check_ce(x, y, ignore_index=5, reduction="sum")
    # every label ignored: mean is NaN (0/0) like torch, sum is 0, the gradient is all zeros
    y = torch.full((9,), -100, device=device)
    for reduction, expect in (("mean", float("nan")), ("sum", 0.0)):
        xr = x.clone().requires_grad_()
        loss, _ = torch.ops.foak.cross_entropy(xr, y, -100, 0.0, reduction, torch.float32)
        torch.testing.assert_close(loss, torch.tensor(expect, device=device), equal_nan=True)
        loss.backward()
        assert (xr.grad == 0).all()
    loss, _ = torch.ops.foak.cross_entropy(x, y, -100, 0.0, "none", torch.float32)
    assert (loss == 0).all()


@pytest.mark.parametrize("bad", [131, 1000, -1, -99])
def test_out_of_range_labels_raise(bad, device):
    # The raise is checked on CPU: on CUDA it is a device-side assert, which carries no message
    # and leaves the process's CUDA context unusable for every later test.
    x, y = torch.randn(4, 131), torch.tensor([1, bad, 2, -100])
    with pytest.raises(RuntimeError, match="label out of range"):
        torch.ops.foak.cross_entropy(x, y, -100, 0.0, "mean", torch.float32)
    with pytest.raises(RuntimeError, match="label out of range"):
        torch.ops.foak.linear_cross_entropy(
            torch.randn(4, 8), torch.randn(131, 8), None, y, -100, 0.0, "sum", torch.float32
        )
    x, y = x.to(device), y.to(device)
    # the kernel itself never reads out of bounds and marks the row NaN
    loss, _ = torch.empty(4, device=device), torch.empty(4, device=device)
    kernel._forward_rows(x, y, -100, 0.0, loss, _)
    assert loss[1].isnan() and loss[[0, 2]].isfinite().all() and loss[3] == 0


@pytest.mark.parametrize("block_v", [16, 32, 128])
def test_many_vocab_blocks_and_minus_inf(block_v, device):
    """Online logsumexp across blocks, including blocks that are entirely -inf (masked vocab)."""
    x = torch.randn(11, 131, device=device) * 5
    x[:, :40] = float("-inf")
    x[3, 100:] = float("-inf")
    y = torch.randint(40, 100, (11,), device=device)
    y[7] = -100
    loss, lse = kernel.cross_entropy_forward(x, y, -100, 0.0, block_v=block_v)
    ref = F.cross_entropy(x.double(), y, reduction="none")
    assert rel_err(loss, ref) < 2e-6
    keep = y != -100
    assert rel_err(lse[keep], torch.logsumexp(x.double(), -1)[keep]) < 2e-6
    scale = torch.rand(11, device=device)
    dx = kernel.cross_entropy_backward(x, y, lse, scale, -100, 0.0, block_v=block_v)
    xd = x.double().requires_grad_()
    F.cross_entropy(xd, y, reduction="none").backward(scale.double())
    assert rel_err(dx, xd.grad) < 2e-6 and (dx[:, :40] == 0).all()


@pytest.mark.parametrize("programs", [1, 4])
def test_rows_per_program_and_gradient_in_place(programs, device):
    """A grid smaller than the rows (each program strides over several), and the forward that
    writes the gradient over the logits, against the separate backward kernel."""
    x = torch.randn(11, 300, device=device, dtype=torch.bfloat16) * 3
    y = _labels(11, 300, device)
    loss, lse = kernel.cross_entropy_forward(x, y, -100, 0.1)
    scale = torch.full((1,), 0.3, device=device)
    want = kernel.cross_entropy_backward(x, y, lse, scale, -100, 0.1)
    g, loss2, lse2 = x.clone(), torch.empty_like(loss), torch.empty_like(lse)
    kernel._forward_rows(g, y, -100, 0.1, loss2, lse2, grad_scale=scale, programs=programs, block_v=128)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(lse2, lse)
    torch.testing.assert_close(g, want)


def test_non_contiguous_logits(device):
    base = torch.randn(2, 9, 131, device=device, dtype=torch.bfloat16)
    x = base[:, :-1, :]  # the old HF shift: rows are not evenly strided
    assert not x.is_contiguous()
    _check_ce(x, _labels(16, 131, device))


def test_torch_path_agrees_with_kernel(device):
    x = torch.randn(13, 131, device=device, dtype=torch.bfloat16)
    y = _labels(13, 131, device)
    loss, lse = kernel.cross_entropy_forward(x, y, -100, 0.05)
    lse_t = torch.empty_like(lse)
    loss_t = kernel._torch_losses(x, y, -100, 0.05, lse_t)
    torch.testing.assert_close(loss_t, loss)
    torch.testing.assert_close(lse_t, lse)
    scale = torch.rand(13, device=device)
    torch.testing.assert_close(
        kernel._torch_grad(x, y, lse, scale, -100, 0.05), kernel.cross_entropy_backward(x, y, lse, scale, -100, 0.05)
    )


# ---------------------------------------------------------------------------------------------
# lm_head + cross-entropy


def _epilogue_f64(z, epi):
    z = z * epi.scale / epi.divisor
    return torch.tanh(z / epi.softcap) * epi.softcap if epi.softcap else z


def _check_linear_ce(
    hidden,
    weight,
    bias,
    y,
    reduction="mean",
    label_smoothing=0.0,
    out_dtype=torch.float32,
    op=None,
    epi=kernel.NO_EPILOGUE,
    grad_tol=None,
):
    """Loss and grads against F.cross_entropy(epi(F.linear(...))) in float64 on the same input
    values; the grads' relative errors (each below grad_tol, default twice the dtype's TOL;
    "eager": twice eager's own error on the same inputs and upstream gradient, at least 3×TOL)."""

    def leaves(cast):
        return [
            cast(t.detach()).requires_grad_(t.requires_grad) if t is not None else None for t in (hidden, weight, bias)
        ]

    args, ref_args = leaves(torch.clone), leaves(torch.Tensor.double)
    op = op or torch.ops.foak.linear_cross_entropy
    loss, _ = op(*args, y, -100, label_smoothing, reduction, out_dtype, *epi)
    logits = _epilogue_f64(F.linear(*ref_args), epi)
    ref = F.cross_entropy(
        logits.view(-1, weight.shape[0]),
        y.view(-1),
        ignore_index=-100,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    ref = ref.view(y.shape) if reduction == "none" else ref
    g = _upstream(ref)
    loss.backward(g.to(out_dtype))
    ref.backward(g)
    tol = TOL[hidden.dtype]
    eager_tols = None
    if grad_tol == "eager":  # eager's steps (linear, epilogue) round in the inputs' dtype
        eager_args = leaves(torch.clone)
        e = F.cross_entropy(
            _epilogue_f64(F.linear(*eager_args), epi).float().view(-1, weight.shape[0]),
            y.view(-1),
            ignore_index=-100,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )
        (e.view(y.shape) if reduction == "none" else e).backward(g.float())
        eager_tols = [
            max(3 * tol, 2 * rel_err(a.grad, b.grad))
            for a, b in zip(eager_args, ref_args)
            if b is not None and b.requires_grad
        ]
        grad_tol = None
    assert loss.dtype == out_dtype and rel_err(loss, ref) < (1e-5 if hidden.dtype == torch.float32 else 1e-2)
    errors = []
    for ours, theirs in zip(args, ref_args):
        if theirs is None:
            continue
        if not theirs.requires_grad:
            assert ours.grad is None
            continue
        assert ours.grad.dtype == ours.dtype and ours.grad.shape == ours.shape
        errors.append(rel_err(ours.grad, theirs.grad))
        limit = eager_tols[len(errors) - 1] if eager_tols else (grad_tol or 2 * tol)
        assert errors[-1] < limit, (errors, limit, reduction, label_smoothing)
    return errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [None, 131 * 4, 131 * 10])
@pytest.mark.parametrize("compact", [True, False])
def test_linear_cross_entropy_vs_float64(dtype, chunk_elements, compact, device, monkeypatch):
    """Gradients taken in the forward: one chunk; several chunks (with a shorter tail), the weight
    grad then summed in its own dtype; ignored rows dropped before the GEMMs, or run as zeros."""
    if chunk_elements:
        monkeypatch.setattr(kernel, "CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(kernel, "COMPACT", compact)
    n, h, vocab = 19, 24, 131
    hidden = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, h, device=device) / h**0.5).to(dtype).requires_grad_()
    bias = torch.randn(vocab, device=device, dtype=dtype, requires_grad=True)
    y = _labels(n, vocab, device)
    _check_linear_ce(hidden, weight, None, y)
    _check_linear_ce(hidden, weight, bias, y, reduction="sum", label_smoothing=0.1)


EPILOGUES = {
    "softcap": kernel.Epilogue(softcap=3.0, rounded=True),
    "scale": kernel.Epilogue(scale=0.37, rounded=True),
    "divide, softcap": kernel.Epilogue(divisor=1.7, softcap=2.5, rounded=True),
    "negative scale, softcap, fp32 steps": kernel.Epilogue(scale=-1.3, softcap=4.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(EPILOGUES))
@pytest.mark.parametrize("op", ["linear_cross_entropy", "linear_cross_entropy_recompute"])
def test_linear_cross_entropy_epilogue_vs_float64(dtype, name, op, device, monkeypatch):
    """Scale and softcap applied to each logit inside the kernels, forward and backward, over
    several chunks, with ignored rows and label smoothing."""
    monkeypatch.setattr(kernel, "CHUNK_ELEMENTS", 131 * 4)
    n, h, vocab = 19, 24, 131
    epi = EPILOGUES[name]
    hidden = (torch.randn(n, h, device=device) * 2).to(dtype).requires_grad_()
    weight = torch.randn(vocab, h, device=device).to(dtype).requires_grad_()  # logits ~ ±10: the cap bites
    for reduction, smoothing in (("mean", 0.0), ("sum", 0.1), ("none", 0.0)):
        y = _labels(n, vocab, device)
        # eager's own steps round too (rounded, half dtypes): allow twice its error on the same inputs
        grad_tol = "eager" if dtype != torch.float32 and epi.rounded else None
        _check_linear_ce(
            hidden,
            weight,
            None,
            y,
            reduction=reduction,
            label_smoothing=smoothing,
            op=getattr(torch.ops.foak, op),
            epi=epi,
            grad_tol=grad_tol,
        )


def test_epilogue_rounds_like_eager_in_bf16(device):
    """With `rounded`, each step is rounded to bf16 as eager rounds it: the loss is eager's to fp32
    rounding, not the float64 value (bf16 steps move it by ~1e-4 here)."""
    hidden = torch.randn(61, 24, device=device, dtype=torch.bfloat16) * 2
    weight = torch.randn(131, 24, device=device, dtype=torch.bfloat16)
    y = _labels(61, 131, device)
    eager = F.cross_entropy((torch.tanh(F.linear(hidden, weight) / 1.7 / 3.0) * 3.0).float(), y, reduction="sum")
    epi = kernel.Epilogue(divisor=1.7, softcap=3.0, rounded=True)
    ours, _ = torch.ops.foak.linear_cross_entropy(hidden, weight, None, y, -100, 0.0, "sum", torch.float32, *epi)
    assert rel_err(ours, eager) < 1e-6
    exact, _ = torch.ops.foak.linear_cross_entropy(
        hidden, weight, None, y, -100, 0.0, "sum", torch.float32, *epi._replace(rounded=False)
    )
    # the unrounded epilogue is measurably further off (a random draw has put it as close as 6e-6)
    assert rel_err(exact, eager) > max(2e-6, 4 * rel_err(ours, eager))


def test_epilogue_divides_as_torch_does_on_cuda(device, monkeypatch):
    """On CUDA torch divides by a Python number as x·(1/c), 1/c in fp32: the kernels do the same
    there (forced here on any device), and an IEEE division on the CPU."""
    monkeypatch.setattr(ce_epilogue, "_divides_by_reciprocal", lambda t: True)
    x = torch.randn(13, 131, device=device, dtype=torch.bfloat16) * 8
    y = _labels(13, 131, device)
    epi = kernel.Epilogue(divisor=1.7, softcap=3.3, rounded=True)
    loss, lse = torch.empty(13, device=device), torch.empty(13, device=device)
    kernel._forward_rows(x, y, -100, 0.0, loss, lse, epi=epi)
    r_div, r_cap = ce_epilogue._fp32_reciprocal(1.7), ce_epilogue._fp32_reciprocal(3.3)
    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    v = bf(bf(torch.tanh(bf(bf(x.float() * r_div) * r_cap))) * 3.3)
    ref = F.cross_entropy(v, y, ignore_index=-100, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)


def test_epilogue_torch_path_agrees_with_kernel(device):
    x = torch.randn(13, 131, device=device, dtype=torch.bfloat16) * 8
    y = _labels(13, 131, device)
    epi = kernel.Epilogue(scale=0.9, divisor=1.1, softcap=5.0, rounded=True)
    loss, lse = torch.empty(13, device=device), torch.empty(13, device=device)
    kernel._forward_rows(x, y, -100, 0.1, loss, lse, epi=epi)
    lse_t = torch.empty_like(lse)
    torch.testing.assert_close(kernel._torch_losses(x, y, -100, 0.1, lse_t, epi), loss)
    torch.testing.assert_close(lse_t, lse)
    scale = torch.rand(13, device=device)
    out = torch.empty_like(x)
    torch.testing.assert_close(
        kernel._torch_grad(x, y, lse, scale, -100, 0.1, epi),
        kernel._backward_rows(x, y, lse, scale, -100, 0.1, out, epi=epi),
    )


def test_kernel_tanh_is_accurate(device):
    """The kernels' tanh (no tl.tanh in every Triton): a few fp32 ulp from torch's over the range."""
    import triton
    import triton.language as tl

    @triton.jit
    def tanh_kernel(X, Y, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(Y + i, ce_epilogue._tanh(tl.load(X + i)))

    special = torch.tensor(
        [float("nan"), 0.0, -0.0, 0.25, -0.25, 1e-30, 88.0, -90.0, float("inf"), float("-inf")], device=device
    )
    x = torch.cat([special] + [torch.randn(2045, device=device) * s for s in (0.01, 0.3, 3.0, 30.0)])
    x = torch.cat([x, torch.linspace(-1, 1, 8192 - x.numel(), device=device)])
    y = torch.empty_like(x)
    tanh_kernel[(1,)](x, y, N=x.numel())
    assert y[0].isnan() and not y[1:].isnan().any()
    ref = torch.tanh(x[1:].double())
    assert ((y[1:].double() - ref).abs() <= 4 * torch.finfo(torch.float32).eps * ref.abs() + 1e-45).all()


def test_epilogue_arguments_are_checked(device):
    h, w, y = torch.randn(3, 8, device=device), torch.randn(131, 8, device=device), _labels(3, 131, device)
    for bad in ((0.0, 1.0, 0.0), (1.0, float("inf"), 0.0), (1.0, 1.0, -2.0)):
        with pytest.raises(ValueError, match="scale and divisor must be finite and nonzero"):
            torch.ops.foak.linear_cross_entropy(h, w, None, y, -100, 0.0, "mean", torch.float32, *bad, False)


def test_chunk_rows_policy():
    """About as many logits per chunk as hidden values, a power of two of rows, within the bounds."""
    assert kernel.chunk_rows(16384, 128256, 4096) == 512  # 523 rows' worth, rounded down
    assert kernel.chunk_rows(65536, 128256, 4096) == 2048
    assert kernel.chunk_rows(4096, 256000, 2048) == kernel.CHUNK_ROWS_MIN
    assert kernel.chunk_rows(10**6, 32000, 8192) == kernel.CHUNK_ROWS_MAX
    assert kernel.chunk_rows(100, 128256, 4096) == 100
    assert kernel.chunk_rows(4096, 1000, 64, chunk_elements=1000 * 300) == 256


def test_linear_cross_entropy_large_vocab(device, monkeypatch):
    monkeypatch.setattr(kernel, "CHUNK_ELEMENTS", 32001 * 3)
    hidden = torch.randn(2, 4, 16, device=device, requires_grad=True)  # [B, T, H] hidden
    weight = torch.randn(32001, 16, device=device, requires_grad=True)
    _check_linear_ce(hidden, weight, None, _labels(8, 32001, device).view(2, 4), reduction="none")


def test_linear_cross_entropy_frozen_weight(device, monkeypatch):
    """LoRA: the lm_head is frozen, only the hidden states get a gradient (or the bias too)."""
    monkeypatch.setattr(kernel, "CHUNK_ELEMENTS", 131 * 5)
    hidden = torch.randn(17, 12, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(131, 12, device=device, dtype=torch.bfloat16)
    bias = torch.randn(131, device=device, dtype=torch.bfloat16)
    _check_linear_ce(hidden, weight, bias, _labels(17, 131, device))
    _check_linear_ce(hidden, weight, bias.requires_grad_(), _labels(17, 131, device), reduction="sum")
    _check_linear_ce(hidden.detach(), weight, bias, _labels(17, 131, device), label_smoothing=0.1)
    bias.requires_grad_(False)
    dh, dw, db = kernel.linear_cross_entropy_backward(
        torch.ones(1, device=device),
        hidden.detach(),
        weight,
        bias,
        _labels(17, 131, device),
        torch.zeros(17, device=device),
        -100,
        0.0,
        True,
        False,
        False,
    )
    assert dh.shape == hidden.shape and dw is None and db is None


def test_linear_cross_entropy_all_ignored(device):
    hidden = torch.randn(6, 8, device=device, requires_grad=True)
    weight = torch.randn(131, 8, device=device, requires_grad=True)
    y = torch.full((6,), -100, device=device)
    loss, _ = torch.ops.foak.linear_cross_entropy(hidden, weight, None, y, -100, 0.0, "mean", torch.float32)
    assert loss.isnan()
    loss.backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("compact", [True, False])
def test_recompute_path_vs_float64(reduction, compact, device, monkeypatch):
    """The op whose backward recomputes the logits (reduction 'none', graphs without gradients),
    with gradients through it for every reduction, over several chunks."""
    monkeypatch.setattr(kernel, "CHUNK_ELEMENTS", 131 * 4)
    monkeypatch.setattr(kernel, "COMPACT", compact)
    hidden = torch.randn(19, 24, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(131, 24, device=device) / 24**0.5).to(torch.bfloat16).requires_grad_()
    bias = torch.randn(131, device=device, dtype=torch.bfloat16, requires_grad=True)
    _check_linear_ce(
        hidden,
        weight,
        bias,
        _labels(19, 131, device),
        reduction=reduction,
        label_smoothing=0.1,
        op=torch.ops.foak.linear_cross_entropy_recompute,
    )


@pytest.mark.slow
def test_weight_grad_summed_in_bf16_over_many_chunks(device, monkeypatch):
    """dW accumulated in bf16 over 15 chunks: one rounding per chunk, so its error grows about as
    √chunks × eager's single rounding (~0.009 here against 0.003), still within tolerance."""
    monkeypatch.setattr(kernel, "CHUNK_ELEMENTS", 1000 * 24)
    hidden = torch.randn(400, 32, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(1000, 32, device=device) / 32**0.5).to(torch.bfloat16).requires_grad_()
    y = _labels(400, 1000, device, p_ignore=0.1)
    for reduction in ("sum", "mean"):
        _check_linear_ce(hidden, weight, None, y, reduction=reduction)


def _count_calls(monkeypatch, names):
    calls = []
    for name in names:

        def counted(*args, _fn=getattr(kernel, name), _name=name, **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setattr(kernel, name, counted)
    return calls


def test_composite_picks_the_path(device, monkeypatch):
    """Gradients wanted of a mean/sum: one fused forward, no recompute; otherwise lse is kept and
    only a backward (reduction 'none') recomputes the logits."""
    calls = _count_calls(
        monkeypatch,
        ["linear_cross_entropy_forward", "linear_cross_entropy_forward_backward", "linear_cross_entropy_backward"],
    )
    h = torch.randn(9, 8, device=device, requires_grad=True)
    w = torch.randn(131, 8, device=device, requires_grad=True)
    y = _labels(9, 131, device)
    op = torch.ops.foak.linear_cross_entropy
    for reduction in ("mean", "sum"):
        op(h, w, None, y, -100, 0.0, reduction, torch.float32)[0].backward()
    assert calls == ["linear_cross_entropy_forward_backward"] * 2
    calls.clear()
    with torch.no_grad():
        op(h, w, None, y, -100, 0.0, "mean", torch.float32)
    op(h.detach(), w.detach(), None, y, -100, 0.0, "sum", torch.float32)
    assert calls == ["linear_cross_entropy_forward"] * 2
    calls.clear()
    op(h, w, None, y, -100, 0.0, "none", torch.float32)[0].sum().backward()
    assert calls == ["linear_cross_entropy_forward", "linear_cross_entropy_backward"]


def test_double_backward_raises(device):
    h = torch.randn(9, 8, device=device, requires_grad=True)
    w = torch.randn(131, 8, device=device, requires_grad=True)
    loss, _ = torch.ops.foak.linear_cross_entropy(h, w, None, _labels(9, 131, device), -100, 0.0, "mean", torch.float32)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, (h, w), create_graph=True)


def test_nan_logits_give_nan_loss(device):
    x = torch.randn(3, 5000, device=device)
    x[1, 4321] = float("nan")
    y = torch.tensor([0, 1, 2], device=device)
    loss, lse = kernel.cross_entropy_forward(x, y, -100, 0.0)
    assert loss[1].isnan() and lse[1].isnan() and loss[[0, 2]].isfinite().all()


def test_fake_impls_match_real():
    y = torch.tensor([3, -100, 7, 130, 0])
    torch.library.opcheck(
        torch.ops.foak.cross_entropy.default,
        (torch.randn(5, 131, requires_grad=True), y, -100, 0.1, "mean", torch.float32),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
    torch.library.opcheck(
        torch.ops.foak.linear_cross_entropy.default,
        (
            torch.randn(5, 8, requires_grad=True),
            torch.randn(131, 8, requires_grad=True),
            torch.randn(131, requires_grad=True),
            y,
            -100,
            0.0,
            "none",
            torch.float32,
        ),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
    for op, extra in (
        (torch.ops.foak.linear_cross_entropy_fused.default, ("mean", torch.float32, True, True, True)),
        (torch.ops.foak.linear_cross_entropy_recompute.default, ("sum", torch.float32)),
    ):
        torch.library.opcheck(
            op,
            (
                torch.randn(5, 8, requires_grad=True),
                torch.randn(131, 8, requires_grad=True),
                torch.randn(131, requires_grad=True),
                y,
                -100,
                0.1,
                *extra,
            ),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
        )
