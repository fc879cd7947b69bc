"""Tiny real transformers models (random weights, odd sizes) and eager-vs-foak comparison."""

import copy

import torch

import foak_compile
from tests.helpers import rel_err

# Odd sizes on purpose: hidden and intermediate sizes that are not powers of two.
TINY = dict(
    hidden_size=72,
    intermediate_size=100,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=18,
    vocab_size=131,
    max_position_embeddings=64,
)


def tiny_model(family: str, dtype=torch.float32, **overrides):
    import transformers as tf

    cfg_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),  # final logit softcapping
        "granite": (tf.GraniteConfig, tf.GraniteForCausalLM),  # logits / logits_scaling
        "cohere": (tf.CohereConfig, tf.CohereForCausalLM),  # logits * logit_scale
    }[family]
    cfg = cfg_cls(**{**TINY, **overrides})
    cfg._attn_implementation = "eager"
    return model_cls(cfg).to(dtype)


def batch(model, bs=2, seq=11, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = torch.randint(0, model.config.vocab_size, (bs, seq), generator=g)
    return {"input_ids": ids, "labels": ids}


def loss_and_grads(model, inputs, call=None):
    """Loss of `call` (default: the model itself) and the grads of `model`'s trainable parameters."""
    model.zero_grad(set_to_none=True)
    loss = (call if call is not None else model)(**inputs).loss
    loss.backward()
    return loss.detach(), {
        n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None
    }


def compare_with_eager(model, inputs, inner="aot_eager", patterns=None, rtol=1e-5, atol=1e-5):
    """Loss and every trainable gradient of the foak-compiled model against eager; returns the backend."""
    eager = copy.deepcopy(model)
    ref_loss, ref_grads = loss_and_grads(eager, inputs)
    be = foak_compile.backend(patterns=patterns, inner=inner)
    compiled = torch.compile(model, backend=be)
    loss, grads = loss_and_grads(model, inputs, call=compiled)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys() and grads
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    return be


def compare_half_with_float64(model, inputs, compile_call, slack=4e-2, reference_dtype=torch.float64, others=()):
    """A half-precision model: loss and every gradient of `compile_call(model)` no further from the
    float64 model's than twice eager's own error, plus `slack`. Element by element against eager is
    no test in bf16: through a few layers eager's own gradients are off by up to the size of their
    largest element in single elements (measured on the tiny Llama), and either run may land anywhere
    in that noise. Never held to less than half a bf16 ulp (2**-9) of eager's error; a wrong scaling
    or a missing term is off by O(1). `reference_dtype` float32 where a model's op has no float64
    kernel (grouped_mm of MoE experts): 2**-24 against bf16's 2**-9 is as good a reference here.
    `others`: more eager programs of the same model (e.g. its adapters rounded to bf16); the farthest of
    all sets each error's noise scale."""
    ref_loss, ref_grads = loss_and_grads(copy.deepcopy(model).to(reference_dtype), inputs)
    eager_loss, eager_grads = loss_and_grads(copy.deepcopy(model), inputs)
    extra = [loss_and_grads(m, inputs) for m in others]
    loss, grads = loss_and_grads(model, inputs, call=compile_call(model))
    floor = 2.0**-9
    eager_err = max(rel_err(e, ref_loss) for e in [eager_loss] + [x[0] for x in extra])
    assert rel_err(loss, ref_loss) <= 2 * max(eager_err, floor) + 1e-3
    assert grads.keys() == ref_grads.keys() and grads
    for n in ref_grads:
        assert grads[n].dtype == eager_grads[n].dtype
        noise = max(rel_err(g[n], ref_grads[n]) for g in [eager_grads] + [x[1] for x in extra])
        assert rel_err(grads[n], ref_grads[n]) <= 2 * max(noise, floor) + slack, n


def inference_matches_eager(model, inputs, patterns=("lora",), context=None):
    """Compile with the foak backend (aot_eager) and run without grad, optionally inside
    `context(model)` (e.g. disabled adapters) for both: the logits must equal eager's. Returns
    the backend, whose reports say what matched and why not."""
    import contextlib

    context = context or (lambda m: contextlib.nullcontext())
    be = foak_compile.backend(patterns=list(patterns), inner="aot_eager")
    with torch.no_grad():
        ref = copy.deepcopy(model)
        compiled = torch.compile(model, backend=be)
        with context(model), context(ref):
            got, want = compiled(**inputs).logits, ref(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return be
