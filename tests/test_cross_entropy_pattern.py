"""The cross_entropy and linear_cross_entropy patterns on real transformers models and on
hand-written losses, variants and near-misses."""

import copy
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import foak_compile
from tests.models import compare_half_with_float64, compare_with_eager, loss_and_grads, tiny_model

CE = ["linear_cross_entropy", "cross_entropy"]
HINT = re.escape(foak_compile.patterns.cross_entropy.LinearCrossEntropyPattern.graph_output_hint)
FAMILIES = ["llama", "qwen2", "gemma"]


def _batch(model, bs=2, seq=11):
    """Fresh random tokens; the first few label positions masked (-100) as for a prompt."""
    ids = torch.randint(0, model.config.vocab_size, (bs, seq))
    labels = ids.clone()
    labels[0, :4] = -100
    return {"input_ids": ids, "labels": labels}


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))


def _misses(be, pattern):
    return [m.reason for r in be.reports for m in r.near_misses if m.pattern == pattern]


def _counts(be):
    return foak_compile.total_counts(be.reports)


def _assert_plain_call(be):
    """HF returns the logits: the lm_head cannot be fused, the loss is."""
    assert _counts(be) == {"cross_entropy": 1}
    [reason] = _misses(be, "linear_cross_entropy")
    # the graph's output node (named output_N when the model has a variable called output)
    assert re.fullmatch(r"intermediate `logits` has 2 users \(1 outside the pattern: output(_\d+)?\); " + HINT, reason)
    assert not _misses(be, "cross_entropy")


def _compare_loss_only(model, inputs, rtol=1e-5, atol=1e-5):
    """Compile a step that keeps only the loss; loss and every trainable grad against eager."""
    eager = copy.deepcopy(model)
    ref_loss, ref_grads = loss_and_grads(eager, inputs)
    be = foak_compile.backend(patterns=CE, inner="aot_eager")
    step = torch.compile(lambda **kw: model(**kw).loss, backend=be)
    model.zero_grad(set_to_none=True)
    loss = step(**inputs)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=rtol, atol=atol)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert grads.keys() == ref_grads.keys() and grads
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    return be


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_model_call_rewrites_the_loss(family):
    model = tiny_model(family)
    be = compare_with_eager(model, _batch(model), patterns=CE)
    _assert_plain_call(be)
    m = be.reports[0].matches[0]
    assert "loss_utils.py" in m.source and m.variant == "F.cross_entropy, reduction=mean"


@pytest.mark.parametrize("family", [f if f == "llama" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_hf_model_with_lora(family):
    model = _lora(tiny_model(family))
    be = compare_with_eager(model, _batch(model), patterns=CE)
    _assert_plain_call(be)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_only_step_fuses_the_lm_head(family):
    """Without the logits in the output the lm_head GEMM joins the loss (Gemma: tied embeddings)."""
    model = tiny_model(family)
    be = _compare_loss_only(model, _batch(model))
    assert _counts(be) == {"linear_cross_entropy": 1}
    assert not _misses(be, "linear_cross_entropy") and not _misses(be, "cross_entropy")
    assert "lm_head" in be.reports[0].matches[0].module


def test_loss_only_step_with_lora_leaves_the_frozen_lm_head_alone():
    model = _lora(tiny_model("llama"))
    be = _compare_loss_only(model, _batch(model))
    assert _counts(be) == {"linear_cross_entropy": 1}
    assert model.base_model.model.lm_head.weight.grad is None


@pytest.mark.slow  # a bf16 model compiled twice (~14 s on CPU)
def test_bf16_model_absorbs_the_upcast():
    model = tiny_model("llama", torch.bfloat16)
    be = compare_with_eager(model, _batch(model), patterns=CE, rtol=2e-2, atol=2e-3)
    _assert_plain_call(be)
    assert be.reports[0].matches[0].variant == "F.cross_entropy, reduction=mean, upcast from torch.bfloat16"
    # the op reads the bf16 logits: no fp32 copy left in the graph
    assert "logits.float()" not in be.reports[0].code_after
    model = tiny_model("llama", torch.bfloat16)
    be = _compare_loss_only(model, _batch(model), rtol=2e-2, atol=2e-3)
    assert _counts(be) == {"linear_cross_entropy": 1}


def test_num_items_in_batch_gives_a_sum():
    """Gradient accumulation: HF sums and divides by the batch's token count."""
    model = tiny_model("qwen2")
    inputs = {**_batch(model), "num_items_in_batch": torch.tensor(37)}
    be = compare_with_eager(model, inputs, patterns=CE)
    assert _counts(be) == {"cross_entropy": 1}
    assert be.reports[0].matches[0].variant == "F.cross_entropy, reduction=sum"


EPILOGUE_MODELS = {  # what each family does to its logits before the loss, as the match reports it
    "gemma2": ({}, "softcap 30"),  # c·tanh(logits/c), c = final_logit_softcapping
    "granite": ({"logits_scaling": 8.0}, "logits / 8"),  # logits / logits_scaling
    "cohere": ({}, "logits * 0.0625"),  # logits * logit_scale
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(EPILOGUE_MODELS))
def test_loss_only_step_fuses_the_lm_head_through_scale_and_softcap(family, dtype):
    """Softcapping and logit scales between lm_head and loss join linear_cross_entropy: applied to
    each logit in the kernels, rounded where eager rounds (bf16: the steps run in bf16)."""
    overrides, step = EPILOGUE_MODELS[family]
    # bf16: one layer, against float64 (see compare_half_with_float64 and the siblings test)
    model = tiny_model(family, dtype, **overrides, **({} if dtype == torch.float32 else {"num_hidden_layers": 1}))
    if dtype == torch.float32:
        be = _compare_loss_only(model, _batch(model))
    else:
        be = foak_compile.backend(patterns=CE, inner="aot_eager")
        compare_half_with_float64(
            model,
            _batch(model),
            lambda m: (lambda fn: lambda **kw: SimpleNamespace(loss=fn(**kw)))(
                torch.compile(lambda **kw: m(**kw).loss, backend=be)
            ),
            slack=6e-2,
        )
    assert _counts(be) == {"linear_cross_entropy": 1} and not _misses(be, "linear_cross_entropy")
    m = be.reports[0].matches[0]
    assert m.variant.startswith(f"F.linear, {step}, F.cross_entropy"), m.variant
    r = be.reports[0]  # Gemma 2 also softcaps its attention scores: those tanh stay
    assert r.code_after.count("tanh(") == r.code_before.count("tanh(") - ("softcap" in step)
    assert "lm_head" in m.module


def test_gemma2_plain_call_fuses_the_loss_over_the_capped_logits():
    """A plain forward returns the capped logits: the lm_head stays, the loss over them is fused."""
    model = tiny_model("gemma2")
    be = compare_with_eager(model, _batch(model), patterns=CE)
    assert _counts(be) == {"cross_entropy": 1}
    [reason] = _misses(be, "linear_cross_entropy")
    assert re.fullmatch(
        r"intermediate `logits(_\d+)?` has 2 users \(1 outside the pattern: output(_\d+)?\); " + HINT, reason
    )


# ---------------------------------------------------------------------------------------------
# hand-written losses

V, H = 131, 24


def _inputs(n=13, dtype=torch.float32, ignore=True):
    h = torch.randn(n, H, dtype=dtype)
    w = (torch.randn(V, H) / H**0.5).to(dtype)
    y = torch.randint(0, V, (n,))
    if ignore:
        y[torch.rand(n) < 0.3] = -100
    return h, w, y


def _run(fn, *inputs, inner="aot_eager", rtol=1e-5, atol=1e-6):
    """Compile fn with the two patterns; compare its result and the float inputs' grads with eager."""
    inputs = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    ref_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    ref = fn(*ref_in)
    be = foak_compile.backend(patterns=CE, inner=inner)
    out = torch.compile(fn, backend=be)(*inputs)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol, equal_nan=True)
    g = torch.randn_like(ref) if ref.dim() else torch.rand(()) + 0.5
    out.backward(g)
    ref.backward(g)
    for a, b in zip(inputs, ref_in):
        if b.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol)
    r = be.reports[0]
    return r.counts(), [(m.pattern, m.reason) for m in r.near_misses]


def _lin(h, w):
    return F.linear(h, w)


FUSED = {
    "hf-style": lambda h, w, y: F.cross_entropy(_lin(h, w).float().view(-1, V), y, ignore_index=-100),
    "sum": lambda h, w, y: F.cross_entropy(_lin(h, w), y, reduction="sum"),
    "none": lambda h, w, y: F.cross_entropy(_lin(h, w), y, reduction="none"),
    "label_smoothing": lambda h, w, y: F.cross_entropy(_lin(h, w), y, label_smoothing=0.2),
    "ignore_index=3": lambda h, w, y: F.cross_entropy(_lin(h, w), torch.where(y < 0, 3, y), ignore_index=3),
    "nll(log_softmax)": lambda h, w, y: F.nll_loss(F.log_softmax(_lin(h, w), dim=-1), y),
    "nll(method log_softmax fp32)": lambda h, w, y: F.nll_loss(
        _lin(h, w).log_softmax(-1, dtype=torch.float32), y, reduction="sum"
    ),
    "nll(torch.log_softmax 3d).view": lambda h, w, y: F.nll_loss(
        torch.log_softmax(_lin(h.view(1, -1, H), w), -1).reshape(-1, V), y
    ),
    "nn.CrossEntropyLoss": lambda h, w, y: nn.CrossEntropyLoss(ignore_index=-100)(_lin(h, w).contiguous(), y),
    # a hand-written next-token shift: the same rows of the hidden states go through the lm_head
    "shifted rows": lambda h, w, y: F.cross_entropy(_lin(h.view(1, -1, H), w)[:, :-1].flatten(0, 1).float(), y[1:]),
    "one batch row": lambda h, w, y: F.cross_entropy(torch.flatten(_lin(h.view(1, -1, H), w)[0], 0, -2), y),
    "softcap": lambda h, w, y: F.cross_entropy((torch.tanh(_lin(h, w) / 5.0) * 5.0).float(), y),
    "softcap, method tanh, c first": lambda h, w, y: F.cross_entropy(2.5 * (_lin(h, w) / 2.5).tanh(), y),
    "scale": lambda h, w, y: F.cross_entropy(_lin(h, w).float() * 0.3, y, reduction="sum"),
    "divide then softcap": lambda h, w, y: F.cross_entropy(
        torch.tanh(_lin(h, w).div(3.0) / 4.0) * 4.0, y, label_smoothing=0.1
    ),
    "scale, softcap, none": lambda h, w, y: F.cross_entropy(
        torch.tanh(-0.5 * _lin(h, w) / 2.0) * 2.0, y, reduction="none"
    ),
}


@pytest.mark.parametrize("name", list(FUSED))
def test_lm_head_and_loss_variants_are_fused(name):
    assert _run(FUSED[name], *_inputs()) == ({"linear_cross_entropy": 1}, [])


def test_bias_and_half_precision():
    h, w, y = _inputs(dtype=torch.bfloat16)
    b = torch.randn(V, dtype=torch.bfloat16)
    fn = lambda h, w, b, y: F.cross_entropy(F.linear(h, w, b).float(), y)  # noqa: E731
    assert _run(fn, h, w, b, y, rtol=2e-2, atol=2e-3) == ({"linear_cross_entropy": 1}, [])


def test_a_broadcast_bias_is_a_near_miss():
    """F.linear broadcasts a [1] bias; the kernels would read one per vocabulary column. The softcap
    makes its gradient (summed over the vocabulary) more than rounding."""
    h, w, y = _inputs()
    b = torch.randn(1)
    fn = lambda h, w, b, y: F.cross_entropy(torch.tanh(F.linear(h, w, b) / 2.0) * 2.0, y)  # noqa: E731
    assert _run(fn, h, w, b, y) == (
        {"cross_entropy": 1},
        [("linear_cross_entropy", "lm_head bias (1,) is not a [vocab] tensor of the weight's dtype")],
    )


def test_the_op_refuses_a_bias_of_another_length():
    h, w, y = _inputs()
    with pytest.raises(ValueError, match="is not \\[vocab\\]"):
        torch.ops.foak.linear_cross_entropy(h, w, torch.zeros(1), y, -100, 0.0, "mean", torch.float32)


LOSS_ONLY = {
    "upcast": lambda x, y: F.cross_entropy(x.float(), y),
    "3d view": lambda x, y: F.cross_entropy(x.view(1, -1, V).float().view(-1, V), y),
    "nll(log_softmax)": lambda x, y: F.nll_loss(F.log_softmax(x.float(), -1), y, reduction="sum"),
    "tanh softcap": lambda x, y: F.cross_entropy(torch.tanh(x / 5.0) * 5.0, y),
    # spellings linear_cross_entropy would report next to an lm_head; over given logits: no near-miss
    "tensor temperature": lambda x, y: F.cross_entropy(x.float() * torch.tensor(0.5), y),
    "softcap with two constants": lambda x, y: F.cross_entropy(torch.tanh(x.float() / 4.0) * 5.0, y),
}


@pytest.mark.parametrize("name", list(LOSS_ONLY))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses_on_given_logits(name, dtype):
    x = torch.randn(13, V, dtype=dtype) * 3
    y = _inputs()[2]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    if dtype == torch.bfloat16 and name == "tanh softcap":  # the loss itself sees bf16 logits
        assert _run(LOSS_ONLY[name], x, y, rtol=0, atol=0) == ({}, [("cross_entropy", HALF_LOSS)])
    else:
        assert _run(LOSS_ONLY[name], x, y, **tol) == ({"cross_entropy": 1}, [])


HALF_LOSS = "loss computed over torch.bfloat16 logits without an fp32 upcast (the fp32 kernel would round differently)"


def test_a_loss_over_downcast_logits_is_left_alone():
    """Eager rounds bf16 log-probs along the way; an fp32 kernel would not: a near-miss, bit-exact."""

    def fn(x, y):
        return F.cross_entropy(x.to(torch.bfloat16).view(1, -1, V).view(-1, V), y)

    assert _run(fn, torch.randn(13, V) * 3, _inputs()[2], rtol=0, atol=0) == ({}, [("cross_entropy", HALF_LOSS)])


@pytest.mark.parametrize("steps", ["in bf16", "in fp32 after the upcast"])
def test_softcap_and_scale_on_half_precision_logits(steps):
    """The steps round to bf16 where eager computes them in bf16; after an upcast they stay fp32."""
    h, w, y = _inputs(dtype=torch.bfloat16)
    if steps == "in bf16":
        fn = lambda h, w, y: F.cross_entropy((torch.tanh(F.linear(h, w) * 0.7 / 5.0) * 5.0).float(), y)  # noqa: E731
    else:
        fn = lambda h, w, y: F.cross_entropy(torch.tanh(F.linear(h, w).float() * 0.7 / 5.0) * 5.0, y)  # noqa: E731
    assert _run(fn, h, w, y, rtol=2e-2, atol=2e-3) == ({"linear_cross_entropy": 1}, [])
    be = foak_compile.backend(patterns=CE, inner="aot_eager")
    with torch.no_grad():  # the forward rounds as eager: the same loss to fp32 rounding
        torch.testing.assert_close(torch.compile(fn, backend=be)(h, w, y), fn(h, w, y), rtol=2e-6, atol=0)


EPILOGUE_MISSES = {
    "softcap with two constants": (
        lambda z: torch.tanh(z / 4.0) * 5.0,
        "softcap 5·tanh(z/4): only c·tanh(z/c) with one finite c > 0 is fused",
    ),
    "softcap over z·(1/c)": (
        lambda z: torch.tanh(z * 0.2) * 5.0,
        "softcap 5·tanh(z·0.2): only c·tanh(z/c) with one finite c > 0 is fused",
    ),
    "scale after the softcap": (
        lambda z: torch.tanh(z / 5.0) * 5.0 * 0.5,
        "a softcap after a logit scale or a second softcap between lm_head and loss",
    ),
    "two scales": (lambda z: z * 0.5 / 3.0, "two logit scales between lm_head and loss"),
    "tensor scale": (lambda z: z * torch.tensor(0.5), "logit scale is a tensor, not a constant"),
    "scale 0": (lambda z: z * 0.0, "logit scale 0"),
    "bf16 scale, fp32 softcap": (
        lambda z: torch.tanh((z * 0.5).float() / 5.0) * 5.0,
        "logit scale/softcap steps in torch.float32 and torch.bfloat16: only all in the logits' dtype or all in fp32",
    ),
}


def test_rows_selected_after_a_reshape_are_a_near_miss():
    """hidden[index] is the selected rows only where the index sees the lm_head's own leading dims."""

    def fn(h, w, y):
        return F.cross_entropy(F.linear(h, w).view(1, -1, V)[:, :-1].flatten(0, 1), y[:-1])

    assert _run(fn, *_inputs()) == (
        {"cross_entropy": 1},
        [
            (
                "linear_cross_entropy",
                "the logits are indexed after a reshape of the lm_head's output (13, 131) to (1, 13, 131)",
            )
        ],
    )


@pytest.mark.parametrize("name", list(EPILOGUE_MISSES))
def test_logit_epilogue_near_misses(name):
    """Spellings the kernels do not implement: the lm_head stays, the loss over its output is fused."""
    step, reason = EPILOGUE_MISSES[name]
    dtype = torch.bfloat16 if "bf16" in name else torch.float32
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else {}
    fn = lambda h, w, y: F.cross_entropy(step(F.linear(h, w)).float(), y)  # noqa: E731
    assert _run(fn, *_inputs(dtype=dtype), **tol) == ({"cross_entropy": 1}, [("linear_cross_entropy", reason)])


def test_logits_used_elsewhere_are_a_near_miss_for_the_lm_head():
    def fn(h, w, y):
        logits = F.linear(h, w)
        return F.cross_entropy(logits.float(), y) + logits.mean()

    assert _run(fn, *_inputs()) == (
        {"cross_entropy": 1},
        [("linear_cross_entropy", "intermediate `logits` has 2 users (1 outside the pattern: mean)")],
    )


NEAR_MISSES = {
    "class weights": (
        lambda h, w, y: F.cross_entropy(_lin(h, w), y, weight=torch.linspace(0.5, 2, V)),
        "class weights (weight=) are not supported",
    ),
    "class dim 1": (
        lambda h, w, y: F.cross_entropy(
            _lin(h.view(1, -1, H), w).transpose(1, 2), torch.where(y < 0, 0, y).view(1, -1)
        ),
        "logits of shape (1, 131, 13) with labels (1, 13): only [tokens, vocab] with [tokens] (the class dim last)",
    ),
    "probability targets": (
        lambda h, w, y: F.cross_entropy(_lin(h, w), torch.softmax(h @ w.t() * 0, -1).detach()),
        "class-probability (floating point) targets",
    ),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_misses(name):
    fn, reason = NEAR_MISSES[name]
    assert _run(fn, *_inputs()) == ({}, [("linear_cross_entropy", reason), ("cross_entropy", reason)])


def test_all_ignored_batch_is_nan_like_torch():
    h, w, y = _inputs()
    assert _run(FUSED["hf-style"], h, w, torch.full_like(y, -100)) == ({"linear_cross_entropy": 1}, [])


def test_changing_token_count():
    """A second token count recompiles with a symbolic one: still matched, still exact."""
    be = foak_compile.backend(patterns=CE, inner="aot_eager")
    fn = torch.compile(FUSED["hf-style"], backend=be)
    for n in (13, 17, 29):
        h, w, y = _inputs(n)
        h.requires_grad_()
        torch.testing.assert_close(fn(h, w, y), FUSED["hf-style"](h, w, y), rtol=1e-5, atol=1e-6)
    assert len(be.reports) == 2 and _counts(be) == {"linear_cross_entropy": 2}


def test_out_of_range_label_raises():
    h, w, y = _inputs()
    y[2] = V
    fn = torch.compile(FUSED["hf-style"], backend=foak_compile.backend(patterns=CE, inner="aot_eager"))
    with pytest.raises(RuntimeError, match="label out of range"):
        fn(h, w, y)
    with pytest.raises(Exception, match="out of bounds"):
        FUSED["hf-style"](h, w, y)  # what torch does on CPU


def test_inductor():
    def fn(h, w, x, y):  # both ops in one graph
        return F.cross_entropy(F.linear(h, w).float(), y) + F.cross_entropy(x.float(), y, reduction="sum")

    h, w, y = _inputs()
    assert _run(fn, h, w, torch.randn(13, V), y, inner="inductor") == (
        {"linear_cross_entropy": 1, "cross_entropy": 1},
        [],
    )


def test_inductor_scales_the_taken_gradients_in_place():
    """Training: the compiled forward runs the fused op, which takes the gradients; the backward
    only scales them, in their saved (donated) buffers: no allocation, so dW exists once. Without
    gradients the graph runs the forward alone."""
    from torch._inductor.utils import run_and_get_code

    h, w, y = _inputs()
    h.requires_grad_()
    w.requires_grad_()
    fn = torch.compile(FUSED["hf-style"], backend=foak_compile.backend(patterns=CE, inner="inductor"))
    _, (fwd, bwd) = run_and_get_code(lambda: fn(h, w, y).backward())
    assert "foak.linear_cross_entropy_fused.default(" in fwd
    body = bwd[bwd.index("def call(") :]
    body = body[: body.index("return")]
    assert "foak" not in body and "empty_strided" not in body
    with torch.no_grad():
        _, (code,) = run_and_get_code(lambda: fn(h, w, y))
    assert "foak.linear_cross_entropy_recompute.default(" in code
