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

from .. import ops  # noqa: F401  (registers torch.ops.foak.*)
from ..engine import Candidate, Pattern, Reject
from ..nodes import is_in_place, module_of, value

_LORA = torch.ops.foak.lora_linear.default
_LORA4 = torch.ops.foak.lora_linear_4bit.default
_SIBLINGS = torch.ops.foak.lora_linear_siblings.default
_SIBLINGS4 = torch.ops.foak.lora_linear_4bit_siblings.default
_LORAG = torch.ops.foak.lora_linear_gptq.default
_SIBLINGSG = torch.ops.foak.lora_linear_gptq_siblings.default
# argument positions: (x, weight | qweight, ..., bias, A, B, scaling, dropout_p, ..., out_dtype)
_POS = {_LORA: dict(n=8, bias=2, a=3, b=4, scaling=5, p=6),
        _LORA4: dict(n=17, bias=6, a=7, b=8, scaling=9, p=10),
        _LORAG: dict(n=14, bias=5, a=6, b=7, scaling=8, p=9)}


def _lora_output(call: Node) -> Optional[Node]:
    """The getitem taking y from a lora_linear call, when that is the call's only use."""
    users = list(call.users)
    if len(users) == 1 and users[0].target is operator.getitem and users[0].args[1] == 0:
        return users[0]
    return None


def _calls(x: Node) -> list:
    """x's lora_linear / lora_linear_4bit / lora_linear_gptq users, in graph order."""
    calls = [u for u in x.users if u.op == "call_function" and u.target in _POS and u.args and u.args[0] is x]
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
        pos = _POS[calls[0].target]
        if any(len(c.args) != pos["n"] or c.kwargs or value(c.args[1]) is None for c in calls):
            raise Reject("a LoRA op call not in the form the lora pattern writes (keywords, unknown weight)")
        unknown = [c.name for c in calls if c.args[pos["bias"]] is not None and value(c.args[pos["bias"]]) is None]
        if unknown:
            raise Reject(f"the base bias of {unknown} has no recorded value: cannot tell it is frozen")
        trained = [c.name for c in calls if getattr(value(c.args[pos["bias"]]), "requires_grad", False)]
        if trained:
            raise Reject(f"trained base bias on {trained}: the grouped op has no bias gradient")
        dropped = [c.name for c in calls if c.args[pos["p"]] != 0.0]
        if dropped:
            raise Reject(f"LoRA dropout on {dropped}: each sibling draws its own mask, not grouped")
        outs = [_lora_output(c) for c in calls]
        if any(o is None for o in outs):
            raise Reject("a sibling's t or seed output is used: not grouped")
        inplace = [u.name for o in outs for u in o.users if is_in_place(u)]
        if inplace:  # the grouped outputs may be views of one tensor, which autograd refuses to modify
            raise Reject(f"a sibling's output is modified in place ({', '.join(inplace)})")
        names = [(module_of(o) or o.name).split(" ")[0].split(".")[-1] for o in outs]
        nodes = [n for c, o in zip(calls, outs) for n in (o, c)]
        scalings = [float(s) for s in _column(calls, pos["scaling"])]
        if calls[0].target is _LORA:
            kinds = {(value(c.args[1]).dtype, c.args[7]) for c in calls}
            if len(kinds) != 1:
                raise Reject(f"siblings differ in base dtype / output dtype {sorted(map(str, kinds))}")
            args = (x, _column(calls, 1), _column(calls, pos["bias"]), _column(calls, pos["a"]),
                    _column(calls, pos["b"]), scalings, calls[0].args[7])

            def replace(g):
                return g.call_function(_SIBLINGS, args)
            return Candidate(nodes, outs, replace, f"{len(calls)} siblings ({', '.join(names)})")
        if calls[0].target is _LORAG:
            return _gptq_group(x, calls, outs, nodes, names, scalings, pos)
        # 4-bit: one quantisation setup, double quantisation for all or none
        kinds = {(c.args[11], c.args[12], c.args[13], c.args[15], c.args[16], c.args[3] is None) for c in calls}
        if len(kinds) != 1:
            raise Reject("4-bit siblings differ in quant type, block sizes, double quantisation or dtypes")
        shapes = [int(v) for c in calls for v in c.args[14]]
        if set(shapes[1::2]) != {value(x).shape[-1]}:
            raise Reject(f"4-bit siblings' in_features {shapes[1::2]} do not all equal "
                         f"the input's {value(x).shape[-1]}")
        quant = [_column(calls, i) for i in (1, 2, 3, 4, 5)]  # qweight, absmax, nested absmax/code, offset
        args = (x, *quant, _column(calls, pos["bias"]), _column(calls, pos["a"]), _column(calls, pos["b"]),
                scalings, *calls[0].args[11:14], shapes, calls[0].args[15], calls[0].args[16])
        widths, dim = shapes[0::2], value(x).dim() - 1

        def replace4(g):
            call = g.call_function(_SIBLINGS4, args)
            y = g.call_function(operator.getitem, (call, 0))
            return g.call_function(torch.split, (y, widths, dim))  # the engine takes each layer's piece
        return Candidate(nodes, outs, replace4, f"{len(calls)} 4-bit siblings, one stacked weight "
                                                f"({', '.join(names)})")


def _gptq_group(x, calls, outs, nodes, names, scalings, pos) -> Candidate:
    """GPTQ siblings: one bit width, zero-point format, compute and output dtype and scales dtype
    (the weights are rounded through the scales' dtype); one stacked [in, Σout] weight."""
    quant = [_column(calls, i) for i in (1, 2, 3, 4)]  # qweight, qzeros, scales, g_idx
    tensors = [[value(n) for n in col] for col in quant]
    if any(t is None for col in tensors for t in col):
        raise Reject("a GPTQ sibling's packed tensors have no recorded value")
    kinds = {(c.args[10], c.args[11], c.args[12], c.args[13], s.dtype) for c, s in zip(calls, tensors[2])}
    if len(kinds) != 1:
        raise Reject("GPTQ siblings differ in bits, zero-point format, scales dtype or dtypes")
    n_in = [g.shape[0] for g in tensors[3]]
    if any(i != value(x).shape[-1] for i in n_in):  # compared, not hashed: sizes may be symbolic
        raise Reject(f"GPTQ siblings' in_features {n_in} do not all equal the input's {value(x).shape[-1]}")
    args = (x, *quant, _column(calls, pos["bias"]), _column(calls, pos["a"]), _column(calls, pos["b"]),
            scalings, *calls[0].args[10:14])
    widths, dim = [s.shape[1] for s in tensors[2]], value(x).dim() - 1

    def replace(g):
        call = g.call_function(_SIBLINGSG, args)
        y = g.call_function(operator.getitem, (call, 0))
        return g.call_function(torch.split, (y, widths, dim))
    return Candidate(nodes, outs, replace, f"{len(calls)} GPTQ siblings, one stacked weight ({', '.join(names)})")


def _column(calls: list, i: int) -> list:
    """Argument i of every sibling's call."""
    return [c.args[i] for c in calls]
