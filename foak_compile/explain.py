"""Will foak help my model? Build a tiny random-weight replica of an architecture on the CPU, put the
LoRA / QLoRA setup on it, compile it with the foak backend, run one training step, and say what was
fused per decoder layer and what was left alone, with the reason.

    python -m foak_compile explain llama                      # a transformers model type
    python -m foak_compile explain ./my-model --lora attn     # a directory with config.json
    python -m foak_compile explain config.json --quant nf4 --loss-only --json

The replica keeps the architecture's module structure and config flags (rope scaling, softcapping,
tied embeddings, q/k norms, layer types) and shrinks every size, so its counts per layer are what each
layer of the real model gets. The fused ops run in the Triton interpreter on CPU tensors.
"""

import argparse
import contextlib
import difflib
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

import foak_compile

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LORA_CHOICES = ("all", "attn", "mlp", "none")
QUANT_CHOICES = ("none", "nf4", "gptq")
LORA_R, LORA_ALPHA = 8, 16
BATCH, SEQ = 2, 16
NOTE = (
    "counts from a tiny random-weight replica on the CPU ({tiny}; kept: {kept}); each of the {real} has "
    "the same structure and gets the per-layer counts"
)


class ExplainError(Exception):
    """A problem with what the user asked for (unknown model, missing dependency): exit nonzero with it."""


@dataclass
class Tiny:
    """The replica's config and what was done to get it."""

    config: Any
    source: str  # "model type", "config.json", "directory"
    real_layers: int
    sizes: dict[str, Any] = field(default_factory=dict)


# --- the config ------------------------------------------------------------------------------------


def resolve_config(spec: str, trust_remote_code: bool = False):
    """(config, how it was found) for a model directory, a config.json path, or a model type."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    kw = {"trust_remote_code": trust_remote_code}
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ExplainError(f"{spec} is a directory without a config.json")
        return AutoConfig.from_pretrained(spec, **kw), "directory"
    if os.path.isfile(spec):
        return AutoConfig.from_pretrained(spec, **kw), "config.json"
    if spec in CONFIG_MAPPING:
        return AutoConfig.for_model(spec), "model type"
    close = difflib.get_close_matches(spec, list(CONFIG_MAPPING.keys()), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    if "/" in spec:  # a hub id: nothing is downloaded here
        hint += "; hub ids are not fetched: download the model's config.json and pass its path"
    raise ExplainError(
        f"unknown model type {spec!r}: not a local directory, not a config.json, and not a "
        f"transformers model type{hint}"
    )


def _quant_from_config(cfg) -> Optional[str]:
    q = getattr(cfg, "quantization_config", None)
    q = q if isinstance(q, dict) else (q.to_dict() if q is not None else None)
    if not q:
        return None
    method = q.get("quant_method")
    if method == "gptq":
        return "gptq"
    if method == "bitsandbytes" and q.get("load_in_4bit") and q.get("bnb_4bit_quant_type", "nf4") == "nf4":
        return "nf4"
    return None


def _layer_picks(d: dict, n_layers: int) -> list[int]:
    """Which real layers the replica keeps: the first of each kind of layer (per-layer lists such as
    layer_types say which kinds there are), at least two."""
    lists = [v for v in d.values() if isinstance(v, list) and len(v) == n_layers and n_layers > 1]
    kinds: dict[tuple, int] = {}
    for i in range(n_layers):
        kinds.setdefault(tuple(json.dumps(v[i], sort_keys=True) for v in lists), i)
    picks = sorted(kinds.values())
    while len(picks) < min(2, n_layers):
        picks.append(next(i for i in range(n_layers) if i not in picks))
    return sorted(picks)


def _heads(heads: int, kv: Optional[int]) -> tuple[int, int]:
    """Tiny head counts with the real GQA ratio: about 4 query heads, at least one kv head."""
    kv = kv or heads
    ratio = heads // kv if heads % kv == 0 else 1
    kv_t = max(1, min(kv, 4 // ratio)) if ratio <= 4 else 1
    return kv_t * ratio, kv_t


def _resample(values: list, n: int) -> list:
    """A per-frequency list (longrope's factors) at n entries, evenly taken."""
    return [values[i * len(values) // n] for i in range(n)]


def _shrink_rope(params: Any, old_half: int, new_half: int) -> Any:
    """Rope parameters with lists sized for the old head dim resized for the new one."""
    if isinstance(params, dict):
        return {k: _shrink_rope(v, old_half, new_half) for k, v in params.items()}
    if isinstance(params, list) and len(params) == old_half and old_half:
        return _resample(params, new_half)
    return params


def tiny_config(cfg, source: str, quant: str) -> Tiny:
    """The architecture at toy sizes: a few layers, ~4 heads, small hidden/intermediate/vocab."""
    text = cfg.get_text_config(decoder=True)  # a multimodal config: its text decoder
    d = text.to_dict()
    amap = getattr(text, "attribute_map", {}) or {}

    def key(name: str) -> Optional[str]:
        k = amap.get(name, name)
        return k if k in d else None

    real_layers = d[key("num_hidden_layers")]
    picks = _layer_picks(d, real_layers)
    for k, v in list(d.items()):
        if isinstance(v, list) and len(v) == real_layers and real_layers > 1:
            d[k] = [v[i] for i in picks]
    n = len(picks)
    heads, kv = _heads(d[key("num_attention_heads")], d.get("num_key_value_heads"))
    head_dim = 32 if quant == "gptq" else 16  # gptqmodel packs in/out features in multiples of 32
    old_head_dim = d.get("head_dim") or d[key("hidden_size")] // d[key("num_attention_heads")]
    hidden = heads * head_dim
    vocab = 256
    sizes = {"num_hidden_layers": n, "hidden_size": hidden, "num_attention_heads": heads, "vocab_size": vocab}
    if "num_key_value_heads" in d:
        sizes["num_key_value_heads"] = kv
    if "head_dim" in d:
        sizes["head_dim"] = head_dim
    for k, v in d.items():  # expert / shared-expert sizes: one hidden width each
        if k.endswith("intermediate_size") and isinstance(v, int):
            sizes[k] = 2 * hidden if k == "intermediate_size" else hidden
    for k, cap in (
        ("num_local_experts", 4),
        ("num_experts", 4),
        ("n_routed_experts", 4),
        ("num_experts_per_tok", 2),
        ("n_group", 1),
        ("topk_group", 1),
        ("first_k_dense_replace", 1),
    ):
        if isinstance(d.get(k), int):
            sizes[k] = min(d[k], cap)
    if (
        "rope_parameters" not in d
        and "rope_scaling" not in d
        and isinstance(d.get(key("max_position_embeddings")), int)
    ):
        sizes["max_position_embeddings"] = min(d[key("max_position_embeddings")], 1024)  # learned positions
    for name, v in sizes.items():
        if key(name):
            d[key(name)] = v
    for k in ("rope_parameters", "rope_scaling"):
        if d.get(k):
            d[k] = _shrink_rope(d[k], old_head_dim // 2, head_dim // 2)
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):  # ids inside the tiny vocabulary
        v = d.get(k)
        d[k] = [i % vocab for i in v] if isinstance(v, list) else (v % vocab if isinstance(v, int) else v)
    d.pop("quantization_config", None)  # the replica is quantised by build_model, as asked
    tiny = type(text).from_dict(d)
    return Tiny(tiny, source, real_layers, {**sizes, "intermediate_size": d.get("intermediate_size")})


def kept(cfg) -> dict[str, Any]:
    """The config flags that shape the graph, as the replica has them (for the report)."""
    rope_types: set[str] = set()

    def walk(p):
        if isinstance(p, dict):
            if p.get("rope_type"):
                rope_types.add(p["rope_type"])
            for v in p.values():
                walk(v)

    walk(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None))
    out: dict[str, Any] = {}
    if rope_types:
        out["rope"] = "/".join(sorted(rope_types))
    act = (
        getattr(cfg, "hidden_act", None)
        or getattr(cfg, "hidden_activation", None)
        or getattr(cfg, "activation_function", None)
    )
    if act:
        out["activation"] = act
    if getattr(cfg, "tie_word_embeddings", False):
        out["tied embeddings"] = True
    for k in ("final_logit_softcapping", "attn_logit_softcapping", "logits_scaling", "logit_scale"):
        if getattr(cfg, k, None) not in (None, 1, 1.0):
            out[k] = getattr(cfg, k)
    if getattr(cfg, "layer_types", None):
        out["layer types"] = "/".join(dict.fromkeys(cfg.layer_types))
    return out


# --- the model -------------------------------------------------------------------------------------


def build_model(cfg, dtype: torch.dtype, quant: str, lora: str, dropout: float, seed: int = 0):
    """(model, LoRA targets) at `dtype`, its Linear layers quantised as asked, peft LoRA on top."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(cfg)
    except ValueError as err:
        raise ExplainError(
            f"{cfg.model_type} has no causal-LM class in transformers (foak targets decoder LLM fine-tuning): {err}"
        ) from err
    model = model.to(dtype)
    targets = lora_targets(model, lora)
    if quant == "nf4":
        _to_nf4(model, dtype)
    elif quant == "gptq":
        model = _to_gptq(model, cfg.vocab_size)
    if targets:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM"
            ),
        )
    model.train()  # fine-tuning: dropout (if any) and gradients as in training
    return model, targets


def decoder_layers(model: nn.Module) -> tuple[str, int]:
    """(attribute name, count) of the ModuleList holding the decoder layers: the first ModuleList of
    `num_hidden_layers` entries."""
    n = model.config.get_text_config(decoder=True).num_hidden_layers
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return name.rsplit(".", 1)[-1], n
    return "", n


def lora_targets(model: nn.Module, which: str) -> list[str]:
    """peft target_modules for `which`: the Linear layers of one decoder layer as `parent.leaf` suffixes
    (`self_attn.q_proj`, `attn.c_proj` vs `mlp.c_proj`), the output embedding never."""
    if which == "none":
        return []
    container, _ = decoder_layers(model)
    head = model.get_output_embeddings()
    pattern = re.compile(rf"(?:^|\.){re.escape(container)}\.\d+\.(.+)$") if container else None
    found: dict[str, None] = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or m is head:
            continue
        inner = pattern.match(name) if pattern else None
        local = inner.group(1) if inner else name
        parts = local.split(".")
        suffix = ".".join(parts[-2:])
        where = ".".join(parts[:-1]).lower()
        is_attn = "attn" in where or "attention" in where
        if which == "all" or (which == "attn") == is_attn:
            found[suffix] = None
    if not found:
        raise ExplainError(f"--lora {which}: no Linear layers of that kind in {type(model).__name__}")
    return list(found)


def _to_nf4(model: nn.Module, dtype: torch.dtype) -> None:
    """Every Linear but the output embedding → bitsandbytes NF4 (double quant), quantised on the CPU."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ExplainError(f"--quant nf4 needs bitsandbytes (pip install 'bitsandbytes>=0.46'): {err}") from err
    head = model.get_output_embeddings()
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if type(child) is nn.Linear and child is not head:
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=dtype,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True, module=q
                )
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(mod, name, q.to("cpu"))  # .to() quantises
    model.is_loaded_in_4bit = True  # peft then wraps the layers with lora.bnb.Linear4bit


def _to_gptq(model: nn.Module, vocab: int) -> nn.Module:
    """GPTQ 4-bit (group 32) by optimum's quantizer running gptqmodel on random calibration tokens,
    packed into gptqmodel's TorchLinear (the layer it trains with)."""
    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")  # its pure-Python packer: no C++ build
    try:
        with contextlib.redirect_stdout(sys.stderr):  # gptqmodel prints a banner on import
            import gptqmodel  # noqa: F401
            from optimum.gptq import GPTQQuantizer
    except ImportError as err:
        raise ExplainError(f"--quant gptq needs gptqmodel and optimum (bash scripts/install_gptq.sh): {err}") from err
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(0, vocab, (1, 32), generator=g).tolist(), "attention_mask": [[1] * 32]}
        for _ in range(4)
    ]
    q = GPTQQuantizer(
        bits=4,
        dataset=data,
        group_size=32,
        desc_act=True,
        sym=True,
        act_group_aware=False,
        backend="torch",
        model_seqlen=32,
    )
    with contextlib.redirect_stdout(sys.stderr):
        model = q.quantize_model(model)
    for mod in model.modules():  # buffers as a loaded checkpoint holds them, not inference tensors
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_inference():
                mod._buffers[name] = buf.clone()
    return model


# --- compile, run, attribute -----------------------------------------------------------------------


def _layer_regexes(container: str) -> tuple[Optional[re.Pattern], Optional[re.Pattern]]:
    """(module path, placeholder name) patterns that name a decoder layer: "model.layers.0.mlp",
    Dynamo's "L['self']...['layers'].0" / "layers[0]"; a parameter input "l_self_..._layers_modules_0_..."."""
    if not container:
        return None, None
    c = re.escape(container)
    return re.compile(rf"(?:^|[.'\[]){c}(?:'\])?[.\[](\d+)"), re.compile(rf"(?:^|_){c}_modules_(\d+)_")


def _graphs(gm: torch.fx.GraphModule):
    return [sub for sub in gm.modules() if isinstance(sub, torch.fx.GraphModule)]


def _node_layers(gm: torch.fx.GraphModule, rxs) -> dict[str, int]:
    """Node name → decoder layer, from the full nn_module_stack (a match's own `module` names only the
    innermost frame, e.g. `apply_rotary_pos_emb (Func)` for rope) or a parameter input's name."""
    path_rx, name_rx = rxs
    out: dict[str, int] = {}
    if path_rx is None:
        return out
    for sub in _graphs(gm):
        for node in sub.graph.nodes:
            paths = [str(p) for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
            hits = [path_rx.search(p) for p in paths]
            if node.op == "placeholder":
                hits.append(name_rx.search(node.name))
            hit = next((h for h in hits if h), None)
            if hit:
                out.setdefault(node.name, int(hit.group(1)))
    return out


def _new_node_layers(gm: torch.fx.GraphModule, original: set[str], known: dict[str, int]) -> dict[str, int]:
    """Layers of the nodes the rewrite created (they may carry no module stack): a fused op is in the
    layer of the parameters it reads (none of them in a layer: whole model), an op that reads none
    (getitem) in its input's."""
    out: dict[str, int] = {}

    def find(node, depth=0) -> Optional[int]:
        if node.name in known or node.name in out:
            return known.get(node.name, out.get(node.name))
        inputs = [a for a in node.all_input_nodes if a.op in ("placeholder", "get_attr")]
        if inputs:
            layers = [known[a.name] for a in inputs if a.name in known]
            return Counter(layers).most_common(1)[0][0] if layers else None
        return next(
            (layer for a in node.all_input_nodes if depth < 4 for layer in [find(a, depth + 1)] if layer is not None),
            None,
        )

    for sub in _graphs(gm):
        for node in sub.graph.nodes:
            if node.name not in original and node.op == "call_function":
                layer = find(node)
                if layer is not None:
                    out[node.name] = layer
    return out


def compile_and_step(model: nn.Module, loss_only: bool, inner: str, vocab: int, container: str):
    """One forward + backward through the foak-compiled model: (reports, node→layer map per graph)."""
    be = foak_compile.backend(inner=inner)
    rxs = _layer_regexes(container)
    layers_of: dict[str, dict[str, int]] = {}

    def backend(gm, example_inputs):
        names = _node_layers(gm, rxs)  # before the rewrite removes the nodes
        original = {n.name for sub in _graphs(gm) for n in sub.graph.nodes}
        fn = be(gm, example_inputs)
        layers_of[be.reports[-1].graph_id] = {**names, **_new_node_layers(gm, original, names)}
        return fn

    torch._dynamo.reset()  # a fresh cache: peft's forward, shared by every model, would hit its recompile limit

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(min(3, vocab - 1), vocab, (BATCH, SEQ), generator=g)
    if loss_only:  # only the loss leaves the graph: lm_head + loss can fuse
        loss = torch.compile(lambda **kw: model(**kw).loss, backend=backend)(input_ids=ids, labels=ids)
    else:
        loss = torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss
    loss.backward()
    return be.reports, layers_of, rxs[0]


def _layer_of(entry, names: dict[str, int], rx: Optional[re.Pattern]) -> Optional[int]:
    hit = rx.search(entry.module) if rx is not None and entry.module else None
    if hit:
        return int(hit.group(1))
    # the node the report took its source and module from
    return names.get(entry.nodes[0]) if entry.nodes else None


def _fmt(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing"


def _split(matches: list[tuple[str, Optional[int]]], n_layers: int) -> dict[str, Any]:
    """Counts per layer, per layer when every layer has the same (else None), and whole-model."""
    layers = [Counter() for _ in range(n_layers)]
    whole: Counter = Counter()
    for pattern, layer in matches:
        (layers[layer] if layer is not None and layer < n_layers else whole)[pattern] += 1
    layers_d = [dict(c) for c in layers]
    same = all(c == layers_d[0] for c in layers_d) if layers_d else False
    return {"per_layer": layers_d[0] if same else None, "layers": layers_d, "whole_model": dict(whole)}


def summarize(reports, layers_of: dict[str, dict[str, int]], rx, n_layers: int) -> dict[str, Any]:
    """Per graph and over all graphs: counts per layer / whole model, every match and near-miss."""
    graphs, all_matches, all_misses = [], [], []
    for r in reports:
        names = layers_of.get(r.graph_id, {})
        matches = [
            {
                "pattern": m.pattern,
                "variant": m.variant,
                "source": m.source,
                "module": m.module,
                "layer": _layer_of(m, names, rx),
            }
            for m in r.matches
        ]
        misses = [
            {
                "pattern": m.pattern,
                "reason": m.reason,
                "source": m.source,
                "module": m.module,
                "layer": _layer_of(m, names, rx),
                "graph_id": r.graph_id,
            }
            for m in r.near_misses
        ]
        found = [(m["pattern"], m["layer"]) for m in matches]
        graphs.append(
            {
                "graph_id": r.graph_id,
                "summary": r.summary(),
                "counts": r.counts(),
                **_split(found, n_layers),
                "matches": matches,
                "near_misses": misses,
            }
        )
        all_matches += found
        all_misses += misses
    return {
        "graphs": graphs,
        **_split(all_matches, n_layers),
        "totals": dict(Counter(p for p, _ in all_matches)),
        "near_misses": all_misses,
    }


# --- the report ------------------------------------------------------------------------------------


def _headline(res: dict[str, Any]) -> str:
    lora = res["lora"]
    setup = [
        f"{res['model_type']} ({res['architecture']})",
        f"{res['tiny']['num_hidden_layers']} tiny layers",
        f"LoRA r={lora['r']}"
        + (f" (dropout {lora['dropout']:g})" if lora["dropout"] else "")
        + f" on {len(lora['targets'])} projection{'s' * (len(lora['targets']) != 1)}"
        if lora
        else "no LoRA",
    ]
    if res["quant"] != "none":
        setup.append({"nf4": "NF4 base (bitsandbytes)", "gptq": "GPTQ 4-bit base"}[res["quant"]])
    setup.append(res["dtype"] + (", loss-only" if res["loss_only"] else ""))
    if res["per_layer"] is not None:
        layers = f"per layer: {_fmt(res['per_layer'])}"
    else:
        layers = "; ".join(f"layer {i}: {_fmt(c)}" for i, c in enumerate(res["layers"]))
    return f"{', '.join(setup)} → {layers}; whole model: {_fmt(res['whole_model'])}"


def _miss_lines(misses: list[dict[str, Any]]) -> list[str]:
    """Near-misses, those at the same source line and pattern in several layers as one entry."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for m in misses:
        module = re.sub(r"\.\d+\.", ".N.", m["module"]) if m["layer"] is not None else m["module"]
        groups.setdefault((m["pattern"], m["source"], module), []).append(m)
    out = []
    for (pattern, source, _), ms in groups.items():
        layers = sorted({m["layer"] for m in ms if m["layer"] is not None})
        where = "whole model" if not layers else "layer" + "s" * (len(layers) > 1) + " " + ", ".join(map(str, layers))
        out.append(
            f"    NEAR-MISS {pattern}" + (f" ×{len(ms)}" if len(ms) > 1 else "") + f" ({where}): {ms[0]['reason']}"
        )
        if source:
            out.append(f"        at {source}")
        if ms[0]["module"]:
            out.append(f"        in {ms[0]['module']}")
    return out


def to_text(res: dict[str, Any]) -> str:
    t = res["tiny"]
    lines = [res["summary"], "(" + res["note"] + ")", ""]
    if not res["graphs"]:
        lines.append("Dynamo compiled no graph (the model ran eagerly): nothing was fused")
    if len(res["graphs"]) > 1:
        lines.append(f"{len(res['graphs'])} graphs: the model's code breaks Dynamo's graph; each is compiled alone")
    for g in res["graphs"]:
        lines.append(g["summary"])
        if g["per_layer"] is not None:
            lines.append(f"    per layer ({t['num_hidden_layers']}): {_fmt(g['per_layer'])}")
        else:
            lines += [f"    layer {i}: {_fmt(c)}" for i, c in enumerate(g["layers"])]
        lines.append(f"    whole model: {_fmt(g['whole_model'])}")
        lines += _miss_lines(g["near_misses"]) or ["    no near-misses"]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --- entry points ----------------------------------------------------------------------------------


def explain(
    model: str,
    lora: str = "all",
    quant: Optional[str] = None,
    dtype: str = "fp32",
    lora_dropout: float = 0.0,
    loss_only: bool = False,
    inner: str = "eager",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """What the foak backend fuses in a tiny replica of `model`; the dict `--json` prints."""
    from .kernels.common import INTERPRET

    if not INTERPRET:
        raise ExplainError(
            "explain runs the fused ops on CPU tensors in the Triton interpreter: set "
            "TRITON_INTERPRET=1 before foak_compile is imported (python -m foak_compile does)"
        )
    cfg, source = resolve_config(model, trust_remote_code)
    quant = quant or _quant_from_config(cfg.get_text_config(decoder=True)) or _quant_from_config(cfg) or "none"
    tiny = tiny_config(cfg, source, quant)
    built, targets = build_model(tiny.config, DTYPES[dtype], quant, lora, lora_dropout)
    container, n_layers = decoder_layers(built)
    reports, layers_of, rx = compile_and_step(built, loss_only, inner, tiny.config.vocab_size, container)
    res: dict[str, Any] = {
        "summary": "",
        "note": "",
        "model": model,
        "source": tiny.source,
        "model_type": tiny.config.model_type,
        "architecture": type(built.get_base_model() if hasattr(built, "get_base_model") else built).__name__,
        "real_layers": tiny.real_layers,
        "tiny": tiny.sizes,
        "dtype": dtype,
        "quant": quant,
        "lora": {"targets": targets, "r": LORA_R, "alpha": LORA_ALPHA, "dropout": lora_dropout} if targets else None,
        "loss_only": loss_only,
        "decoder_layers": container,
        **summarize(reports, layers_of, rx, n_layers),
    }
    t = tiny.sizes
    desc = (
        f"{t['num_hidden_layers']} layers, hidden {t['hidden_size']}, {t['num_attention_heads']} heads"
        + (f" / {t['num_key_value_heads']} kv" if "num_key_value_heads" in t else "")
        + f", vocab {t['vocab_size']}"
    )
    real = f"{tiny.real_layers} layers of " + (
        f"transformers' default {model} config" if source == "model type" else "the real model"
    )
    res["kept"] = kept(tiny.config)
    res["note"] = NOTE.format(
        tiny=desc, kept=", ".join(k if v is True else f"{k} {v}" for k, v in res["kept"].items()) or "-", real=real
    )
    res["summary"] = _headline(res)
    return res


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="a model directory (with config.json), a config.json, or a transformers "
        "model type (llama, qwen3, mistral, gemma2, phi3, ...)",
    )
    p.add_argument(
        "--lora",
        choices=LORA_CHOICES,
        default="all",
        help="LoRA (r=8) on every Linear of a decoder layer, attention only, MLP only, or none (all)",
    )
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (0)")
    p.add_argument(
        "--quant",
        choices=QUANT_CHOICES,
        default=None,
        help="base weights: dense, bitsandbytes NF4 or GPTQ 4-bit (default: the config's "
        "quantization_config, else none)",
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="model dtype (fp32)")
    p.add_argument(
        "--loss-only",
        action="store_true",
        help="compile `model(**batch).loss` instead of the model, so lm_head + loss can fuse",
    )
    p.add_argument(
        "--inner",
        choices=("eager", "aot_eager"),
        default="eager",
        help="what runs the rewritten graph (eager; aot_eager also traces the ops' backward)",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="allow a directory's custom config code")
    p.add_argument("--json", action="store_true", help="print a machine-readable dict instead of text")


def main(args: argparse.Namespace) -> int:
    try:
        with contextlib.redirect_stdout(sys.stderr):  # libraries' banners (gptqmodel's, via peft) stay off stdout
            res = explain(
                args.model,
                lora=args.lora,
                quant=args.quant,
                dtype=args.dtype,
                lora_dropout=args.lora_dropout,
                loss_only=args.loss_only,
                inner=args.inner,
                trust_remote_code=args.trust_remote_code,
            )
    except ExplainError as err:
        print(f"foak explain: {err}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1) if args.json else to_text(res), end="\n" if args.json else "")
    return 0
