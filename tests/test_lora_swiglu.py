"""The SwiGLU product fused into a LoRA down-projection: kernels/swiglu.py against eager's rounding
and float64, torch.ops.foak.lora_linear_swiglu against float64 (dropout through its mask), and
the `lora_swiglu` pattern on real peft models and hand-written MLPs."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import foak_compile
from foak_compile.kernels import lora as lora_kernel
from foak_compile.kernels import swiglu
from foak_compile.kernels.common import INTERPRET
from foak_compile.patterns import DEFAULT
from tests.models import batch, compare_with_eager, tiny_model
from tests.test_lora_pattern import PROJECTIONS, compare_half_with_eager, peft_llama
from tests.test_lora_siblings import _grads_vs_eager
from tests.helpers import rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _randn(*shape, dtype, device, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)  # fixed: exact comparisons must not depend on the draw
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


# --- kernels -------------------------------------------------------------------------------------


def _two_roundings(g, u, exp):
    """silu in fp32 with the given exp, rounded to g's dtype, times u in fp32, rounded again."""
    gf = g.float()
    s = (gf / (1.0 + exp(-gf))).to(g.dtype)
    return (s.float() * u.float()).to(g.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_rounds_as_eager(dtype, device):
    wide = _randn(3, 37, 2 * 301, dtype=dtype, device=device, scale=4.0)
    g, u = wide.split(301, dim=-1)  # strided halves, as a 4-bit siblings op hands them over
    h = swiglu.swiglu(g, u)
    eager = F.silu(g) * u
    assert h.dtype == dtype and h.shape == g.shape
    if not INTERPRET:  # CUDA: libdevice's expf and an IEEE division, as CUDA's silu; CPU: F.silu itself
        assert torch.equal(h, eager)
        return
    # the interpreter's exp is numpy's, which can differ from torch's in the last fp32 bit: with it
    # the two roundings are exact; against eager only that last bit may differ, and rarely
    numpy_exp = lambda t: torch.from_numpy(np.exp(t.numpy()))  # noqa: E731
    assert torch.equal(h, _two_roundings(g, u, numpy_exp))
    if dtype == torch.float32:
        assert torch.allclose(h, eager, rtol=2**-20, atol=1e-30)  # a few ulp
    else:  # a single rounding of silu(g)·u would differ from eager on about a quarter of them
        assert (h != eager).float().mean().item() < 1e-3
        assert torch.equal(h, eager) or dtype == torch.float16


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_kernel_vs_float64(dtype, device):
    g = _randn(41, 67, dtype=dtype, device=device, scale=4.0, seed=1)
    u, dh = _randn(41, 67, dtype=dtype, device=device, seed=2), _randn(41, 67, dtype=dtype, device=device, seed=3)
    dg, du = swiglu.swiglu_backward(dh, g, u, True, True)
    g64, u64 = (t.double().requires_grad_() for t in (g, u))
    (F.silu(g64) * u64).backward(dh.double())
    assert dg.dtype == du.dtype == dtype
    assert rel_err(dg, g64.grad) < TOL[dtype] / 4 and rel_err(du, u64.grad) < TOL[dtype] / 4
    if dtype == torch.bfloat16:  # du as eager's mul gradient: dh times the rounded silu, rounded once
        assert torch.equal(du, (dh.float() * F.silu(g).float()).to(dtype))
    only_g, no_u = swiglu.swiglu_backward(dh, g, u, True, False)
    no_g, only_u = swiglu.swiglu_backward(dh, g, u, False, True)
    assert torch.equal(only_g, dg) and torch.equal(only_u, du) and no_u.numel() == no_g.numel() == 0


# --- the op --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_op_forward_backward_vs_float64(dtype, p, device):
    lead, ffn, out_f, r, s = (2, 37), 53, 29, 5, 1.75
    gate = (torch.randn(*lead, ffn, device=device) * 2).to(dtype).requires_grad_()
    up = torch.randn(*lead, ffn, device=device, dtype=dtype).requires_grad_()
    w = torch.randn(out_f, ffn, device=device, dtype=dtype) / ffn**0.5
    bias = torch.randn(out_f, device=device, dtype=dtype).requires_grad_()
    a = (torch.randn(r, ffn, device=device, dtype=dtype) / ffn**0.5).requires_grad_()
    b = torch.randn(out_f, r, device=device, dtype=dtype).requires_grad_()
    y, t, seed = torch.ops.foak.lora_linear_swiglu(gate, up, w, bias, a, b, s, p, dtype)
    assert y.dtype == dtype and y.shape == (*lead, out_f) and t.shape == (*lead, r)
    keep = 1.0
    if p:  # the mask lora_linear would draw from this seed, over h's [rows, ffn]
        ones = torch.ones(lead[0] * lead[1], ffn, device=device)
        keep = (lora_kernel.dropout(ones, seed, p, torch.float32) != 0).view(gate.shape).double()
        assert 0.8 < keep.mean().item() < 0.97
    dy = torch.randn_like(y)
    y.backward(dy)
    g64, u64, bias64, a64, b64 = (x.detach().double().requires_grad_() for x in (gate, up, bias, a, b))
    h = F.silu(g64) * u64
    ref = h @ w.double().t() + bias64 + s * ((h * keep / (1.0 - p)) @ a64.t()) @ b64.t()
    ref.backward(dy.double())
    assert rel_err(y, ref) < TOL[dtype]
    for name, got, want in (("gate", gate, g64), ("up", up, u64), ("bias", bias, bias64), ("A", a, a64), ("B", b, b64)):
        assert got.grad.dtype == dtype, name
        assert rel_err(got.grad, want.grad) < TOL[dtype], (name, rel_err(got.grad, want.grad))


def test_op_saves_gate_and_up_not_the_product():
    gate, up = torch.randn(7, 11, requires_grad=True), torch.randn(7, 11, requires_grad=True)
    a, b = torch.randn(3, 11, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        torch.ops.foak.lora_linear_swiglu(gate, up, torch.randn(5, 11), None, a, b, 1.0, 0.0, torch.float32)
    activations = [x for x in saved if x.shape == gate.shape]
    assert len(activations) == 2 and {x.data_ptr() for x in activations} == {gate.data_ptr(), up.data_ptr()}


def test_op_rejects_gate_and_up_of_different_dtypes():
    with pytest.raises(ValueError, match="share shape and dtype"):
        torch.ops.foak.lora_linear_swiglu(
            torch.randn(4, 8),
            torch.randn(4, 8, dtype=torch.float64),
            torch.randn(5, 8),
            None,
            torch.randn(2, 8),
            torch.randn(5, 2),
            1.0,
            0.0,
            torch.float32,
        )


# --- the pattern on peft models ------------------------------------------------------------------


def _swiglu_variants(be):
    return [m.variant for r in be.reports for m in r.matches if m.pattern == "lora_swiglu"]


def _swiglu_misses(be):
    return [m.reason for r in be.reports for m in r.near_misses if m.pattern == "lora_swiglu"]


@pytest.mark.parametrize("siblings", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_llama_down_projection_takes_the_product(siblings):
    model = peft_llama(layers=2)
    patterns = ["lora", "lora_siblings", "lora_swiglu"] if siblings else ["lora", "lora_swiglu"]
    be = compare_with_eager(
        model, batch(model, seq=int(torch.randint(5, 30, ()))), patterns=patterns, rtol=1e-5, atol=1e-5
    )
    assert _swiglu_variants(be) == ["silu(gate_proj)·up_proj → down_proj (dense)"] * 2 and not _swiglu_misses(be)
    code = be.reports[0].code_after
    assert code.count("foak.lora_linear_swiglu.default(") == 2 and "silu" not in code
    assert "mlp" in be.reports[0].matches[-1].module


def _saved_activations(model, inputs, call) -> int:
    """How many [tokens, ffn] tensors one training forward of `call` keeps for backward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        call(**inputs)
    ffn, tokens = model.config.intermediate_size, inputs["input_ids"].numel()
    return sum(x.dim() > 0 and x.shape[-1] == ffn and x.numel() == tokens * ffn for x in saved)


@pytest.mark.parametrize("patterns,per_layer", [(["lora"], 3), (["lora", "lora_swiglu"], 2)])
def test_the_product_is_not_kept_for_backward(patterns, per_layer):
    """silu → mul → lora_linear keeps gate, up and the product; the fused op only gate and up."""
    model = peft_llama(layers=2)
    inputs = batch(model, seq=9)
    compiled = torch.compile(model, backend=foak_compile.backend(patterns=patterns, inner="aot_eager"))
    compiled(**inputs)
    assert _saved_activations(model, inputs, compiled) == per_layer * 2


def test_half_precision_llama():
    model = peft_llama(torch.bfloat16, layers=1)
    be = compare_half_with_eager(model, batch(model), patterns=["lora", "lora_swiglu"])
    assert _swiglu_variants(be) == ["silu(gate_proj)·up_proj → down_proj (dense)"]


@pytest.mark.parametrize("siblings", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_4bit_down_base(siblings):
    pytest.importorskip("bitsandbytes")
    model = peft_llama(layers=1, quantize=dict(quant_type="nf4", nested=True))
    patterns = ["lora", "lora_siblings", "lora_swiglu"] if siblings else ["lora", "lora_swiglu"]
    be = compare_with_eager(model, batch(model), patterns=patterns, rtol=1e-5, atol=1e-5)
    assert _swiglu_variants(be) == ["silu(gate_proj)·up_proj → down_proj (4-bit)"]
    assert "foak.lora_linear_4bit_swiglu.default(" in be.reports[0].code_after


def test_gemma_gelu_is_left_alone_with_the_reason():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("gemma", num_hidden_layers=1), LoraConfig(r=4, target_modules=PROJECTIONS))
    be = compare_with_eager(model, batch(model), patterns=["lora", "lora_swiglu"], rtol=1e-5, atol=1e-5)
    assert not _swiglu_variants(be)
    assert _swiglu_misses(be) == ["activation is gelu(approximate='tanh'), not silu"]


def test_only_down_adapted_by_inductor():
    """gate and up are plain linears; full inductor compiles around the op."""
    model = peft_llama(layers=1, targets=["down_proj"], sizes={"hidden_size": 48, "intermediate_size": 80})
    be = compare_with_eager(
        model, batch(model), inner="inductor", patterns=["lora", "lora_swiglu"], rtol=1e-4, atol=1e-5
    )
    assert _swiglu_variants(be) == ["silu(gate_proj)·up_proj → down_proj (dense)"]


@pytest.mark.slow
def test_dynamic_shapes():
    """A second sequence length recompiles with symbolic sizes (automatic dynamic): matched there too,
    and the shape checks add no guard, so a third length reuses that graph."""
    import copy
    from tests.models import loss_and_grads

    model = peft_llama(layers=1)
    be = foak_compile.backend(patterns=["lora", "lora_swiglu"], inner="aot_eager")
    compiled = torch.compile(model, backend=be)
    for seq in (7, 12, 9):
        inputs = batch(model, seq=seq)
        ref_loss, ref_grads = loss_and_grads(copy.deepcopy(model), inputs)
        loss, grads = loss_and_grads(model, inputs, call=compiled)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5)
    assert len(be.reports) == 2 and _swiglu_variants(be) == ["silu(gate_proj)·up_proj → down_proj (dense)"] * 2


def test_training_with_lora_dropout():
    """peft's dropout (p recorded by the lora pattern) goes into the fused op; masks are the op's own,
    so only the match and a finite step are checked here (the op tests check the mask's math)."""
    model = peft_llama(layers=1, dropout=0.1).train()
    be = foak_compile.backend(patterns=["lora", "lora_swiglu"], inner="aot_eager")
    loss = torch.compile(model, backend=be)(**batch(model)).loss
    loss.backward()
    assert torch.isfinite(loss) and _swiglu_variants(be) == ["silu(gate_proj)·up_proj → down_proj (dense)"]
    assert (
        "lora_linear_swiglu.default(" in be.reports[0].code_after
        and ", 0.1, torch.float32)"
        in [ln for ln in be.reports[0].code_after.splitlines() if "lora_linear_swiglu" in ln][0]
    )
    down_a = next(p for n, p in model.named_parameters() if "down_proj.lora_A" in n)
    assert torch.isfinite(down_a.grad).all() and down_a.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
def test_inlined_op_under_inductor_on_cuda(dtype, tol):
    """On a GPU the op is a triton_op inductor traces into (ops/registry.py), with every default pattern."""
    import copy
    from tests.models import loss_and_grads

    model = peft_llama(dtype, layers=2).cuda()
    inputs = {k: v.cuda() for k, v in batch(model, seq=37).items()}
    ref_loss, ref_grads = loss_and_grads(copy.deepcopy(model), inputs)
    be = foak_compile.backend(patterns=DEFAULT, inner="inductor")
    loss, grads = loss_and_grads(model, inputs, call=torch.compile(model, backend=be))
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    for name in ref_grads:
        torch.testing.assert_close(
            grads[name].float(), ref_grads[name].float(), rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}"
        )
    assert _swiglu_variants(be) == ["silu(gate_proj)·up_proj → down_proj (dense)"] * 2
    # traced inline, the op's recomputation of h must not have been merged with the forward's
    assert _saved_activations(model, inputs, torch.compile(model, backend=be)) == 2 * 2


def test_default_and_ordered():
    assert "lora_swiglu" in DEFAULT
    assert foak_compile.backend(patterns=["lora_swiglu", "lora"]).pattern_names == ["lora", "lora_swiglu"]


# --- hand-written MLPs: what is not the pattern ----------------------------------------------------


class _MLP(nn.Module):
    """down(silu(gate(x)) * up(x)); `variant` bends it (operands swapped, an intermediate used again, ...)."""

    def __init__(self, variant="", hidden=24, ffn=38):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(hidden, ffn), nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)
        self.variant = variant

    def forward(self, x):
        u = self.up(x)[..., :1] if self.variant == "broadcast" else self.up(x)
        s = F.silu(self.gate(x), inplace=self.variant == "in_place")
        h = torch.mul(u, s) if self.variant == "up_first" else s * u
        if self.variant == "up_changed":  # after the product, before down: h must not see it
            u.mul_(3.0)
        y = self.down(h).sum()
        if self.variant == "up_changed":
            y = y + u.sum()
        if self.variant == "silu_used":
            y = y + s.mean()
        return y + h.mean() if self.variant == "product_used" else y


def _mlp(variant):
    from peft import LoraConfig, get_peft_model
    from tests.test_lora_pattern import _randomize_adapters

    model = get_peft_model(_MLP(variant), LoraConfig(r=4, lora_alpha=8, target_modules=["gate", "up", "down"]))
    _randomize_adapters(model)
    return model


@pytest.mark.parametrize(
    "variant,reason",
    [
        ("", None),
        ("up_first", None),
        ("product_used", "the SwiGLU product has 2 users"),
        ("silu_used", "silu(gate) has 2 users"),
        ("in_place", "silu is applied in place"),
        ("broadcast", "silu(gate) (3, 5, 38) and up (3, 5, 1) differ in shape"),
    ],
)
def test_hand_written_mlp(variant, reason):
    model = _mlp(variant)
    be = _grads_vs_eager(model, torch.randn(3, 5, 24, requires_grad=True), patterns=("lora", "lora_swiglu"))
    if reason is None:
        assert _swiglu_variants(be) == ["silu(gate)·up → down (dense)"]
    else:
        assert not _swiglu_variants(be) and len(_swiglu_misses(be)) == 1 and reason in _swiglu_misses(be)[0]


def test_an_in_place_change_after_the_product_is_left_alone():
    """up modified between the product and down (inference: autograd would refuse it in training):
    recomputing silu(gate)·up at down would see the new up, so the MLP is a near-miss."""
    model = _mlp("up_changed")
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        ref = model(x)
        be = foak_compile.backend(patterns=("lora", "lora_swiglu"), inner="aot_eager")
        torch.testing.assert_close(torch.compile(model, backend=be)(x), ref)
    assert not _swiglu_variants(be)
    assert [m for m in _swiglu_misses(be) if "writes a tensor in place between the pattern's first and last" in m]
