"""The model-family matrix: tiny real transformers models of every popular decoder family, what the
foak backend matches in each, and a renderer for the README table.

    python -m tests.matrix     # markdown table from the last test run's results (.foak-results/)
"""

import json
import os
from typing import NamedTuple

import torch
import torch.nn as nn

RESULTS = os.environ.get("FOAK_RESULTS_DIR", os.path.join(os.path.dirname(__file__), "..", ".foak-results"))
MATRIX_JSON = os.path.join(RESULTS, "model_matrix.json")
PATTERN_COLUMNS = ["rms_norm", "rope", "cross_entropy", "linear_cross_entropy", "lora"]

# Odd sizes, no dropout anywhere (parity needs determinism), vocab ids inside the tiny vocabulary.
BASE = dict(
    hidden_size=72,
    intermediate_size=100,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=18,
    vocab_size=131,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=104),
    ),  # grouped_mm: 16-byte strides
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40),
    ),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "gpt_bigcode": (
        "GPTBigCodeConfig",
        "GPTBigCodeForCausalLM",
        dict(
            n_embd=72,
            n_layer=2,
            n_head=4,
            n_positions=64,
            multi_query=True,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
    ),
    "hand-written nn.RMSNorm": (None, None, {}),
}


class LMOutput(NamedTuple):
    loss: torch.Tensor
    logits: torch.Tensor


class HandWrittenLM(nn.Module):
    """A decoder-ish model written with torch.nn.RMSNorm, no transformers code at all."""

    def __init__(self, vocab=131, hidden=72, layers=2):
        super().__init__()
        self.config = type("Cfg", (), {"vocab_size": vocab, "num_hidden_layers": layers})()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.RMSNorm(hidden, eps=1e-6), "mlp": nn.Linear(hidden, hidden)})
            for _ in range(layers)
        )
        self.norm = nn.RMSNorm(hidden, eps=1e-6)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids, labels):
        h = self.embed(input_ids)
        for b in self.blocks:
            h = h + torch.nn.functional.silu(b["mlp"](b["norm"](h)))
        logits = self.lm_head(self.norm(h))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return LMOutput(loss, logits)


def build(family: str, dtype=torch.float32):
    cfg_name, model_name, extra = FAMILIES[family]
    if cfg_name is None:
        return HandWrittenLM().to(dtype)
    import transformers as tf

    cfg = getattr(tf, cfg_name)(**{**BASE, **extra})
    cfg._attn_implementation = "eager"
    return getattr(tf, model_name)(cfg).to(dtype)


def expected_counts(model, family: str) -> dict:
    """What the architecture contains, counted from its modules, not from the graph."""
    n_layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
    norms = sum(isinstance(m, nn.RMSNorm) or type(m).__name__.endswith("RMSNorm") for m in model.modules())
    has_rope = family not in ("gpt_bigcode", "hand-written nn.RMSNorm")
    return {"rms_norm": norms, "rope": n_layers if has_rope else 0, "cross_entropy": 1}


def record(family: str, variant: str, entry: dict) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    data = json.load(open(MATRIX_JSON)) if os.path.exists(MATRIX_JSON) else {}
    data.setdefault(family, {})[variant] = entry
    with open(MATRIX_JSON, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)


def markdown(data: dict) -> str:
    rows = [
        "| family | " + " | ".join(PATTERN_COLUMNS) + " | near-misses | loss / grads vs eager (fp32) |",
        "|---|" + "---|" * (len(PATTERN_COLUMNS) + 2),
    ]
    for family in FAMILIES:
        for variant, e in sorted(data.get(family, {}).items()):
            cells = [str(e["counts"].get(p, 0)) for p in PATTERN_COLUMNS]
            misses = "; ".join(f"{k}: {v}" for k, v in sorted(e["near_misses"].items())) or "—"
            rows.append(
                f"| {family}{' + LoRA' if variant == 'lora' else ''} | "
                + " | ".join(cells)
                + f" | {misses} | max rel err {e['max_rel_err']:.1e} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown(json.load(open(MATRIX_JSON))))
