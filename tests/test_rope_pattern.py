"""The rope pattern on real transformers models and on hand-written variants/near-misses."""

import copy

import pytest
import torch
import torch.nn as nn

import foak_compile
from tests.models import batch, compare_with_eager, tiny_model


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rope_matches(be):
    return [m for r in be.reports for m in r.matches if m.pattern == "rope"]


def rope_near_misses(be):
    return [m.reason for r in be.reports for m in r.near_misses if m.pattern == "rope"]


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "gemma"])
def test_one_fused_q_k_rope_per_attention_layer(family):
    model = tiny_model(family)
    be = compare_with_eager(model, batch(model), patterns=["rope"], rtol=1e-5, atol=1e-6)
    matches = rope_matches(be)
    assert len(matches) == model.config.num_hidden_layers
    assert all(m.variant == "q+k, unsqueeze_dim=1" for m in matches)
    assert "modeling_" in matches[0].source
    assert not rope_near_misses(be)
    code = be.reports[0].code_after
    assert code.count("torch.ops.foak.rope.default(") == model.config.num_hidden_layers
    assert "rotate_half" not in code and "torch.cat((neg" not in code


def test_bf16_llama_is_bit_exact():
    model = tiny_model("llama", torch.bfloat16)
    be = compare_with_eager(model, batch(model), patterns=["rope"], rtol=0, atol=0)
    assert len(rope_matches(be)) == 2


def test_with_all_patterns():
    model = tiny_model("qwen3")
    be = compare_with_eager(model, batch(model), rtol=1e-4, atol=1e-5)
    assert foak_compile.total_counts(be.reports)["rope"] == 2


@pytest.mark.parametrize("kind", ["packed", "left_padded"])
def test_explicit_position_ids(kind):
    model = tiny_model("llama")
    inputs = batch(model, bs=2, seq=11)
    if kind == "packed":  # several documents per row: positions restart mid-row
        inputs["position_ids"] = torch.tensor([list(range(4)) + list(range(7)), list(range(6)) + list(range(5))])
    else:
        mask = torch.ones(2, 11, dtype=torch.long)
        mask[0, :3] = 0
        inputs["attention_mask"] = mask
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    be = compare_with_eager(model, inputs, patterns=["rope"], rtol=1e-5, atol=1e-6)
    assert len(rope_matches(be)) == 2


@pytest.mark.slow
def test_dynamic_sequence_length():
    model = tiny_model("llama")
    be = foak_compile.backend(patterns=["rope"], inner="aot_eager")
    compiled = torch.compile(model, backend=be, dynamic=True)
    for seq in (5, 9):
        inputs = batch(model, seq=seq)
        ref = copy.deepcopy(model)(**inputs).loss
        torch.testing.assert_close(compiled(**inputs).loss, ref, rtol=1e-5, atol=1e-6)
    assert len(rope_matches(be)) == 2 * len(be.reports) and not rope_near_misses(be)


# Hand-written modules: q/k come from a linear so they need grad, like in a model.
class Rope(nn.Module):
    def __init__(self, fn, d=16, hq=4, hk=2):
        super().__init__()
        self.fn, self.d, self.hq, self.hk = fn, d, hq, hk
        self.proj = nn.Linear(8, (hq + hk) * d)

    def forward(self, h, cos, sin):
        b, s, _ = h.shape
        q, k = self.proj(h).view(b, s, self.hq + self.hk, self.d).split([self.hq, self.hk], dim=2)
        return self.fn(q, k, cos, sin)


def hf_bhsd(q, k, cos, sin):
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def hf_bshd(q, k, cos, sin):
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return cos * q + sin * rotate_half(q), rotate_half(k) * sin + k * cos


def only_q(q, k, cos, sin):
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * cos + rotate_half(q) * sin, k


def q_rotation_reused(q, k, cos, sin):
    """rotate_half(q) also feeds another output: q stays as written, k alone is fused."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    rq = rotate_half(q)
    return q * cos + rq * sin, k * cos + rotate_half(k) * sin, rq.sum()


def separate_tables(q, k, cos, sin):
    """k rotated with other cos/sin than q: two single rotations."""
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    c2, s2 = cos * 0.5, sin * 0.5
    return (
        q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1),
        k * c2.unsqueeze(1) + rotate_half(k) * s2.unsqueeze(1),
    )


def partial_rotary(q, k, cos, sin):
    """Phi-style: rotate the first 8 of 16 dims and concatenate the pass-through part."""
    q = q.transpose(1, 2)
    cos, sin = cos[..., :8].unsqueeze(1), sin[..., :8].unsqueeze(1)
    q_rot, q_pass = q[..., :8], q[..., 8:]
    q_rot = q_rot * cos + rotate_half(q_rot) * sin
    return torch.cat((q_rot, q_pass), dim=-1), k


def interleaved(q, k, cos, sin):
    """GPT-J's rotate_every_two with repeat-interleaved cos/sin."""

    def every_two(x):
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

    cos = cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1).unsqueeze(2)
    sin = sin[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1).unsqueeze(2)
    return q * cos + every_two(q) * sin, k


def other_split(q, k, cos, sin):
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    r = torch.cat((-q[..., 4:], q[..., :4]), dim=-1)
    return q * cos + r * sin, k


def other_direction(q, k, cos, sin):
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    r = torch.cat((q[..., 8:], -q[..., :8]), dim=-1)
    return q * cos + r * sin, k


def q_of_one_sequence(q, k, cos, sin):
    """q of batch 1 against k of batch 2 on one batch-1 cos/sin (eager broadcasts both): two single rotations."""
    q, k = q[:1].transpose(1, 2), k.transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def k_of_one_sequence(q, k, cos, sin):
    q, k = q.transpose(1, 2), k[:1].transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def _inputs(cos_batch=2, s=7, d=16, dtype=torch.float32, positions=None):
    pos = positions if positions is not None else torch.randint(0, 100, (cos_batch, s))
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    f = pos[..., None].float() * inv
    emb = torch.cat((f, f), dim=-1)
    return torch.randn(2, s, 8).to(dtype), emb.cos().to(dtype), emb.sin().to(dtype)


def run(fn, **kw):
    """Compile a Rope module with only the rope pattern; outputs and all grads equal eager."""
    dtype = kw.get("dtype", torch.float32)
    module = Rope(fn).to(dtype)
    h, cos, sin = _inputs(**kw)
    h.requires_grad_()
    ref_mod, ref_h = copy.deepcopy(module), h.detach().clone().requires_grad_()
    ref = ref_mod(ref_h, cos, sin)
    be = foak_compile.backend(patterns=["rope"], inner="aot_eager")
    out = torch.compile(module, backend=be)(h, cos, sin)
    exact = dict(rtol=0, atol=0) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-6)
    gs = [torch.randn_like(r) for r in ref]
    torch.autograd.backward(ref, gs)
    torch.autograd.backward(out, gs)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, **exact)
    torch.testing.assert_close(h.grad, ref_h.grad, **exact)
    for a, b in zip(module.parameters(), ref_mod.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **exact)
    return [m.variant for m in rope_matches(be)], rope_near_misses(be)


def not_a_rotation(q, k, cos, sin):
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * cos + q.reshape(q.shape) * sin, k


@pytest.mark.parametrize("fn, variant", [(hf_bhsd, "q+k, unsqueeze_dim=1"), (hf_bshd, "q+k, unsqueeze_dim=2")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts_and_operand_orders(fn, variant, dtype):
    assert run(fn, dtype=dtype) == ([variant], [])


def test_cos_sin_shared_by_the_batch():
    assert run(hf_bhsd, cos_batch=1) == (["q+k, unsqueeze_dim=1"], [])


@pytest.mark.parametrize("fn", [q_of_one_sequence, k_of_one_sequence])
def test_q_and_k_of_different_batch_sizes_are_rotated_apart(fn):
    assert run(fn, cos_batch=1) == (["single, unsqueeze_dim=1"] * 2, [])


def test_x_cos_plus_x_sin_without_a_rotation_is_no_candidate():
    assert run(not_a_rotation) == ([], [])


def test_lone_application():
    assert run(only_q) == (["single, unsqueeze_dim=2"], [])


def test_separate_cos_sin_give_two_single_rotations():
    assert run(separate_tables) == (["single, unsqueeze_dim=1"] * 2, [])


def test_intermediate_with_an_outside_user_keeps_its_partner():
    variants, misses = run(q_rotation_reused)
    assert variants == ["single, unsqueeze_dim=1"]
    assert len(misses) == 1 and "outside the pattern" in misses[0]


@pytest.mark.parametrize(
    "fn, reason",
    [
        (partial_rotary, "partial rotary"),
        (interleaved, "interleaved (GPT-J style)"),
        (other_split, "not at the middle 8"),
        (other_direction, "the rotation would run the other way"),
    ],
)
def test_near_misses_are_left_alone(fn, reason):
    variants, misses = run(fn)
    assert variants == []
    assert len(misses) == 1 and reason in misses[0], misses


def test_bf16_llama_with_lora_is_bit_exact():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_model("llama", torch.bfloat16),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"]),
    )
    be = compare_with_eager(model, batch(model), patterns=["rope"], rtol=0, atol=0)
    assert len(rope_matches(be)) == 2
