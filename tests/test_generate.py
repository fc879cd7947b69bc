"""Generation with a LoRA model: which spelling compiles anything, and the one that does decodes as eager does."""

import pytest
import torch

import foak_compile
from tests.test_lora_pattern import peft_llama

pytestmark = pytest.mark.slow  # several compiles (prefill and decode shapes)


def _generate(model, prompt):
    with torch.no_grad():
        return model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0
        )


@pytest.fixture
def lora_model():
    torch.manual_seed(0)
    model = peft_llama(layers=2).eval()
    prompt = torch.randint(3, model.config.vocab_size, (2, 7))
    return model, prompt, _generate(model, prompt)


def test_compiling_the_inner_model_decodes_as_eager(lora_model):
    model, prompt, want = lora_model
    be = foak_compile.backend(inner="aot_eager")
    model.base_model.model.compile(backend=be)  # peft's wrapper forwards generate() to this module
    got = _generate(model, prompt)
    assert torch.equal(got, want)
    counts = foak_compile.total_counts(be.reports)
    assert counts.get("lora", 0) >= 14 and counts.get("rms_norm", 0) >= 5, [r.summary() for r in be.reports]


@pytest.mark.parametrize("spelling", ["torch.compile(peft_model)", "peft_model.compile()"])
def test_compiling_the_peft_wrapper_compiles_nothing_for_generate(lora_model, spelling):
    """peft's generate() calls the inner model directly: a compiled PeftModel's forward is never run."""
    model, prompt, want = lora_model
    be = foak_compile.backend(inner="aot_eager")
    if spelling == "peft_model.compile()":
        model.compile(backend=be)
        got = _generate(model, prompt)
    else:
        got = _generate(torch.compile(model, backend=be), prompt)
    assert torch.equal(got, want)
    assert be.reports == []
