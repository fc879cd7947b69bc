"""Property-based: modules that write each pattern in its legal variants and its near-misses.
Property: with backend=foak the output and gradients equal eager within dtype tolerance, legal
variants are rewritten (the report counts them), and a near-miss is never rewritten (the report
names it, and no foak op is in the graph).

Each example compiles a small graph with the aot_eager inner compiler; max_examples stays small
for CI (each test is a few seconds); FOAK_FUZZ_EXAMPLES=500 runs a deeper search locally."""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import foak_compile

FUZZ = settings(
    max_examples=int(os.environ.get("FOAK_FUZZ_EXAMPLES", 25)),
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
FP32_TOL = dict(rtol=1e-4, atol=1e-5)
HALF_TOL = dict(rtol=2e-2, atol=2e-2)
# eps = 0 makes numpy warn inside the Triton interpreter: expected here
pytestmark = [
    pytest.mark.slow,  # compiles every generated module
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]


def _tol(dtype):
    return FP32_TOL if dtype in (torch.float32, torch.float64) else HALF_TOL


def _compile_and_compare(fn, inputs, tol, grad=None):
    """foak (aot_eager) vs eager on fresh leaves; `grad[i]`: whether input i requires grad
    (default: the floating ones). Outputs may be a tensor or a tuple. Returns the graph report."""
    torch._dynamo.reset()
    grad = [t.is_floating_point() for t in inputs] if grad is None else grad
    ours = [t.detach().clone().requires_grad_(g) for t, g in zip(inputs, grad)]
    ref = [t.detach().clone().requires_grad_(g) for t, g in zip(inputs, grad)]
    be = foak_compile.backend(inner="aot_eager")
    out, exp = torch.compile(fn, backend=be)(*ours), fn(*ref)
    out, exp = (out, exp) if isinstance(exp, tuple) else ((out,), (exp,))
    assert len(out) == len(exp)
    for a, b in zip(out, exp):
        torch.testing.assert_close(a, b, **tol, equal_nan=True)
    diff = [(a, b) for a, b in zip(out, exp) if b.requires_grad]
    gs = [torch.randn_like(b) for _, b in diff]
    if diff:
        torch.autograd.backward([a for a, _ in diff], gs)
        torch.autograd.backward([b for _, b in diff], gs)
    for a, b in zip(ours, ref):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, **tol)
    [report] = be.reports
    return report


def _assert_left_alone(report, pattern, *why):
    """A near-miss: nothing of `pattern` rewritten, and reported with one of the reasons `why`
    (None: the module is no candidate at all, nothing need be reported)."""
    assert report.counts().get(pattern, 0) == 0, report.to_text()
    assert f"torch.ops.foak.{pattern}" not in report.code_after, report.code_after
    if why and None not in why:
        reasons = [m.reason for m in report.near_misses if m.pattern == pattern]
        assert any(w in r for w in why for r in reasons), report.to_text()


# ---------------------------------------------------------------------------------------------
# RMSNorm

RMS_MISSES = {  # near-miss -> reason in the report (None: not even a candidate)
    "extra-user-var": "outside the pattern",
    "extra-user-inv": "outside the pattern",
    "dim0": "not the last dim",
    "centred": "mean-centred",
    "keepdim": None,  # re-expanded statistics are no longer the pattern's shape at all
    "tensor-eps": "eps is a tensor",
}


@st.composite
def rms_norm_modules(draw):
    upcast = draw(st.sampled_from([None, "float", "to", "type"]))
    cast_back = draw(st.sampled_from(["to", "type_as"]))
    square = draw(st.sampled_from(["pow", "mul", "pow-op"]))
    inv = draw(st.sampled_from(["rsqrt", "rsqrt-method", "div-sqrt"]))
    dim = draw(st.sampled_from(["-1", "[-1]", "last"]))
    weight = draw(st.sampled_from(["after-cast", "after-cast-right", "before-cast", "gemma", "none"]))
    eps = draw(st.sampled_from([1e-5, 1e-6, 3e-7, 0.0]))
    eps_first = draw(st.booleans())
    # legal extra users: the upcast or the normalised value used elsewhere keeps them outside,
    # the norm up to them is still rewritten
    extra_ok = draw(st.sampled_from([None, None, "upcast", "normalised"]))
    miss = draw(st.sampled_from([None, None, None, *RMS_MISSES]))
    eps_t = torch.tensor(eps)

    def fn(x, w):
        xf = {
            None: lambda: x,
            "float": x.float,
            "to": lambda: x.to(torch.float32),
            "type": lambda: x.type(torch.float32),
        }[upcast]()
        sq = {"pow": lambda t: t.pow(2), "mul": lambda t: t * t, "pow-op": lambda t: t**2}[square](xf)
        if miss == "centred":
            xf = xf - xf.mean(-1, keepdim=True)
            sq = xf.pow(2)
        d = {"-1": -1, "[-1]": [-1], "last": xf.dim() - 1}[dim]
        if miss == "dim0":
            d = 0
        var = sq.mean(d, keepdim=miss != "keepdim")
        if miss == "keepdim":
            var = var[..., None]
        e = eps_t if miss == "tensor-eps" else eps
        v = e + var if eps_first else var + e
        if inv == "rsqrt":
            r = torch.rsqrt(v)
            n = xf * r
        elif inv == "rsqrt-method":
            r = v.rsqrt()
            n = r * xf
        else:
            r = torch.sqrt(v)
            n = xf / r

        def back(t):
            return t.to(x.dtype) if cast_back == "to" else t.type_as(x)

        if weight == "after-cast":
            y = w * back(n)
        elif weight == "after-cast-right":
            y = back(n) * w
        elif weight == "before-cast":
            y = back(n * w)
        elif weight == "gemma":
            y = back(n * (1.0 + w.float()))
        else:
            y = back(n)
        extra = {"extra-user-var": var, "extra-user-inv": r}.get(miss)
        if extra is None:
            extra = {"upcast": xf, "normalised": n}.get(extra_ok)
        return y + extra.mean() if extra is not None else y

    return fn, miss, upcast


@FUZZ
@given(
    case=rms_norm_modules(),
    rows=st.integers(1, 9),
    hidden=st.integers(2, 70),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
)
def test_rms_norm_variants(case, rows, hidden, dtype):
    fn, miss, upcast = case
    x, w = torch.randn(rows, hidden, dtype=dtype), torch.randn(hidden, dtype=dtype)
    report = _compile_and_compare(fn, [x, w], _tol(dtype))
    # half or double statistics are not the fp32 kernel's; whichever reason the pattern meets first
    dtype_why = [str(dtype)] if dtype != torch.float32 and upcast is None else []
    if miss is not None:
        _assert_left_alone(report, "rms_norm", RMS_MISSES[miss], *dtype_why)
    elif dtype_why:
        _assert_left_alone(report, "rms_norm", *dtype_why)
    else:
        assert report.counts() == {"rms_norm": 1}, report.to_text()


@FUZZ
@given(
    spelling=st.sampled_from(["F.rms_norm", "nn.RMSNorm"]),
    eps=st.sampled_from([None, 1e-6]),
    affine=st.booleans(),
    rows=st.integers(1, 9),
    hidden=st.integers(2, 70),
    dims=st.sampled_from([1, 1, 2]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_functional_rms_norm(spelling, eps, affine, rows, hidden, dims, dtype):
    """F.rms_norm / nn.RMSNorm, with or without eps and weight; two trailing dims: a near-miss."""
    shape = (hidden,) if dims == 1 else (3, hidden)
    x, w = torch.randn(rows, *shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    if spelling == "nn.RMSNorm":
        mod = torch.nn.RMSNorm(shape, eps=eps, elementwise_affine=affine, dtype=dtype)

        def fn(x, w):
            return mod(x) * w
    else:

        def fn(x, w):
            return F.rms_norm(x, shape, w if affine else None, eps)

    report = _compile_and_compare(fn, [x, w], _tol(dtype))
    if dims == 1:
        assert report.counts() == {"rms_norm": 1}, report.to_text()
    else:
        _assert_left_alone(report, "rms_norm", "trailing dims")


# ---------------------------------------------------------------------------------------------
# Cross-entropy on given logits

CE_MISSES = {
    "weight": "class weights",
    "dim0": None,  # log_softmax over the tokens, gathered by hand: not a loss call at all
    "log_softmax-dim0": "log_softmax over dim 0",
    "class-dim-1": "the class dim last",
    "probabilities": "class-probability",
    "log-probs-used": "outside the pattern",
}


@st.composite
def loss_modules(draw):
    spelling = draw(
        st.sampled_from(["cross_entropy", "log_softmax+nll", "method+nll", "module", "log_softmax-fp32+nll"])
    )
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    ignore = draw(st.sampled_from([-100, 0, 5]))
    smoothing = draw(st.sampled_from([0.0, 0.0, 0.1]))
    upcast = draw(st.booleans())
    view_3d = draw(st.booleans())  # HF: [B, S, V] logits viewed as [tokens, V]
    # another user of the fp32 logits only keeps the upcast outside; the loss still matches
    extra_user = draw(st.booleans())
    miss = draw(st.sampled_from([None, None, *CE_MISSES]))
    class_w = torch.rand(300)

    def fn(x, labels):
        xf = x.float() if upcast else x
        if view_3d:
            xf = xf.view(1, -1, x.shape[-1]).view(-1, x.shape[-1])
        if miss == "dim0":
            return F.log_softmax(xf, 0)[torch.arange(labels.shape[0]), labels.clamp_min(0)].sum()
        kw = dict(ignore_index=ignore, reduction=reduction)
        if miss == "weight":  # in the dtype the loss sees
            fp32_lp = spelling == "log_softmax-fp32+nll" and not smoothing
            kw["weight"] = class_w[: x.shape[-1]].to(torch.float32 if fp32_lp else xf.dtype)
        if miss == "class-dim-1":
            out = F.cross_entropy(xf.t()[None], labels[None], **kw)
        elif miss == "probabilities":
            out = F.cross_entropy(xf, F.one_hot(labels.clamp_min(0), x.shape[-1]).to(xf.dtype), reduction=reduction)
        elif miss in ("log_softmax-dim0", "log-probs-used"):
            lp = F.log_softmax(xf, 0 if miss == "log_softmax-dim0" else -1)
            out = F.nll_loss(lp, labels, **kw)
            if miss == "log-probs-used":
                out = out + lp.mean()
        elif spelling == "cross_entropy" or smoothing:
            out = F.cross_entropy(xf, labels, label_smoothing=smoothing, **kw)
        elif spelling == "module":
            out = torch.nn.CrossEntropyLoss(**kw)(xf, labels)
        elif spelling == "method+nll":
            out = F.nll_loss(xf.log_softmax(-1), labels, **kw)
        elif spelling == "log_softmax-fp32+nll":  # the upcast spelt as log_softmax's dtype
            out = F.nll_loss(F.log_softmax(xf, -1, dtype=torch.float32), labels, **kw)
        else:
            out = F.nll_loss(F.log_softmax(xf, -1), labels, **kw)
        return out + xf.mean() if extra_user else out

    # the fp32 log_softmax spelling is only taken when no miss branch replaces the loss call
    fp32_loss = upcast or (spelling == "log_softmax-fp32+nll" and not smoothing and miss in (None, "weight"))
    return fn, miss, fp32_loss, ignore


@FUZZ
@given(
    case=loss_modules(),
    rows=st.integers(1, 9),
    vocab=st.integers(7, 300),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_cross_entropy_variants(case, rows, vocab, dtype):
    fn, miss, fp32_loss, ignore = case
    x = torch.randn(rows, vocab, dtype=dtype) * 2
    labels = torch.randint(0, vocab, (rows,))
    labels[torch.rand(rows) < 0.3] = ignore
    report = _compile_and_compare(fn, [x, labels], _tol(dtype))
    dtype_why = ["without an fp32 upcast"] if dtype != torch.float32 and not fp32_loss else []
    if miss is not None:
        _assert_left_alone(report, "cross_entropy", CE_MISSES[miss], *dtype_why)
    elif dtype_why:
        _assert_left_alone(report, "cross_entropy", *dtype_why)
    else:
        assert report.counts() == {"cross_entropy": 1}, report.to_text()


# ---------------------------------------------------------------------------------------------
# lm_head + cross-entropy

EPILOGUES = {  # between lm_head and loss, all fused
    None: lambda z: z,
    "softcap": lambda z: torch.tanh(z / 5.0) * 5.0,
    "scale": lambda z: z * 0.6,
    "divide + softcap": lambda z: 3.0 * (z / 1.5 / 3.0).tanh(),
}


@st.composite
def lm_head_losses(draw):
    bias = draw(st.booleans())
    upcast = draw(st.booleans())
    epilogue_in_fp32 = draw(st.booleans())  # scale/softcap after the upcast, else before it
    view_3d = draw(st.booleans())
    spelling = draw(st.sampled_from(["cross_entropy", "log_softmax+nll", "module"]))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    smoothing = draw(st.sampled_from([0.0, 0.0, 0.2]))
    epilogue = draw(st.sampled_from(list(EPILOGUES)))
    miss = draw(st.sampled_from([None, None, "logits-returned", "logits-used", "softcap-two-constants"]))

    def fn(h, w, b, labels):
        if view_3d:
            h = h.view(1, -1, h.shape[-1])
        logits = F.linear(h, w, b if bias else None)
        z = logits.float() if upcast and epilogue_in_fp32 else logits
        z = EPILOGUES[epilogue](z)
        z = torch.tanh(z / 4.0) * 5.0 if miss == "softcap-two-constants" else z
        z = z.float() if upcast and not epilogue_in_fp32 else z
        z = z.view(-1, z.shape[-1]) if view_3d else z
        kw = dict(ignore_index=-100, reduction=reduction)
        if spelling == "cross_entropy" or smoothing:
            loss = F.cross_entropy(z, labels, label_smoothing=smoothing, **kw)
        elif spelling == "module":
            loss = torch.nn.CrossEntropyLoss(**kw)(z, labels)
        else:
            loss = F.nll_loss(F.log_softmax(z, -1), labels, **kw)
        if miss == "logits-returned":
            return loss, logits
        return loss + logits.mean() if miss == "logits-used" else loss

    return fn, miss, upcast


@FUZZ
@given(
    case=lm_head_losses(),
    rows=st.integers(1, 9),
    hidden=st.integers(1, 24),
    vocab=st.integers(7, 200),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    frozen=st.booleans(),
)
def test_linear_cross_entropy_variants(case, rows, hidden, vocab, dtype, frozen):
    fn, miss, upcast = case
    h, w, b = (
        torch.randn(rows, hidden, dtype=dtype),
        torch.randn(vocab, hidden, dtype=dtype) * 0.5,
        torch.randn(vocab, dtype=dtype),
    )
    labels = torch.randint(0, vocab, (rows,))
    labels[torch.rand(rows) < 0.3] = -100
    tol = FP32_TOL if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    report = _compile_and_compare(fn, [h, w, b, labels], tol, grad=[True, not frozen, not frozen, False])
    two_constants = "only c·tanh(z/c)"
    if dtype != torch.float32 and not upcast:
        _assert_left_alone(
            report, "linear_cross_entropy", two_constants if miss == "softcap-two-constants" else "without an fp32"
        )
        _assert_left_alone(report, "cross_entropy", "without an fp32 upcast")
    elif miss is None:
        assert report.counts() == {"linear_cross_entropy": 1}, report.to_text()
    else:  # the lm_head stays; the loss over its (scaled, capped) logits is still fused
        _assert_left_alone(
            report, "linear_cross_entropy", two_constants if miss == "softcap-two-constants" else "users"
        )
        assert report.counts() == {"cross_entropy": 1}, report.to_text()


# ---------------------------------------------------------------------------------------------
# Rotary embedding

ROPE_MISSES = {  # applied to q (k, when present, stays legal and is fused alone)
    "partial": "partial rotary",
    "sign": "the rotation would run the other way",
    "split": "not at the middle",
    "interleaved": "interleaved",
    "rotation-used": "outside the pattern",
    "product-used": "outside the pattern",
    "minus": None,  # x·cos − rot(x)·sin: no add to anchor on
}


def _halves(x, how):
    h = x.shape[-1] // 2
    if how == "chunk":
        return x.chunk(2, dim=-1)
    if how == "split":  # sizes as an int, or as a list (odd head_dims: two unequal pieces)
        return torch.split(x, h, dim=-1) if x.shape[-1] % 2 == 0 else torch.split(x, [h, h + 1], dim=-1)
    return x[..., :h], x[..., h:]


def _rotate(x, how, miss=None):
    """HF rotate_half spelt several ways, or a near-miss rotation."""
    if miss == "split":  # cut one element off the middle
        x1, x2 = x[..., : x.shape[-1] // 2 - 1], x[..., x.shape[-1] // 2 - 1 :]
        return torch.cat((-x2, x1), dim=-1)
    if miss == "interleaved":
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    x1, x2 = _halves(x, "slice" if how == "stack" else how)
    if miss == "sign":
        return torch.cat((x2, -x1), dim=-1)
    if how == "stack" and x1.shape == x2.shape:  # stacking the halves at -2 and flattening is concatenating them
        return torch.stack((-x2, x1), dim=-2).flatten(-2)
    return torch.cat((-x2, x1), dim=-1)


def _unsqueeze(t, dim, how):
    if how == "method":
        return t.unsqueeze(dim)
    if how == "function":
        return torch.unsqueeze(t, dim)
    if how == "negative":
        return t.unsqueeze(dim - 4)
    return t[:, None] if dim == 1 else t[:, :, None, :]


@st.composite
def rope_modules(draw):
    layout = draw(st.sampled_from(["bhsd", "bshd"]))  # unsqueeze_dim 1 (q transposed) or 2
    rotate = draw(st.sampled_from(["slice", "chunk", "split", "stack"]))
    unsq = draw(st.sampled_from(["method", "function", "negative", "index"]))
    cos_first = draw(st.booleans())
    sin_term_first = draw(st.booleans())
    with_k = draw(st.booleans())
    miss = draw(st.sampled_from([None, None, None, *ROPE_MISSES]))
    dim = 1 if layout == "bhsd" else 2

    def apply(x, cos, sin, how, miss=None):
        c, s = _unsqueeze(cos, dim, unsq), _unsqueeze(sin, dim, unsq)
        a = c * x if cos_first else x * c
        r = _rotate(x, how, miss)
        b = r * s
        y = a - b if miss == "minus" else (b + a if sin_term_first else a + b)
        return y, {"rotation-used": r, "product-used": a}.get(miss)

    def fn(q, k, cos, sin):
        if layout == "bhsd":  # HF: projections viewed [B, S, H, D] and transposed
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        if miss == "partial":  # rotate the first half of head_dim, pass the rest through
            r = q.shape[-1] // 2
            qr, extra = apply(q[..., :r], cos[..., :r], sin[..., :r], rotate)
            qo = torch.cat((qr, q[..., r:]), dim=-1)
        else:
            qo, extra = apply(q, cos, sin, rotate, miss)
        outs = (qo,)
        if with_k:
            outs += (apply(k, cos, sin, rotate)[0],)
        return outs + ((extra.sum(),) if extra is not None else ())

    return fn, miss, with_k


@FUZZ
@given(
    case=rope_modules(),
    batch=st.integers(1, 3),
    seq=st.integers(1, 7),
    heads=st.sampled_from([(4, 4), (4, 2), (4, 1), (3, 1), (2, 2), (1, 1)]),
    half=st.integers(1, 9),
    cos_batch=st.booleans(),
    odd=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    cos_dtype=st.sampled_from(["same", "fp32"]),
)
def test_rope_variants(case, batch, seq, heads, half, cos_batch, odd, dtype, cos_dtype):
    fn, miss, with_k = case
    d = 2 * half + (1 if odd and miss is None else 0)  # odd head_dim: no middle to split at
    if miss == "partial" and d % 4:
        d = 4 * max(1, half // 2)  # the rotated first half must itself be even
    hq, hk = heads
    q, k = torch.randn(batch, seq, hq, d, dtype=dtype), torch.randn(batch, seq, hk, d, dtype=dtype)
    cdt = dtype if cos_dtype == "same" else torch.float32
    pos = torch.randint(0, 50, (batch if cos_batch else 1, seq))
    ang = pos[..., None].float() * torch.rand(d)
    cos, sin = ang.cos().to(cdt), ang.sin().to(cdt)
    report = _compile_and_compare(
        fn, [q, k, cos, sin], FP32_TOL if dtype == torch.float32 else HALF_TOL, grad=[True, True, False, False]
    )
    if d % 2:
        _assert_left_alone(report, "rope", "not at the middle")
        return
    matches = [m.variant.split(",")[0] for m in report.matches]
    if miss is None:
        assert matches == (["q+k"] if with_k else ["single"]), report.to_text()
    else:
        assert matches == (["single"] if with_k else []), report.to_text()
        assert "torch.ops.foak.rope.default" not in report.code_after
        if ROPE_MISSES[miss] is not None:
            reasons = [m.reason for m in report.near_misses if m.pattern == "rope"]
            assert any(ROPE_MISSES[miss] in r for r in reasons), report.to_text()


@settings(FUZZ, max_examples=min(FUZZ.max_examples, 8))  # one near-miss: a few draws suffice
@given(layout=st.sampled_from(["bhsd", "bshd"]), seq=st.integers(2, 6), half=st.integers(1, 6))
def test_rope_with_cos_sin_requiring_grad_is_left_alone(layout, seq, half):
    """A learned rotary table: the op has no cos/sin gradient, so nothing is rewritten."""
    dim = 1 if layout == "bhsd" else 2

    def fn(q, k, cos, sin):
        if dim == 1:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        c, s = cos.unsqueeze(dim), sin.unsqueeze(dim)
        return q * c + _rotate(q, "slice") * s, k * c + _rotate(k, "slice") * s

    d = 2 * half
    q, k = torch.randn(2, seq, 4, d), torch.randn(2, seq, 2, d)
    cos, sin = torch.randn(1, seq, d), torch.randn(1, seq, d)
    report = _compile_and_compare(fn, [q, k, cos, sin], FP32_TOL)
    _assert_left_alone(report, "rope", "require grad")


# ---------------------------------------------------------------------------------------------
# Fixed examples of what the properties above found, so that every run checks them


def _rope_inputs(d=8):
    ang = torch.rand(1, 5, d) * 6
    return [torch.randn(2, 5, 4, d), torch.randn(2, 5, 2, d), ang.cos(), ang.sin()]


def test_rope_subtraction_beside_a_rotation_is_not_taken_for_one():
    """x·cos − rot(x)·sin next to k's rotation on the same cos/sin was paired with it as a
    rotation (the partner search did not check for an add): q came out with the wrong sign."""

    def fn(q, k, cos, sin):
        c, s = cos.unsqueeze(2), sin.unsqueeze(2)
        return q * c - _rotate(q, "slice") * s, k * c + _rotate(k, "slice") * s

    report = _compile_and_compare(fn, _rope_inputs(), FP32_TOL, grad=[True, True, False, False])
    assert [m.variant for m in report.matches] == ["single, unsqueeze_dim=2"], report.to_text()


@pytest.mark.parametrize("rotate, unsq", [("chunk", "index"), ("split", "function"), ("stack", "negative")])
def test_rope_spellings_once_rejected(rotate, unsq):
    """chunk/split halves, a stack(-2) join, `cos[:, None]` were near-misses before the fuzz."""

    def fn(q, k, cos, sin):
        c, s = _unsqueeze(cos, 2, unsq), _unsqueeze(sin, 2, unsq)
        return q * c + _rotate(q, rotate) * s, k * c + _rotate(k, rotate) * s

    report = _compile_and_compare(fn, _rope_inputs(), FP32_TOL, grad=[True, True, False, False])
    assert [m.variant for m in report.matches] == ["q+k, unsqueeze_dim=2"], report.to_text()


def test_log_softmax_upcast_of_half_logits_is_fused():
    """nll_loss(log_softmax(x_bf16, -1, dtype=torch.float32)) is an exact fp32 loss; it was
    rejected as a loss over bf16 logits."""

    def fn(x, y):
        return F.nll_loss(F.log_softmax(x, -1, dtype=torch.float32), y)

    report = _compile_and_compare(fn, [torch.randn(6, 40, dtype=torch.bfloat16), torch.randint(0, 40, (6,))], HALF_TOL)
    assert report.counts() == {"cross_entropy": 1}, report.to_text()


def test_rms_norm_eps_zero_weight_gradient():
    """eps = 0 with one row: the rows of the kernel's tile past the end made dW NaN."""

    def fn(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 0.0))

    report = _compile_and_compare(fn, [torch.randn(1, 6), torch.randn(6)], FP32_TOL)
    assert report.counts() == {"rms_norm": 1}, report.to_text()
