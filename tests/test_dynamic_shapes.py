"""Dynamic shapes: a real model stepping through batch sizes and sequence lengths, with
torch.compile's default (automatic dynamic), dynamic=True and mark_dynamic. Every step equals
eager; foak compiles exactly as often as the same compile with backend="aot_eager" (its pattern
checks add no guards); every compiled graph, symbolic or not, has every pattern rewritten.
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

import foak_compile
from tests.models import batch, loss_and_grads, tiny_model

pytestmark = pytest.mark.slow  # real models stepped through many shapes

# (batch, seq): a new seq, then a new batch, then a new pair of sizes already seen; no size 1
# (torch specialises 0 and 1 whatever the mode)
STEPS = [(2, 5), (2, 9), (3, 7), (3, 5)]
COUNTS = {"rms_norm": 3, "rope": 1, "cross_entropy": 1}  # one decoder layer


def _model():
    return tiny_model("llama", num_hidden_layers=1)


class Counting:
    """The aot_eager backend, counting the graphs it is asked to compile."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return lookup_backend("aot_eager")(gm, example_inputs)


def _steps(model, backend, mode, loss_only=False, check=True):
    """Run STEPS through `model` compiled with `backend` in `mode`; each step's loss and trainable
    grads against eager when `check`."""
    torch._dynamo.reset()
    eager = copy.deepcopy(model)
    target = (lambda **b: model(**b).loss) if loss_only else model
    compiled = torch.compile(target, backend=backend, dynamic=True if mode == "dynamic=True" else None)
    if loss_only:  # what loss_and_grads reads
        compiled = (lambda fn: lambda **b: SimpleNamespace(loss=fn(**b)))(compiled)
    for i, (b, s) in enumerate(STEPS):
        inputs = batch(model, bs=b, seq=s, seed=i)
        if mode == "mark_dynamic":
            torch._dynamo.mark_dynamic(inputs["input_ids"], 0)  # labels is the same tensor
            torch._dynamo.mark_dynamic(inputs["input_ids"], 1)
        loss, grads = loss_and_grads(model, inputs, call=compiled)
        if check:
            ref_loss, ref_grads = loss_and_grads(eager, inputs)
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {i}: {m}")
            assert grads.keys() == ref_grads.keys()
            for name in ref_grads:
                torch.testing.assert_close(
                    grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"step {i}, {name}: {m}"
                )


@pytest.mark.parametrize("mode", ["default", "dynamic=True", "mark_dynamic"])
def test_changing_batch_and_sequence_length(mode):
    be = foak_compile.backend(inner="aot_eager")
    _steps(_model(), be, mode)
    baseline = Counting()
    _steps(_model(), baseline, mode, check=False)
    # as many compiles as torch makes anyway (default: static, then the changed dims symbolic)
    assert len(be.reports) == baseline.graphs, (len(be.reports), baseline.graphs)
    assert len(be.reports) <= 4
    for r in be.reports:
        assert r.counts() == COUNTS, r.to_text()
    # after the first graph (default) or from the start, the graphs take symbolic sizes
    assert all("torch.SymInt" in r.code_before for r in be.reports[mode == "default" :])


def test_loss_only_compile_fuses_the_lm_head_with_symbolic_token_counts():
    """The loss-only compile (linear_cross_entropy) under dynamic=True: the fused lm_head + loss
    in every graph, and no more graphs than aot_eager compiles."""
    be = foak_compile.backend(inner="aot_eager")
    _steps(_model(), be, "dynamic=True", loss_only=True)
    baseline = Counting()
    _steps(_model(), baseline, "dynamic=True", loss_only=True, check=False)
    assert len(be.reports) == baseline.graphs
    for r in be.reports:
        assert r.counts() == {"rms_norm": 3, "rope": 1, "linear_cross_entropy": 1}, r.to_text()


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_loss_only_compile_fuses_softcap_and_logit_scale_under_dynamic_true(family):
    """Gemma 2's softcap and Cohere's logit_scale reach the graph as `.item()` reads under
    dynamic=True: specialised on like eps, so the lm_head + loss is still one op in every graph."""
    be = foak_compile.backend(patterns=["linear_cross_entropy", "cross_entropy"], inner="aot_eager")
    _steps(tiny_model(family, num_hidden_layers=1), be, "dynamic=True", loss_only=True)
    assert be.reports and all(r.counts() == {"linear_cross_entropy": 1} for r in be.reports)
    assert all(not r.near_misses for r in be.reports), [r.to_text() for r in be.reports]


def test_unspecialised_eps_is_guarded_on():
    """dynamic=True passes HF's float `variance_epsilon` as a tensor read with .item(); the
    rewrite specialises on its value, so a changed eps recompiles instead of going stale."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(24, eps=1e-6)
    be = foak_compile.backend(inner="aot_eager")
    compiled = torch.compile(norm, backend=be, dynamic=True)
    x = torch.randn(3, 5, 24) * 1e-3  # small enough for eps to matter
    torch._dynamo.mark_static(x, 2)  # the hidden size, static as in a model
    for eps in (1e-6, 1e-6, 0.5):
        norm.variance_epsilon = eps
        torch.testing.assert_close(compiled(x), norm(x))
    assert [r.counts() for r in be.reports] == [{"rms_norm": 1}] * len(be.reports)
    # the first graph reads eps with .item(): matched, the read goes with the match (Dynamo then
    # restarts with eps specialised, as it does for aot_eager); the new eps made a new graph
    first = be.reports[0]
    assert ".item()" in first.code_before and ".item()" not in first.code_after
    assert "0.5, None" in be.reports[-1].code_after


def test_inductor_with_symbolic_sizes():
    """Inductor generates code around the ops' fake impls with symbolic sizes: two token counts
    through one dynamic graph."""
    model = _model()
    be = foak_compile.backend(inner="inductor")
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=be, dynamic=True)
    for i, (b, s) in enumerate([(2, 5), (3, 8)]):
        inputs = batch(model, bs=b, seq=s, seed=i)
        loss, grads = loss_and_grads(model, inputs, call=compiled)
        ref_loss, ref_grads = loss_and_grads(eager, inputs)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5)
    assert be.reports and all(r.counts() == COUNTS for r in be.reports)
    assert all("torch.SymInt" in r.code_before for r in be.reports)


def test_symbolic_last_dims_are_left_alone():
    """Documented: the fused ops need a static last dim (hidden size, head_dim, vocab), as in
    models, where it comes from the weights. A standalone function compiled with dynamic=True
    makes it symbolic: reported as a near-miss and run as written."""

    def fn(x, q, cos, sin, logits, y):
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = q.shape[-1] // 2
        r = q * cos.unsqueeze(1) + torch.cat((-q[..., h:], q[..., :h]), -1) * sin.unsqueeze(1)
        return n, r, torch.nn.functional.cross_entropy(logits.float(), y)

    be = foak_compile.backend(inner="aot_eager")
    compiled = torch.compile(fn, backend=be, dynamic=True)
    for t, d, v in ((3, 8, 11), (5, 6, 13)):
        args = (
            torch.randn(t, d),
            torch.randn(2, 4, t, d),
            torch.randn(2, t, d),
            torch.randn(2, t, d),
            torch.randn(t, v),
            torch.randint(0, v, (t,)),
        )
        for a, b in zip(compiled(*args), fn(*args)):
            torch.testing.assert_close(a, b)
    [report] = be.reports
    assert report.counts() == {}
    reasons = {m.pattern: m.reason for m in report.near_misses}
    assert reasons == {
        "rms_norm": "hidden size is symbolic",
        "rope": "head_dim is symbolic",
        "cross_entropy": "logits: the last dim is symbolic",
    }, reasons


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_peft_lora_under_dynamic_true(dropout):
    """dynamic=True passes peft's float scaling (and dropout p) as 0-d tensors read with .item():
    the lora pattern specialises on the value, as rms_norm does with eps, so the graph the steps
    run is fully rewritten, every step equal to eager."""
    from tests.test_lora_pattern import PROJECTIONS, peft_llama

    model = peft_llama(layers=1, dropout=dropout).train()
    if dropout:  # masks differ from eager's by design: check the rewrite, not the numbers
        be = foak_compile.backend(inner="aot_eager")
        compiled = torch.compile(model, backend=be, dynamic=True)
        for i, (b, s) in enumerate(STEPS[:2]):
            loss, _ = loss_and_grads(model, batch(model, bs=b, seq=s, seed=i), call=compiled)
            assert torch.isfinite(loss)
    else:
        be = foak_compile.backend(inner="aot_eager")
        _steps(model, be, "dynamic=True")
    last = be.reports[-1]
    assert last.counts().get("lora") == len(PROJECTIONS), last.summary()
    assert "torch.SymInt" in last.code_before
    assert not [m for m in last.near_misses if m.pattern == "lora"], last.summary()
