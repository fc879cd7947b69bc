"""On a GPU: the foak backend with full inductor on CUDA, where the ops are inlined
(ops/registry.py), against eager; LoRA with and without dropout, bf16 and fp32. Skipped on CPU
(CI runs the opaque-op path; this is the path GPU users get)."""

import copy

import pytest
import torch

import foak_compile
from foak_compile.ops import registry
from tests.models import batch, loss_and_grads, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_llama_matches_eager_on_cuda(dtype, tol, dropout):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama", dtype).cuda()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS))
    for n, p in model.named_parameters():  # nonzero B so the adapters change the loss
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    inputs = {k: v.cuda() for k, v in batch(model, seq=37).items()}
    if dropout:
        model.eval()  # masks differ between eager and the kernel: compare without them...
    eager = copy.deepcopy(model)
    ref_loss, ref_grads = loss_and_grads(eager, inputs)
    be = foak_compile.backend(inner="inductor")
    loss, grads = loss_and_grads(model, inputs, call=torch.compile(model, backend=be))
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    for name in ref_grads:
        torch.testing.assert_close(
            grads[name].float(), ref_grads[name].float(), rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}"
        )
    counts = foak_compile.total_counts(be.reports)
    assert counts.get("lora") == 14 and counts.get("rms_norm") == 5 and counts.get("rope") == 2, counts
    if dropout:  # ...and in training mode check the compiled step runs and draws fresh masks
        model.train()
        torch._dynamo.reset()
        step = torch.compile(model, backend=foak_compile.backend(inner="inductor"))
        l1, l2 = step(**inputs).loss, step(**inputs).loss
        assert torch.isfinite(l1) and l1 != l2


def test_ops_are_inlined_on_cuda():
    assert registry.INLINE and registry.is_inlined("foak::lora_linear") and registry.is_inlined("foak::rms_norm")


@pytest.mark.parametrize("siblings", [False, True])
@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_4bit_lora_llama_on_cuda(quant_type, nested, siblings):
    """bitsandbytes Linear4bit traces differently on CUDA than on CPU (CI): the module-anchored
    match must still replace all of it, and the result equal eager bitsandbytes."""
    pytest.importorskip("bitsandbytes")
    from tests.test_lora_pattern import PROJECTIONS, peft_llama

    model = peft_llama(torch.float32, layers=2, quantize=dict(quant_type=quant_type, nested=nested)).cuda()
    inputs = {k: v.cuda() for k, v in batch(model, seq=29).items()}
    eager = copy.deepcopy(model)
    ref_loss, ref_grads = loss_and_grads(eager, inputs)
    per_layer = [p for p in foak_compile.patterns.DEFAULT if p != "lora_siblings"]
    be = foak_compile.backend(inner="inductor", patterns=["lora", "lora_siblings"] if siblings else per_layer)
    loss, grads = loss_and_grads(model, inputs, call=torch.compile(model, backend=be))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")
    assert foak_compile.total_counts(be.reports).get("lora") == 2 * len(PROJECTIONS)
    assert foak_compile.total_counts(be.reports).get("lora_siblings", 0) == (4 if siblings else 0)
    code = be.reports[0].code_after
    assert "lora_linear_4bit" in code and "torch.ops.bitsandbytes" not in code


@pytest.mark.parametrize("siblings", [False, True])
def test_opaque_dequant_under_inductor(siblings, monkeypatch, foak_config):
    """FOAK_OPAQUE_DEQUANT: the inlined 4-bit ops call the dequant as an opaque op, which the
    compiled step runs through Python (the inlined launch does not), again in the backward for every
    projection whose input gradient is needed (no dequantised weight kept between them; the first version's
    merged calls dequantised nothing there); results equal eager's."""
    pytest.importorskip("bitsandbytes")
    from foak_compile.kernels import bnb4
    from tests.test_lora_pattern import peft_llama

    foak_config(opaque_dequant=True)
    model = peft_llama(torch.bfloat16, layers=1, quantize=dict(quant_type="nf4", nested=True)).cuda()
    inputs = {k: v.cuda() for k, v in batch(model, seq=29).items()}
    ref_loss, ref_grads = loss_and_grads(copy.deepcopy(model), inputs)
    patterns = ["lora", "lora_siblings"] if siblings else ["lora"]
    be = foak_compile.backend(inner="inductor", patterns=patterns)
    step = torch.compile(model, backend=be)
    loss, grads = loss_and_grads(model, inputs, call=step)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    calls = []
    real = bnb4.dequantize_4bit
    monkeypatch.setattr(bnb4, "dequantize_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss = step(**inputs).loss  # compiled already: only the opaque op's body calls the launcher
    forward = len(calls)
    loss.backward()
    # counted per weight (a sibling group launches once per weight). One layer, frozen embeddings and
    # norms: q/k/v have nothing trainable upstream, so no dx and no dequant in the backward; the counts
    # were measured on a GPU (7 forward, 4 backward)
    assert forward == 7 and len(calls) - forward == forward - 3, (forward, len(calls))


def test_linear_ce_compacts_on_cuda_only_after_a_call_that_ignored_many_rows(monkeypatch):
    """The row compaction's host sync is taken only when the previous call's (asynchronously
    copied) ignored share was ≥ COMPACT_MIN_IGNORED; every decision gives torch's numbers."""
    from foak_compile.kernels import cross_entropy as kernel

    monkeypatch.setattr(kernel, "_IGNORED", kernel._IgnoredFraction())
    decisions = []
    real = kernel._kept_rows

    def spy(labels, ignore_index):
        idx = real(labels, ignore_index)
        decisions.append(idx is not None)
        return idx

    monkeypatch.setattr(kernel, "_kept_rows", spy)
    h = torch.randn(301, 67, device="cuda")
    w = torch.randn(1003, 67, device="cuda")
    few = torch.randint(0, 1003, (301,), device="cuda")
    few[0] = -100
    many = few.clone()
    many[::2] = -100
    for labels in (many, many, few, few):
        loss, _ = kernel.linear_cross_entropy_forward(h, w, None, labels, -100)
        torch.cuda.synchronize()
        ref = torch.nn.functional.cross_entropy(h @ w.t(), labels, reduction="none")
        torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    # the first call knows nothing yet; then it follows the previous call's labels
    assert decisions == [False, True, True, False], decisions


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
def test_lora_siblings_on_cuda(dtype, tol):
    """The opt-in sibling grouping, inlined into inductor on CUDA, against eager."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama", dtype).cuda(), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    inputs = {k: v.cuda() for k, v in batch(model, seq=37).items()}
    ref_loss, ref_grads = loss_and_grads(copy.deepcopy(model), inputs)
    be = foak_compile.backend(patterns=["lora", "lora_siblings"], inner="inductor")
    loss, grads = loss_and_grads(model, inputs, call=torch.compile(model, backend=be))
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    for name in ref_grads:
        torch.testing.assert_close(
            grads[name].float(), ref_grads[name].float(), rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}"
        )
    assert foak_compile.total_counts(be.reports).get("lora_siblings") == 4
