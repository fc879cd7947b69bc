"""The rms_norm pattern on real transformers models and on hand-written variants/near-misses."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import foak_compile
from tests.models import batch, compare_with_eager, tiny_model


def n_rmsnorm_modules(model):
    return sum(type(m).__name__.endswith("RMSNorm") for m in model.modules())


def counts(be):
    return foak_compile.total_counts(be.reports)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
def test_every_rmsnorm_of_a_real_model_is_rewritten_and_exact(family):
    model = tiny_model(family)
    be = compare_with_eager(model, batch(model), patterns=["rms_norm"], rtol=1e-4, atol=1e-5)
    expected = n_rmsnorm_modules(model)
    assert expected == (4 * 2 + 1 if family == "qwen3" else 2 * 2 + 1)  # Qwen3 adds q/k norms
    assert counts(be).get("rms_norm") == expected
    assert not [m for m in foak_compile.reports()[0].near_misses if m.pattern == "rms_norm"]
    m = be.reports[0].matches[0]
    assert "modeling_" in m.source and "RMSNorm" in m.module


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_llama_with_lora(dtype):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_model("llama", dtype), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    # LoRA grads pass through every norm's backward; half precision: a loose, relative bound
    be = compare_with_eager(model, batch(model), patterns=["rms_norm"], rtol=3e-2, atol=3e-3)
    assert counts(be)["rms_norm"] == 5


def _run(module, *inputs, dtype=torch.float32):
    """Compile `module` with only the rms_norm pattern; compare output and grads with eager."""
    inputs = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    ref_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    ref_mod = copy.deepcopy(module)
    ref = ref_mod(*ref_in)
    be = foak_compile.backend(patterns=["rms_norm"], inner="aot_eager")
    out = torch.compile(module, backend=be)(*inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for a, b in zip(inputs + list(module.parameters()), ref_in + list(ref_mod.parameters())):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    r = be.reports[0]
    return r.counts().get("rms_norm", 0), [m.reason for m in r.near_misses]


class Norm(nn.Module):
    def __init__(self, h, fn):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(h))
        self.fn = fn

    def forward(self, x):
        return self.fn(self, x)


VARIANTS = {
    "x*x": lambda s, x: s.weight * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5)),
    "div-sqrt": lambda s, x: s.weight * (x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-5)),
    "weight-first": lambda s, x: (
        x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * s.weight
    ).to(x.dtype),
    "torch.mean": lambda s, x: torch.mul(torch.rsqrt(torch.mean(x**2, dim=[-1], keepdim=True) + 1e-6), x),
    "gemma": lambda s, x: (
        x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + s.weight.float())
    ).type_as(x),
    "F.rms_norm": lambda s, x: F.rms_norm(x, (x.shape[-1],), s.weight, 1e-6),
    "F.rms_norm-default-eps": lambda s, x: F.rms_norm(x, (x.shape[-1],), s.weight),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_are_rewritten(name):
    n, misses = _run(Norm(45, VARIANTS[name]), torch.randn(3, 5, 45))
    assert (n, misses) == (1, [])


def test_nn_rmsnorm_module():
    n, misses = _run(nn.RMSNorm(45, eps=1e-6), torch.randn(2, 3, 45))
    assert (n, misses) == (1, [])


def _rms(x, dim=-1, keepdim=True, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(dim, keepdim=keepdim) + eps)


class ExtraUser(nn.Module):
    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + 1e-6) + var  # the variance is used outside the norm


class TensorEps(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("eps", torch.tensor(1e-6))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class ManualLayerNorm(nn.Module):
    def forward(self, x):
        xc = x - x.mean(-1, keepdim=True)
        return xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + 1e-5)


NEAR_MISSES = {
    "extra-user": (ExtraUser(), "has 2 users"),
    "dim0": (Norm(9, lambda s, x: _rms(x, dim=0)), "not the last dim"),
    "keepdim-false": (Norm(9, lambda s, x: x * torch.rsqrt(x.pow(2).mean(-1) + 1e-6)[..., None]), "keepdim"),
    "tensor-eps": (TensorEps(), "eps is a tensor"),
    "layernorm": (nn.LayerNorm(9), "LayerNorm"),
    "manual-layernorm": (ManualLayerNorm(), "mean-centred"),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_misses_are_left_alone_and_reported(name):
    module, reason = NEAR_MISSES[name]
    n, misses = _run(module, torch.randn(4, 9))
    assert n == 0
    assert len(misses) == 1 and reason in misses[0], misses


def test_half_precision_statistics_are_not_rewritten():
    """Without the fp32 upcast the model's bf16 statistics would change under an fp32 kernel."""
    module = Norm(33, lambda s, x: _rms(x))
    be = foak_compile.backend(patterns=["rms_norm"], inner="aot_eager")
    x = torch.randn(3, 33, dtype=torch.bfloat16)
    torch.testing.assert_close(torch.compile(module, backend=be)(x), module(x), rtol=0, atol=0)
    [miss] = be.reports[0].near_misses
    assert "without an fp32 upcast" in miss.reason and be.reports[0].counts() == {}


def test_cast_after_bf16_product_is_not_absorbed():
    """w(bf16) * n.to(bf16) is rounded to bf16; a following .float() must stay a separate cast."""
    module = Norm(33, lambda s, x: (s.weight * _rms(x.float()).to(x.dtype)).float())
    module.to(torch.bfloat16)
    x = torch.randn(3, 33, dtype=torch.bfloat16)
    be = foak_compile.backend(patterns=["rms_norm"], inner="aot_eager")
    out = torch.compile(module, backend=be)(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, module(x), rtol=0, atol=2e-2)
    assert be.reports[0].counts() == {"rms_norm": 1}
    assert "float()" in be.reports[0].code_after or ".to(" in be.reports[0].code_after
