"""Bad and unusual inputs to each foak op, called directly and through the backend: empty
tensors, one row, very long rows, non-contiguous and transposed inputs, mixed dtypes, all-ignored
and out-of-range labels, NaN/inf. Each gives what torch eager gives (value or error class), or
the documented fallback asserted here (see README, Robustness).

Rows are kept few so that the Triton interpreter stays fast on CPU."""

import copy

import pytest
import torch
import torch.nn.functional as F

import foak_compile
from foak_compile.kernels import cross_entropy as ce_kernel
from foak_compile.kernels import rms_norm as rms_kernel

NAN, INF = float("nan"), float("inf")
# NaN/inf inputs (and eps = 0) make numpy warn inside the Triton interpreter: expected here
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def _leaf(t, grad=True):
    return t.detach().clone().requires_grad_(grad)


def _close(a, b, tol=1e-5, **kw):
    """Values (NaN where torch has NaN) and dtype of `b`, compared in float64."""
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True, **kw)


# ---------------------------------------------------------------------------------------------
# rms_norm(x, weight, eps, mid_dtype, out_dtype)


def _rms_eager(x, w, eps=1e-6, mid=None, out=None):
    """The model's own formula (Llama spelling) with float64 statistics, autograd through torch."""
    xf = x.double()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if mid is not None:
        n = n.to(mid)
    y = n * w if w is not None else n
    return y.to(out) if out is not None else y


def _check_rms(x, w, mid=None, out=torch.float32, dy=None, tol=1e-5, eps=1e-6):
    """Forward and dx, dw of the op against eager on the same values (NaN where eager has NaN)."""
    xa, wa = _leaf(x), (_leaf(w) if w is not None else None)
    y = torch.ops.foak.rms_norm(xa, wa, eps, mid, out)
    xb, wb = _leaf(x), (_leaf(w) if w is not None else None)
    ref = _rms_eager(xb, wb, eps, mid, out)
    assert y.dtype == ref.dtype == out and y.is_contiguous()  # the fake promises contiguous
    _close(y, ref, tol)
    dy = torch.randn(ref.shape, dtype=out) if dy is None else dy
    y.backward(dy)
    ref.backward(dy)
    assert xa.grad.dtype == x.dtype
    _close(xa.grad, xb.grad, tol * 10)
    if w is not None:
        assert wa.grad.dtype == w.dtype
        _close(wa.grad, wb.grad, tol * 10)
    return y, xa.grad


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8), (3, 0), (1, 8), (8,)])
def test_rms_norm_empty_and_single_rows(shape):
    """No rows: empty outputs and a zero dW (it used to be an unwritten buffer); no columns: no
    [-1, 0] reshape error; one row, and a 1-D input, like any other."""
    x, w = torch.randn(shape), torch.randn(shape[-1])
    _, dx = _check_rms(x, w)
    if x.numel() == 0:
        assert dx.shape == x.shape


@pytest.mark.parametrize("rows", [1, 3, 70])
def test_rms_norm_eps_zero(rows):
    """eps = 0 is allowed: the rows of a tile past the end once gave rsqrt(0) = inf and put
    0 * inf = NaN into every dW column (found by the fuzz test)."""
    _check_rms(torch.randn(rows, 6), torch.randn(6), eps=0.0)


@pytest.mark.parametrize(
    "hidden, dtype", [(16384, torch.float32), (16384, torch.bfloat16), (32768, torch.float32), (40000, torch.float32)]
)
def test_rms_norm_huge_rows(hidden, dtype):
    """Up to 32768 the kernel holds a whole row; longer rows take the torch path (documented)."""
    x, w = torch.randn(2, hidden, dtype=dtype), torch.rand(hidden, dtype=dtype) + 0.5
    assert rms_kernel.kernel_supported(x) == (hidden <= rms_kernel.MAX_BLOCK_H)
    _check_rms(
        x, w, mid=dtype if dtype != torch.float32 else None, out=dtype, tol=1e-5 if dtype == torch.float32 else 2e-2
    )


@pytest.mark.parametrize("layout", ["transposed", "strided-rows", "strided-cols", "3d-transposed", "expanded"])
def test_rms_norm_non_contiguous(layout):
    x = {
        "transposed": lambda: torch.randn(40, 3).t(),
        "strided-rows": lambda: torch.randn(6, 40)[::2],
        "strided-cols": lambda: torch.randn(3, 80)[:, ::2],
        "3d-transposed": lambda: torch.randn(2, 3, 40).transpose(0, 1),
        "expanded": lambda: torch.randn(3, 1, 40).expand(3, 2, 40),
    }[layout]()
    assert not x.is_contiguous()
    w = torch.randn(80)[::2]  # a strided weight too
    _check_rms(x, w)


@pytest.mark.parametrize("upstream", ["row-broadcast", "scalar-broadcast"])
def test_rms_norm_expanded_upstream_gradient(upstream):
    """`y.sum()`-like upstream gradients arrive expanded (stride 0)."""
    x, w = torch.randn(3, 40), torch.randn(40)
    dy = torch.randn(40).expand(3, 40) if upstream == "row-broadcast" else torch.ones(()).expand(3, 40)
    _check_rms(x, w, dy=dy)


@pytest.mark.parametrize(
    "x_dtype, w_dtype, mid, out",
    [
        (torch.bfloat16, torch.float32, torch.bfloat16, torch.float32),  # Llama, bf16 acts + fp32 weight
        (torch.float32, torch.bfloat16, None, torch.float32),
        (torch.float16, torch.bfloat16, torch.float16, torch.float32),
        (torch.bfloat16, None, None, torch.bfloat16),
    ],
)
def test_rms_norm_mixed_dtypes(x_dtype, w_dtype, mid, out):
    x = torch.randn(3, 40, dtype=x_dtype)
    w = torch.randn(40, dtype=w_dtype) if w_dtype is not None else None
    _check_rms(x, w, mid=mid, out=out, tol=1e-5 if mid is None and x_dtype == torch.float32 else 2e-2)


def test_rms_norm_float64_is_computed_in_fp32():
    """Documented: the op computes statistics in fp32 whatever the input (float64 takes the
    torch path, which does so too); the pattern never rewrites a float64 norm."""
    x, w = torch.randn(3, 40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    y, _ = _check_rms(x, w, out=torch.float64, tol=1e-6)
    exact = _rms_eager(x, w)
    assert (y - exact).abs().max() > 0  # not float64-exact: fp32 statistics


def test_rms_norm_nan_and_inf_propagate_like_torch():
    """A NaN poisons its row (and that row's gradient), an inf gives NaN at the inf and 0
    elsewhere in its row; other rows are untouched."""
    x = torch.randn(5, 24)
    x[1, 3], x[2, 5], x[3, 0] = NAN, INF, -INF
    y, dx = _check_rms(x, torch.randn(24))
    assert y[1].isnan().all() and y[[0, 4]].isfinite().all()
    assert y[2, 5].isnan() and (y[2, :5] == 0).all()
    assert dx[[0, 4]].isfinite().all()


def test_rms_norm_through_the_backend_on_unusual_inputs():
    """nn.RMSNorm compiled: an empty batch, a transposed input, NaN rows: matched, same as eager."""
    norm = torch.nn.RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(24) + 0.5)
    for x in (torch.randn(0, 24), torch.randn(24, 5).t(), torch.randn(4, 24).index_fill_(0, torch.tensor([2]), NAN)):
        torch._dynamo.reset()
        ref_norm = copy.deepcopy(norm)
        be = foak_compile.backend(inner="aot_eager")
        xa, xb = _leaf(x), _leaf(x)
        y, ref = torch.compile(norm, backend=be)(xa), ref_norm(xb)
        _close(y, ref)
        dy = torch.randn_like(ref)
        y.backward(dy)
        ref.backward(dy)
        _close(xa.grad, xb.grad, 1e-4)
        _close(norm.weight.grad, ref_norm.weight.grad, 1e-4)
        norm.weight.grad = None
        assert be.reports[0].counts() == {"rms_norm": 1}


# ---------------------------------------------------------------------------------------------
# rope(q, k, cos, sin, unsqueeze_dim) / rope_one(x, cos, sin, unsqueeze_dim)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rope_eager(x, cos, sin, dim):
    c, s = cos.unsqueeze(dim), sin.unsqueeze(dim)
    return x * c + _rotate_half(x) * s


def _check_rope(q, k, cos, sin, dim):
    """Both outputs and both gradients against HF's formula in eager, on the same dtypes: exact
    (the op reproduces eager's roundings), NaN where eager has NaN."""
    qa, ka, qb, kb = _leaf(q), _leaf(k), _leaf(q), _leaf(k)
    yq, yk = torch.ops.foak.rope(qa, ka, cos, sin, dim)
    rq, rk = _rope_eager(qb, cos, sin, dim), _rope_eager(kb, cos, sin, dim)
    assert (yq.dtype, yk.dtype) == (rq.dtype, rk.dtype)
    torch.testing.assert_close(yq, rq, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(yk, rk, rtol=0, atol=0, equal_nan=True)
    gq, gk = torch.randn_like(rq), torch.randn_like(rk)
    torch.autograd.backward([yq, yk], [gq, gk])
    torch.autograd.backward([rq, rk], [gq, gk])
    for a, b in ((qa.grad, qb.grad), (ka.grad, kb.grad)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    return yq, yk


def _rope_inputs(b, hq, hk, s, d, dim=1, dtype=torch.float32, cos_dtype=None, cos_batch=None):
    shape = (lambda h: (b, h, s, d)) if dim == 1 else (lambda h: (b, s, h, d))
    cb = b if cos_batch is None else cos_batch
    ang = torch.rand(cb, s, d) * 6
    cd = cos_dtype or dtype
    return (
        torch.randn(shape(hq), dtype=dtype),
        torch.randn(shape(hk), dtype=dtype),
        ang.cos().to(cd),
        ang.sin().to(cd),
    )


@pytest.mark.parametrize(
    "b, hq, hk, s, d",
    [
        (0, 4, 2, 3, 8),
        (2, 4, 2, 0, 8),
        (2, 0, 2, 3, 8),
        (2, 0, 0, 3, 8),
        (2, 4, 2, 3, 0),  # empty
        (1, 1, 1, 1, 8),
        (1, 1, 1, 1, 2),
        (1, 3, 1, 2, 6),  # one token, one head, head_dim 2
    ],
)
def test_rope_empty_and_tiny(b, hq, hk, s, d):
    _check_rope(*_rope_inputs(b, hq, hk, s, d), 1)


@pytest.mark.parametrize("hq, hk, d", [(1, 1, 16384), (128, 8, 128)])
def test_rope_huge_rows(hq, hk, d):
    """head_dim 16384, and 128 heads of 128 (a hidden size of 16384) for one token."""
    _check_rope(*_rope_inputs(1, hq, hk, 1, d, dim=2, dtype=torch.bfloat16), 2)


def test_rope_non_contiguous_inputs():
    """HF's q/k: a fused projection viewed [B, S, H, D], split and transposed; cos/sin expanded
    over the batch (stride 0) and strided along head_dim."""
    b, s, hq, hk, d = 2, 5, 4, 2, 8
    qk = torch.randn(b, s, hq + hk, d)
    q, k = qk[:, :, :hq].transpose(1, 2), qk[:, :, hq:].transpose(1, 2)
    ang = torch.rand(1, s, 2 * d)
    cos = ang.cos()[..., ::2].expand(b, s, d)
    sin = ang.sin()[..., ::2].expand(b, s, d)
    assert not (q.is_contiguous() or k.is_contiguous() or cos.is_contiguous())
    _check_rope(q, k, cos, sin, 1)


@pytest.mark.parametrize(
    "q_dtype, k_dtype, cos_dtype",
    [
        (torch.bfloat16, torch.bfloat16, torch.float32),  # fp32 tables with bf16 activations: fp32 out
        (torch.bfloat16, torch.float32, torch.bfloat16),
        (torch.float16, torch.float16, torch.bfloat16),  # promotes to fp32
        (torch.float64, torch.float64, torch.float64),  # torch path (the kernel has no fp64)
    ],
)
def test_rope_mixed_dtypes(q_dtype, k_dtype, cos_dtype):
    q, _, cos, sin = _rope_inputs(2, 4, 2, 3, 8, cos_dtype=cos_dtype, dtype=q_dtype)
    k = torch.randn(2, 2, 3, 8, dtype=k_dtype)
    _check_rope(q, k, cos, sin, 1)


def test_rope_documented_errors():
    """cos and sin of different dtypes (eager would promote), an odd head_dim, or cos/sin that
    are not [B or 1, S, D]: a ValueError, never a misread. The pattern never produces these."""
    q, k, cos, sin = _rope_inputs(2, 4, 2, 3, 8)
    with pytest.raises(ValueError, match="must share a dtype"):
        torch.ops.foak.rope(q, k, cos, sin.double(), 1)
    q5, k5, cos5, sin5 = _rope_inputs(2, 4, 2, 3, 5)
    with pytest.raises(ValueError, match="cannot rotate"):
        torch.ops.foak.rope_one(q5, cos5, sin5, 1)
    with pytest.raises(ValueError, match="cos/sin must both be"):
        torch.ops.foak.rope(q, k, cos[0], sin[0], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_nan_and_inf_propagate_like_torch(dtype):
    q, k, cos, sin = _rope_inputs(2, 4, 2, 3, 8, dtype=dtype)
    q[0, 1, 2, 3], k[1, 0, 0, 7], cos[0, 2, 1], sin[1, 1, 6] = NAN, INF, -INF, NAN
    yq, yk = _check_rope(q, k, cos, sin, 1)
    assert yq.isnan().any() and yk.isnan().any() and yq.isfinite().any()


def test_rope_through_the_backend_with_one_token_and_nan():
    """HF-style q/k rotation compiled: a single token, and NaNs in q, give eager's values."""

    def fn(q, k, cos, sin):
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s

    for s in (1, 4):
        torch._dynamo.reset()
        q, k, cos, sin = _rope_inputs(2, 4, 2, s, 8)
        q[0, 0, 0, 0] = NAN
        be = foak_compile.backend(inner="aot_eager")
        qa, ka, qb, kb = _leaf(q), _leaf(k), _leaf(q), _leaf(k)
        out, ref = torch.compile(fn, backend=be)(qa, ka, cos, sin), fn(qb, kb, cos, sin)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        g = [torch.randn_like(r) for r in ref]
        torch.autograd.backward(out, g)
        torch.autograd.backward(ref, g)
        torch.testing.assert_close(qa.grad, qb.grad, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(ka.grad, kb.grad, rtol=0, atol=0, equal_nan=True)
        assert be.reports[0].counts() == {"rope": 1}


# ---------------------------------------------------------------------------------------------
# cross_entropy(logits, labels, ignore_index, label_smoothing, reduction, out_dtype)
# linear_cross_entropy(hidden, weight, bias, labels, ignore_index, label_smoothing, reduction, out_dtype)


def _upstream(ref):
    return torch.randn(ref.shape) if ref.dim() else torch.tensor(1.7)


def _check_ce(x, y, reduction="mean", ignore_index=-100, smoothing=0.0, tol=1e-5):
    """Loss and dlogits of the op against F.cross_entropy in float64 (NaN where torch has NaN)."""
    xa, xb = _leaf(x), _leaf(x)
    loss, _ = torch.ops.foak.cross_entropy(xa, y, ignore_index, smoothing, reduction, torch.float32)
    ref = F.cross_entropy(
        xb.double().flatten(0, -2),
        y.reshape(-1),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=smoothing,
    )
    ref = ref.view(y.shape) if reduction == "none" else ref
    _close(loss, ref, tol)
    g = _upstream(ref)
    loss.backward(g)
    ref.backward(g.double())
    assert xa.grad.dtype == x.dtype and xa.grad.shape == x.shape
    _close(xa.grad, xb.grad, tol)
    return loss, xa.grad


def _check_lce(h, w, b, y, reduction="mean", smoothing=0.0, tol=1e-5):
    """Loss and every gradient of the op against F.cross_entropy(F.linear(...)) in float64."""
    ha, wa, hb, wb = _leaf(h), _leaf(w), _leaf(h), _leaf(w)
    ba, bb = (_leaf(b), _leaf(b)) if b is not None else (None, None)
    loss, _ = torch.ops.foak.linear_cross_entropy(ha, wa, ba, y, -100, smoothing, reduction, torch.float32)
    logits = F.linear(hb.double(), wb.double(), bb.double() if bb is not None else None)
    ref = F.cross_entropy(logits.flatten(0, -2), y.reshape(-1), reduction=reduction, label_smoothing=smoothing)
    ref = ref.view(y.shape) if reduction == "none" else ref
    _close(loss, ref, tol)
    g = _upstream(ref)
    loss.backward(g)
    ref.backward(g.double())
    for a, r in ((ha, hb), (wa, wb), (ba, bb)):
        if a is not None:
            assert a.grad.shape == a.shape and a.grad.dtype == a.dtype
            _close(a.grad, r.grad, tol)
    return loss


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_no_rows_no_classes_one_row(reduction):
    """No rows: mean is NaN (0/0), sum 0, none empty, like torch. No classes with every label
    ignored: the same, without a [-1, 0] reshape error. One row: like any other."""
    _check_ce(torch.randn(0, 11), torch.zeros(0, dtype=torch.long), reduction)
    _check_ce(torch.randn(2, 3, 0), torch.full((2, 3), -100), reduction)
    _check_ce(torch.randn(1, 11), torch.tensor([4]), reduction)
    _check_lce(torch.randn(0, 8), torch.randn(13, 8), torch.randn(13), torch.zeros(0, dtype=torch.long), reduction)
    _check_lce(torch.randn(1, 8), torch.randn(13, 8), None, torch.tensor([12]), reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_labels(reduction):
    """mean → NaN (0/0) like torch, sum → 0, none → zeros; every gradient is zero."""
    y = torch.full((5,), -100)
    loss, dx = _check_ce(torch.randn(5, 11), y, reduction)
    assert (dx == 0).all()
    assert loss.isnan() if reduction == "mean" else (loss == 0).all()
    _check_lce(torch.randn(5, 8), torch.randn(13, 8), torch.randn(13), y, reduction)


def test_cross_entropy_huge_rows():
    """A vocabulary streamed in several blocks (also with label smoothing), and a hidden size
    of 16384 under the lm_head."""
    x = torch.randn(2, 40000) * 3
    _check_ce(x, torch.tensor([5, 39999]))
    _check_ce(x.bfloat16(), torch.tensor([-100, 12345]), "none", smoothing=0.1, tol=1e-2)
    _check_lce(torch.randn(2, 16384), torch.randn(37, 16384) * 0.01, torch.randn(37), torch.tensor([3, 36]), tol=1e-4)


def test_cross_entropy_non_contiguous():
    """Transposed logits, a transposed [B, S, V] batch with transposed labels, an expanded
    upstream gradient; a transposed lm_head weight and hidden states."""
    _check_ce(torch.randn(11, 4).t(), torch.tensor([1, 2, -100, 10]))
    y = torch.randint(0, 11, (2, 3)).t()
    _check_ce(torch.randn(2, 3, 11).transpose(0, 1), y, "none")
    xa = _leaf(torch.randn(4, 11))
    loss, _ = torch.ops.foak.cross_entropy(xa, torch.tensor([1, 2, 3, 4]), -100, 0.0, "none", torch.float32)
    loss.sum().backward()  # upstream gradient expanded from a scalar: stride 0
    xb = _leaf(xa.detach())
    F.cross_entropy(xb.double(), torch.tensor([1, 2, 3, 4]), reduction="none").sum().backward()
    _close(xa.grad, xb.grad)
    _check_lce(torch.randn(3, 2, 8).transpose(0, 1), torch.randn(8, 13).t(), None, torch.randint(0, 13, (2, 3)))


def test_linear_cross_entropy_grads_are_contiguous_like_the_fakes():
    """The fake impls promise contiguous gradients; a transposed lm_head weight must not make the
    real dW follow its strides (inductor would read it through the fake's layout)."""
    h, w, y = torch.randn(5, 8), torch.randn(8, 13).t(), torch.randint(0, 13, (5,))
    need = (True, True, False)
    for op in ("linear_cross_entropy_fused", "linear_cross_entropy_recompute"):
        out = getattr(torch.ops.foak, op)(
            h, w, None, y, -100, 0.0, "sum", torch.float32, *([*need] if op.endswith("fused") else [])
        )
        if op.endswith("fused"):
            dh, dw = out[2], out[3]
        else:
            dh, dw, _ = torch.ops.foak.linear_cross_entropy_backward(
                torch.ones(()), h, w, None, y, out[1], -100, 0.0, "sum", *need
            )
        assert dh.is_contiguous() and dw.is_contiguous(), op


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_half_logits_with_fp32_loss(dtype):
    """The absorbed `.float()`: half logits read as they are, the loss in fp32, the gradient in
    the logits' dtype."""
    _check_ce(torch.randn(6, 50, dtype=dtype) * 3, torch.tensor([0, 49, -100, 7, 7, 3]), tol=1e-2)


def test_cross_entropy_label_dtypes():
    """int32 labels are accepted (documented: torch wants int64; the pattern only matches
    int64); floating labels raise a RuntimeError like torch's."""
    x, y = torch.randn(4, 11), torch.tensor([1, 2, -100, 10])
    loss, _ = torch.ops.foak.cross_entropy(x, y.int(), -100, 0.0, "mean", torch.float32)
    _close(loss, F.cross_entropy(x, y))
    with pytest.raises(RuntimeError):
        F.cross_entropy(x, y.float())
    with pytest.raises(RuntimeError, match="integer class indices"):
        torch.ops.foak.cross_entropy(x, y.float(), -100, 0.0, "mean", torch.float32)


def test_linear_cross_entropy_mixed_dtypes():
    """hidden and weight of different dtypes raise like F.linear does; a bias of another dtype
    than the weight (F.linear would promote) is a documented RuntimeError."""
    h, w, y = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(13, 8), torch.tensor([1, 2, 3])
    with pytest.raises(RuntimeError):
        F.linear(h, w)
    with pytest.raises(RuntimeError):
        torch.ops.foak.linear_cross_entropy(h, w, None, y, -100, 0.0, "mean", torch.float32)
    with pytest.raises(RuntimeError, match="bias is torch.bfloat16"):
        torch.ops.foak.linear_cross_entropy(
            h.float(), w, torch.randn(13, dtype=torch.bfloat16), y, -100, 0.0, "mean", torch.float32
        )


@pytest.mark.parametrize("bad", [11, 1000, -1, -99])
def test_out_of_range_labels_raise_torchs_error_class(bad):
    """On CPU torch raises IndexError("Target 11 is out of bounds."); so do the ops (the error
    is also a RuntimeError, like CUDA's device assert, and says "label out of range")."""
    x, y = torch.randn(4, 11), torch.tensor([1, bad, 2, -100])
    with pytest.raises(IndexError, match="out of bounds"):
        F.cross_entropy(x, y)
    with pytest.raises(IndexError, match=f"label out of range: Target {bad} is out of bounds"):
        torch.ops.foak.cross_entropy(x, y, -100, 0.0, "mean", torch.float32)
    with pytest.raises(ce_kernel.LabelOutOfRange, match="out of bounds"):
        torch.ops.foak.linear_cross_entropy(
            torch.randn(4, 8), torch.randn(11, 8), None, y, -100, 0.0, "sum", torch.float32
        )
    assert issubclass(ce_kernel.LabelOutOfRange, RuntimeError)


def test_cross_entropy_nan_and_inf_like_torch():
    """+inf or NaN in a row: that row's loss and gradient are NaN; a row of -inf: NaN; the label
    at -inf: +inf loss; other rows untouched. Also with label smoothing and through the lm_head."""
    x = torch.randn(6, 11)
    x[0, 2], x[1, :], x[2, 4], x[3, 1] = INF, -INF, NAN, -INF
    y = torch.tensor([2, 3, 4, 1, 0, 5])
    for reduction, smoothing in (("none", 0.0), ("none", 0.1), ("mean", 0.0)):
        loss, dx = _check_ce(x, y, reduction, smoothing=smoothing)
    loss, dx = _check_ce(x, y, "none")
    assert loss[:4].isnan().tolist() == [True, True, True, False] and loss[3] == INF
    assert loss[4:].isfinite().all() and dx[4:].isfinite().all()
    h = torch.randn(4, 8)
    h[1, 2], h[2, 0] = NAN, INF
    _check_lce(h, torch.randn(13, 8), None, torch.tensor([1, 2, 3, 4]), "none")


def test_ignored_rows_are_never_read():
    """Documented difference: a NaN in an ignored row reaches neither the loss (as in torch) nor
    the gradient (torch's log_softmax backward turns that row's gradient into NaN; ours is 0)."""
    x = torch.randn(3, 11)
    x[1] = NAN
    y = torch.tensor([1, -100, 2])
    xa, xb = _leaf(x), _leaf(x)
    loss, _ = torch.ops.foak.cross_entropy(xa, y, -100, 0.0, "mean", torch.float32)
    ref = F.cross_entropy(xb, y)
    _close(loss, ref)
    loss.backward()
    ref.backward()
    assert xb.grad[1].isnan().all() and (xa.grad[1] == 0).all()
    _close(xa.grad[[0, 2]], xb.grad[[0, 2]])


def test_cross_entropy_through_the_backend_on_unusual_inputs():
    """HF's loss (upcast, view, ignore_index) compiled: one token, an all-ignored batch (NaN
    like eager), NaN logits; out-of-range labels raise torch's error class."""
    V = 17

    def fn(h, w, y):
        return F.cross_entropy(F.linear(h, w).float().view(-1, V), y.view(-1), ignore_index=-100)

    w = torch.randn(V, 8)
    cases = [
        (torch.randn(1, 1, 8), torch.tensor([[3]])),
        (torch.randn(2, 3, 8), torch.full((2, 3), -100)),
        (torch.randn(2, 3, 8).index_fill_(1, torch.tensor([1]), NAN), torch.randint(0, V, (2, 3))),
    ]
    for h, y in cases:
        torch._dynamo.reset()
        be = foak_compile.backend(inner="aot_eager")
        ha, hb, wa, wb = _leaf(h), _leaf(h), _leaf(w), _leaf(w)
        loss, ref = torch.compile(fn, backend=be)(ha, wa, y), fn(hb, wb, y)
        _close(loss, ref)
        loss.backward()
        ref.backward()
        _close(ha.grad, hb.grad, 1e-4)
        _close(wa.grad, wb.grad, 1e-4)
        assert be.reports[0].counts() == {"linear_cross_entropy": 1}
    y = torch.tensor([[1, V, 2]])
    h = torch.randn(1, 3, 8)
    with pytest.raises(IndexError, match="out of bounds"):
        fn(h, w, y)
    with pytest.raises(IndexError, match="out of bounds"):
        torch.compile(fn, backend=foak_compile.backend(inner="aot_eager"))(h, w, y)
