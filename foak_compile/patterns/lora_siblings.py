"""LoRA siblings: fused LoRA layers that read the same input (q/k/v, gate/up) → one
torch.ops.foak.lora_linear_siblings / lora_linear_4bit_siblings / lora_linear_gptq_siblings call
(ops/lora_siblings.py).

Runs on what the `lora` pattern left: `torch.ops.foak.lora_linear` (dense), `lora_linear_4bit`
(bitsandbytes) and `lora_linear_gptq` calls. Siblings are grouped when they share the input node
and the kind of base (dense of one dtype; 4-bit of one quant type, block sizes, double
quantisation and compute dtype; GPTQ of one bit width, zero format, scales and compute dtype),
the output dtype, and have no LoRA dropout (each layer draws its own mask) and no trained base
bias. A 4-bit or GPTQ group becomes one stacked-weight op whose output the graph splits per
layer. In the default set: it made the 1B LoRA step faster at the same memory (docs/decisions.md).
"""

import operator
from typing import Optional

import torch
from torch.fx import Node

from ..engine import Candidate, Pattern, Reject
from ..nodes import is_in_place, module_of, sole_getitem, value
from ..ops.lora_schema import DENSE, GPTQ, family_of


def _reads(call: Node, x: Node) -> bool:
    """Whether `call` is a lora_linear / lora_linear_4bit / lora_linear_gptq call whose input is x."""
    family = family_of(call.target) if call.op == "call_function" else None
    return family is not None and family.single.arg(call, "x") is x


def _calls(x: Node) -> list:
    """x's lora_linear / lora_linear_4bit / lora_linear_gptq users, in graph order."""
    calls = [u for u in x.users if _reads(u, x)]
    if len(calls) < 2:
        return calls
    order = {n: i for i, n in enumerate(x.graph.nodes)}
    return sorted(calls, key=order.__getitem__)


class LoraSiblingsPattern(Pattern):
    name = "lora_siblings"

    def seeds(self, graph):
        for n in graph.nodes:
            if len(_calls(n)) >= 2:
                yield n

    def match(self, x: Node) -> Optional[Candidate]:
        calls = _calls(x)
        if len({c.target for c in calls}) != 1:
            raise Reject("siblings over different kinds of base layer (dense and 4-bit) are not grouped")
        family = family_of(calls[0].target)
        layers = [family.single.parse(c) for c in calls]  # each call's arguments, by name
        if any(v is None or value(getattr(v, family.weight)) is None for v in layers):
            raise Reject("a LoRA op call not in the form the lora pattern writes (keywords, unknown weight)")
        unknown = [c.name for c, v in zip(calls, layers) if v.bias is not None and value(v.bias) is None]
        if unknown:
            raise Reject(f"the base bias of {unknown} has no recorded value: cannot tell it is frozen")
        trained = [c.name for c, v in zip(calls, layers) if getattr(value(v.bias), "requires_grad", False)]
        if trained:
            raise Reject(f"trained base bias on {trained}: the grouped op has no bias gradient")
        dropped = [c.name for c, v in zip(calls, layers) if v.dropout_p != 0.0]
        if dropped:
            raise Reject(f"LoRA dropout on {dropped}: each sibling draws its own mask, not grouped")
        outs = [sole_getitem(c, 0) for c in calls]
        if any(o is None for o in outs):
            raise Reject("a sibling's t or seed output is used: not grouped")
        inplace = [u.name for o in outs for u in o.users if is_in_place(u)]
        if inplace:  # the grouped outputs may be views of one tensor, which autograd refuses to modify
            raise Reject(f"a sibling's output is modified in place ({', '.join(inplace)})")
        names = [(module_of(o) or o.name).split(" ")[0].split(".")[-1] for o in outs]
        nodes = [n for c, o in zip(calls, outs) for n in (o, c)]
        scalings = [float(v.scaling) for v in layers]
        if family is DENSE:
            kinds = {(value(v.weight).dtype, v.out_dtype) for v in layers}
            if len(kinds) != 1:
                raise Reject(f"siblings differ in base dtype / output dtype {sorted(map(str, kinds))}")
            args = DENSE.group(layers, x=x, scalings=scalings)
            op = DENSE.siblings.op

            def replace(g):
                return g.call_function(op, args)

            return Candidate(nodes, outs, replace, f"{len(calls)} siblings ({', '.join(names)})")
        if family is GPTQ:
            return _gptq_group(x, layers, outs, nodes, names, scalings)
        # 4-bit: one quantisation setup, double quantisation for all or none
        kinds = {
            (v.quant_type, v.blocksize, v.nested_blocksize, v.compute_dtype, v.out_dtype, v.nested_absmax is None)
            for v in layers
        }
        if len(kinds) != 1:
            raise Reject("4-bit siblings differ in quant type, block sizes, double quantisation or dtypes")
        shapes = [int(d) for v in layers for d in v.weight_shape]
        if set(shapes[1::2]) != {value(x).shape[-1]}:
            raise Reject(
                f"4-bit siblings' in_features {shapes[1::2]} do not all equal the input's {value(x).shape[-1]}"
            )
        args = family.group(layers, x=x, scalings=scalings, weight_shapes=shapes)
        return Candidate(
            nodes,
            outs,
            _split(family.siblings.op, args, shapes[0::2], value(x).dim() - 1),
            f"{len(calls)} 4-bit siblings, one stacked weight ({', '.join(names)})",
        )


def _gptq_group(x, layers, outs, nodes, names, scalings) -> Candidate:
    """GPTQ siblings: one bit width, zero-point format, compute and output dtype and scales dtype
    (the weights are rounded through the scales' dtype); one stacked [in, Σout] weight."""
    tensors = {f: [value(getattr(v, f)) for v in layers] for f in GPTQ.tensors}  # qweight, qzeros, scales, g_idx
    if any(t is None for col in tensors.values() for t in col):
        raise Reject("a GPTQ sibling's packed tensors have no recorded value")
    scales, g_idxs = tensors["scales"], tensors["g_idx"]
    kinds = {(v.bits, v.zero_format, v.compute_dtype, v.out_dtype, s.dtype) for v, s in zip(layers, scales)}
    if len(kinds) != 1:
        raise Reject("GPTQ siblings differ in bits, zero-point format, scales dtype or dtypes")
    n_in = [g.shape[0] for g in g_idxs]
    if any(i != value(x).shape[-1] for i in n_in):  # compared, not hashed: sizes may be symbolic
        raise Reject(f"GPTQ siblings' in_features {n_in} do not all equal the input's {value(x).shape[-1]}")
    args = GPTQ.group(layers, x=x, scalings=scalings)
    return Candidate(
        nodes,
        outs,
        _split(GPTQ.siblings.op, args, [s.shape[1] for s in scales], value(x).dim() - 1),
        f"{len(layers)} GPTQ siblings, one stacked weight ({', '.join(names)})",
    )


def _split(op, args, widths, dim):
    """A stacked-weight siblings op returns [y, t], y the layers' outputs side by side: the graph
    splits y, and the engine takes each layer's piece."""

    def replace(g):
        call = g.call_function(op, args)
        y = g.call_function(operator.getitem, (call, 0))
        return g.call_function(torch.split, (y, widths, dim))

    return replace
