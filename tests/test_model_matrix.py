"""Every popular decoder family: the dump's counts equal what the architecture contains, near-misses
carry their reason, loss and every trainable gradient match eager, and training tracks eager."""

import copy
from collections import Counter

import pytest
import torch

import foak_compile
from tests.matrix import FAMILIES, build, expected_counts, record
from tests.models import compare_half_with_float64, loss_and_grads
from tests.helpers import rel_err

pytestmark = pytest.mark.slow  # real-model parity across the model matrix


def _inputs(model, seq=11):
    ids = torch.randint(3, model.config.vocab_size, (2, seq))
    return {"input_ids": ids, "labels": ids}


def _with_lora(model):
    from peft import LoraConfig, get_peft_model

    targets = [
        n
        for n in ("q_proj", "v_proj", "c_attn", "qkv_proj", "mlp")
        if any(name.endswith(n) and isinstance(m, torch.nn.Linear) for name, m in model.named_modules())
    ]
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets)), targets


def _near_misses(reports):
    return dict(Counter(f"{m.pattern}: {m.reason.split(' (')[0]}" for r in reports for m in r.near_misses))


@pytest.mark.parametrize("variant", ["base", "lora"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_counts_and_parity(family, variant):
    model = build(family)
    expected = expected_counts(model, family)
    if variant == "lora":
        model, _ = _with_lora(model)
    inputs = _inputs(model)
    eager = copy.deepcopy(model)
    ref_loss, ref_grads = loss_and_grads(eager, inputs)
    be = foak_compile.backend(inner="aot_eager")
    loss, grads = loss_and_grads(model, inputs, call=torch.compile(model, backend=be))

    counts = foak_compile.total_counts(be.reports)
    misses = _near_misses(be.reports)
    errs = [rel_err(loss, ref_loss)] + [rel_err(grads[n], ref_grads[n]) for n in ref_grads]
    record(family, variant, {"counts": counts, "near_misses": misses, "max_rel_err": max(errs)})

    for pattern, n in expected.items():
        assert counts.get(pattern, 0) == n, (pattern, counts, misses)
    if variant == "lora":  # every adapted projection is fused: one match per peft LoRA layer
        from peft.tuners.lora import LoraLayer

        layers = sum(isinstance(m, LoraLayer) for m in model.modules())
        assert layers and counts.get("lora", 0) == layers, (layers, counts, misses)
    assert grads.keys() == ref_grads.keys() and grads
    assert max(errs) < 1e-4, max(errs)
    if family == "gpt_bigcode":  # LayerNorm everywhere: reported, never rewritten
        assert misses["rms_norm: LayerNorm subtracts the mean: not an RMSNorm"] == 2 * 2 + 1
    if family == "gemma2":  # the capped logits are returned: the loss over them is fused, the lm_head is not
        assert [m for m in misses if m.startswith("linear_cross_entropy: intermediate `logits")], misses


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "mixtral"])
def test_bf16_parity(family):
    """bf16: the fused ops round at the places eager rounds. Loss and every grad against the float64
    model, held to twice eager's own bf16 error (plus slack): against eager element by element, two
    layers of bf16 noise made such a check pass or fail by the draw."""
    model = build(family, torch.bfloat16)
    be = foak_compile.backend(inner="aot_eager")
    ref_dtype = torch.float32 if family == "mixtral" else torch.float64  # grouped_mm has no float64
    compare_half_with_float64(
        model, _inputs(model), lambda m: torch.compile(m, backend=be), slack=1e-2, reference_dtype=ref_dtype
    )
    assert foak_compile.total_counts(be.reports)["rms_norm"] == expected_counts(model, family)["rms_norm"]


def _corpus(vocab, n=8, seq=24, seed=0):
    """Learnable structure: each row counts upwards (mod vocab) from a random start."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(3, vocab, (n, 1), generator=g)
    return (start + torch.arange(seq)) % (vocab - 3) + 3


def _train(model, call, ids, steps):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = call(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "mixtral"])
def test_training_tracks_eager(family):
    """12 AdamW steps, fixed seed: foak's loss curve stays within 1e-3 (relative) of eager's. (12, not
    30: each step runs the kernels in the interpreter, ~8 s; eager's loss falls to 0.45-0.60 of its
    first value by then in every family, so a wrong gradient has room to show.)"""
    torch.manual_seed(0)
    model = build(family)
    ids = _corpus(model.config.vocab_size)
    eager = copy.deepcopy(model)
    ref = _train(eager, eager, ids, 12)
    got = _train(model, torch.compile(model, backend=foak_compile.backend(inner="aot_eager")), ids, 12)
    assert ref[-1] < 0.7 * ref[0], "the corpus must be learnable for this test to mean anything"
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
    assert worst < 1e-3, (worst, got, ref)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "gemma3", "mixtral"])
def test_nf4_base_lora_parity(family):
    """QLoRA: every nn.Linear but lm_head → bitsandbytes NF4 (double quant), LoRA on top: loss and
    every LoRA grad equal eager bitsandbytes, and each LoRA layer is fused over its 4-bit base."""
    pytest.importorskip("bitsandbytes")
    if family not in FAMILIES:
        pytest.skip(f"{family} not in the matrix")
    from peft.tuners.lora import LoraLayer
    from tests.test_lora_pattern import _to_4bit

    model = _to_4bit(build(family), quant_type="nf4", nested=True)
    model, _ = _with_lora(model)
    with torch.no_grad():  # nonzero B: the adapters must change the loss
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    inputs = _inputs(model)
    eager = copy.deepcopy(model)
    ref_loss, ref_grads = loss_and_grads(eager, inputs)
    be = foak_compile.backend(inner="aot_eager")
    loss, grads = loss_and_grads(model, inputs, call=torch.compile(model, backend=be))
    errs = [rel_err(loss, ref_loss)] + [rel_err(grads[n], ref_grads[n]) for n in ref_grads]
    assert grads.keys() == ref_grads.keys() and grads
    assert max(errs) < 1e-4, max(errs)
    layers = sum(isinstance(m, LoraLayer) for m in model.modules())
    counts = foak_compile.total_counts(be.reports)
    assert layers and counts.get("lora", 0) == layers, (layers, counts, _near_misses(be.reports))
    assert all("bitsandbytes 4-bit nf4" in m.variant for r in be.reports for m in r.matches if m.pattern == "lora")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_only_compile_fuses_lm_head_and_loss(family):
    """Compiled so that only the loss leaves the graph, every family's lm_head and loss are one
    linear_cross_entropy (through Gemma 2's softcapping too), and the rest is rewritten as in the
    plain call; loss and every gradient equal eager."""
    model = build(family)
    expected = {**expected_counts(model, family), "linear_cross_entropy": 1}
    del expected["cross_entropy"]
    inputs = _inputs(model)
    eager = copy.deepcopy(model)
    ref_loss, ref_grads = loss_and_grads(eager, inputs)
    be = foak_compile.backend(inner="aot_eager")
    step = torch.compile(lambda **kw: model(**kw).loss, backend=be)
    loss, grads = loss_and_grads(model, inputs, call=lambda **kw: type("Out", (), {"loss": step(**kw)}))
    counts = foak_compile.total_counts(be.reports)
    assert {p: counts.get(p, 0) for p in expected} == expected, (counts, _near_misses(be.reports))
    assert "cross_entropy" not in counts and not [
        m for r in be.reports for m in r.near_misses if m.pattern == "linear_cross_entropy"
    ]
    errs = [rel_err(loss, ref_loss)] + [rel_err(grads[n], ref_grads[n]) for n in ref_grads]
    assert grads.keys() == ref_grads.keys() and max(errs) < 1e-4, max(errs)
