"""The lora pattern over GPTQ bases: a tiny Llama (and Qwen2, whose q/k/v have biases) quantised by
optimum's GPTQ quantizer running gptqmodel's own GPTQ algorithm on calibration activations and
packed by gptqmodel's own packer into its TorchLinear layers, peft LoRA (GPTQLoraLinear) on every
projection; loss and LoRA gradients against eager, and the GPTQ layers left alone with a reason.
Needs the optional extra (scripts/install_gptq.sh); skipped without it."""

import copy

import pytest
import torch
import torch._inductor.config as inductor_config

import foak_compile
from tests.models import batch, compare_with_eager, inference_matches_eager, loss_and_grads, tiny_model
from tests.helpers import rel_err

pytestmark = pytest.mark.slow  # real gptqmodel models quantised and trained

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# gptqmodel's packer wants in/out features divisible by 32
SIZES = dict(hidden_size=64, intermediate_size=96, head_dim=16, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(autouse=True)
def _gptqmodel(monkeypatch):
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum.gptq")
    # gptqmodel's pure-Python packer rather than its JIT-compiled C++ one: same layout, no compile in CI
    monkeypatch.setenv("GPTQMODEL_DISABLE_PACK_EXT", "1")


def quantized(
    family="llama",
    dtype=torch.float32,
    bits=4,
    group_size=32,
    desc_act=True,
    sym=False,
    backend="torch",
    layers=1,
    loaded=True,
):
    """A tiny model GPTQ-quantised by optimum + gptqmodel on random calibration tokens."""
    from optimum.gptq import GPTQQuantizer

    torch.manual_seed(0)
    model = tiny_model(family, dtype, num_hidden_layers=layers, **SIZES)
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(0, 131, (1, 32), generator=g).tolist(), "attention_mask": [[1] * 32]}
        for _ in range(4)
    ]
    q = GPTQQuantizer(
        bits=bits,
        dataset=data,
        group_size=group_size,
        desc_act=desc_act,
        sym=sym,
        act_group_aware=False,
        backend=backend,
        model_seqlen=32,
    )
    model = q.quantize_model(model)
    if loaded:  # the buffers as loading a checkpoint gives them: normal tensors, not inference-mode ones
        for mod in model.modules():
            for name, buf in list(mod._buffers.items()):
                if buf is not None and buf.is_inference():
                    mod._buffers[name] = buf.clone()
    return model


def with_lora(model, r=4, alpha=8, dropout=0.0, targets=PROJECTIONS):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # peft starts lora_B at zero, which would hide any error in the adapter's path
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def lora_counts(be):
    return foak_compile.total_counts(be.reports).get("lora", 0)


def lora_misses(be):
    return [m.reason for r in be.reports for m in r.near_misses if m.pattern == "lora"]


def test_gptq_llama_4bit_act_order_is_fused_and_exact():
    model = with_lora(quantized())
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "GPTQLoraLinear"
    be = compare_with_eager(model, batch(model), patterns=["lora"], rtol=1e-5, atol=1e-5)
    assert lora_counts(be) == len(PROJECTIONS) and not lora_misses(be)
    variants = [m.variant for m in be.reports[0].matches]
    assert all("gptqmodel TorchLinear 4-bit" in v and "act-order" in v and "compute float32" in v for v in variants)
    assert "float16 scales" in variants[0] and "tuners/lora/gptq.py" in be.reports[0].matches[0].source
    code = be.reports[0].code_after
    assert "lora_linear_gptq" in code and "bitwise" not in code  # no unpacking left in the graph


def compare_in_half_precision(model, inputs, half):
    """The op runs peft's fp32 adapters in the layer's half dtype (as autocast would), so it is held
    to what eager gets with `half` adapters: loss and every LoRA gradient (relative to its largest
    element) no further from eager's fp32-adapter numbers than twice that, plus 1e-3 / 2e-2."""
    ref_loss, ref_grads = loss_and_grads(copy.deepcopy(model), inputs)
    cast = copy.deepcopy(model)
    for name, p in cast.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(half)
    half_loss, half_grads = loss_and_grads(cast, inputs)
    be = foak_compile.backend(patterns=["lora"], inner="aot_eager")
    loss, grads = loss_and_grads(model, inputs, call=torch.compile(model, backend=be))
    assert rel_err(loss, ref_loss) <= 2 * rel_err(half_loss, ref_loss) + 1e-3
    assert grads.keys() == ref_grads.keys() and grads
    for name in ref_grads:
        assert grads[name].dtype == ref_grads[name].dtype, name
        assert rel_err(grads[name], ref_grads[name]) <= 2 * rel_err(half_grads[name], ref_grads[name]) + 2e-2, name
    return be


@pytest.mark.parametrize(
    "dtype,bits,group_size,desc_act,sym", [(torch.bfloat16, 4, 32, False, True), (torch.float16, 8, -1, False, False)]
)
def test_gptq_half_precision(dtype, bits, group_size, desc_act, sym):
    """bf16 / fp16 models (gptqmodel keeps fp16 scales; the weight is cast to the activations' dtype)."""
    model = with_lora(quantized(dtype=dtype, bits=bits, group_size=group_size, desc_act=desc_act, sym=sym))
    be = compare_in_half_precision(model, batch(model), dtype)
    assert lora_counts(be) == len(PROJECTIONS) and not lora_misses(be)
    v = be.reports[0].matches[0].variant
    assert f"{bits}-bit" in v and f"compute {str(dtype).split('.')[-1]}" in v
    assert f"{1 if group_size == -1 else 64 // group_size} group(s)" in v  # q_proj: 64 inputs


def test_gptq_base_with_bias():
    """Qwen2's q/k/v projections have biases, which gptqmodel keeps as fp16 buffers."""
    model = with_lora(quantized("qwen2"))
    be = compare_with_eager(model, batch(model), patterns=["lora"], rtol=1e-5, atol=1e-5)
    assert lora_counts(be) == len(PROJECTIONS) and not lora_misses(be)
    assert sum("+ bias" in m.variant for m in be.reports[0].matches) == 3


def test_another_gptqmodel_class_computing_in_torch_ops_is_fused():
    """The module type and its buffers decide, not one class's op sequence: gptqmodel's
    TorchFusedLinear in training casts fp32 activations to bf16 and dequantises in torch ops."""
    model = with_lora(quantized(backend="torch_fused", desc_act=False, sym=True), targets=["q_proj", "down_proj"])
    be = compare_in_half_precision(model, batch(model), torch.bfloat16)
    assert lora_counts(be) == 2 and not lora_misses(be)
    assert "gptqmodel TorchFusedLinear 4-bit" in be.reports[0].matches[0].variant
    assert "compute bfloat16" in be.reports[0].matches[0].variant


def _loss(call, inputs, seed):
    torch.manual_seed(seed)  # fixes the dropout masks
    return call(**inputs).loss


def test_gptq_dropout_in_training_uses_one_mask_forward_and_backward():
    """With the masks fixed by the seed, the compiled gradient is the derivative of the compiled
    loss (a central difference along a random direction of the adapter weights)."""
    model = with_lora(quantized(), dropout=0.1, targets=["q_proj", "v_proj", "down_proj"])
    inputs = batch(model)
    be = foak_compile.backend(patterns=["lora"], inner="aot_eager")
    compiled = torch.compile(model, backend=be)
    model.zero_grad(set_to_none=True)
    loss = _loss(compiled, inputs, seed=3)
    loss.backward()
    assert lora_counts(be) == 3 and "dropout p=0.1" in be.reports[0].matches[0].variant
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(1)
    direction = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
    norm = sum((d * d).sum() for d in direction.values()).sqrt()
    slope = sum((p.grad * direction[n]).sum() for n, p in params.items()).item() / norm.item()
    eps = 2e-3

    def loss_at(t):
        with torch.no_grad():
            for n, p in params.items():
                p.add_(t * eps * direction[n] / norm)
            value = _loss(compiled, inputs, seed=3).item()
            for n, p in params.items():
                p.sub_(t * eps * direction[n] / norm)
        return value

    finite_difference = (loss_at(1) - loss_at(-1)) / (2 * eps)
    assert abs(finite_difference - slope) < 1e-2 * abs(slope) + 1e-3, (finite_difference, slope)
    with torch.no_grad():
        again, other = _loss(compiled, inputs, seed=3), _loss(compiled, inputs, seed=4)
    assert again.item() == loss.item() and other.item() != loss.item()


# --- left alone, with the reason ------------------------------------------------------------------


def _fused_kernel_in_eval():
    """gptqmodel's TorchFusedLinear after its first eval forward: repacked for aten's int4 CPU GEMM."""
    model = with_lora(quantized(backend="torch_fused", desc_act=False, sym=True), targets=["q_proj"])
    model.eval()
    # that forward also switches inductor's freezing and max_autotune on for the whole process
    with torch.no_grad(), inductor_config.patch(freezing=False, max_autotune=False):
        model(**batch(model))
    return model


def _inference_tensors():
    return with_lora(quantized(loaded=False), targets=["q_proj"])


def _three_bit():
    return with_lora(quantized(bits=3), targets=["q_proj"])


def _disabled():
    return with_lora(quantized(), targets=["q_proj"])


def _eval_mode():
    """In eval mode TorchLinear dequantises through Python-side caches, which break the graph."""
    return with_lora(quantized(), targets=["q_proj"]).eval()


NEAR_MISSES = {
    "opaque kernel": (
        _fused_kernel_in_eval,
        "gptqmodel TorchFusedLinear runs an opaque kernel (aten._weight_int4pack_mm_for_cpu",
    ),
    "inference-mode buffers": (_inference_tensors, "inference tensors"),
    "3-bit": (_three_bit, "fit no 2/4/8-bit int32 packing"),
    "adapters disabled": (_disabled, "adapters merged or disabled"),
    "eval mode": (_eval_mode, "the base layer ran outside this graph"),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_gptq_near_misses_are_left_alone_and_reported(name):
    build, reason = NEAR_MISSES[name]
    model = build()
    inputs = batch(model)
    be = inference_matches_eager(
        model, inputs, context=(lambda m: m.disable_adapter()) if name == "adapters disabled" else None
    )
    assert lora_counts(be) == 0
    assert any(reason in r for r in lora_misses(be)), lora_misses(be)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gptq_siblings_are_grouped_and_exact(family):
    """q/k/v and gate/up over GPTQ bases: one stacked-weight op each (Qwen2: q/k/v with frozen
    biases), loss and LoRA grads as eager's."""
    model = with_lora(quantized(family))
    be = compare_with_eager(model, batch(model), patterns=["lora", "lora_siblings"], rtol=1e-5, atol=1e-5)
    counts = foak_compile.total_counts(be.reports)
    assert counts.get("lora") == len(PROJECTIONS) and counts.get("lora_siblings") == 2, counts
    variants = [m.variant for r in be.reports for m in r.matches if m.pattern == "lora_siblings"]
    assert variants == [
        "3 GPTQ siblings, one stacked weight (q_proj, k_proj, v_proj)",
        "2 GPTQ siblings, one stacked weight (gate_proj, up_proj)",
    ], variants
    assert "lora_linear_gptq_siblings" in be.reports[0].code_after
