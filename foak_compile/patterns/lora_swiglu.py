"""LoRA SwiGLU: a gated MLP's `down_proj(silu(gate) * up)` whose down-projection is a fused LoRA
layer → one torch.ops.foak.lora_linear_swiglu (dense base) or lora_linear_4bit_swiglu (bitsandbytes
4-bit base) call (ops/lora_swiglu.py), which never saves the product for backward.

Runs on what `lora` (and `lora_siblings`) left: anchored at a foak lora_linear / lora_linear_4bit
call whose input is `silu(g) * u` (either operand order), it takes the silu, the product and the
call. g and u are any nodes of one shape and dtype: LoRA layers, grouped siblings' outputs, plain
linears. Left alone, with the reason: another activation (Gemma's gelu), silu in place, silu's
output or the product used elsewhere, g and u differing in shape or dtype, the call's t / seed
outputs used, a GPTQ base. A default pattern: on the bf16 1B step it saves one [tokens, ffn] activation per
layer (1 GiB) at the same speed (docs/decisions.md).
"""

import operator
from typing import Optional

import torch
from torch.fx import Node

from ..engine import Candidate, Pattern, Reject
from ..nodes import canon, is_in_place, module_of, other_operand, same_shape, sole_getitem, value
from ..ops.lora_schema import family_of

# elementwise activations of gated MLPs: a product of one of them is reported when it is not silu
_ACTIVATIONS = {
    "silu",
    "gelu",
    "relu",
    "sigmoid",
    "tanh",
    "mish",
    "hardswish",
    "hardsigmoid",
    "elu",
    "selu",
    "celu",
    "leaky_relu",
    "softplus",
    "relu6",
}
_IN_PLACE_MULS = {operator.imul, "mul_", torch.Tensor.mul_}


def _op_name(n) -> str:
    if not isinstance(n, Node) or n.op not in ("call_function", "call_method"):
        return ""
    if n.op == "call_method":
        return str(n.target)
    return getattr(n.target, "_opname", None) or getattr(n.target, "__name__", "")  # aten overloads: _opname


def _activation(n) -> Optional[str]:
    """The activation `n` applies ("silu", "gelu", ...; in place too), or None."""
    name = _op_name(n).rstrip("_")
    return name if name in _ACTIVATIONS else None


def _described(act: Node) -> str:
    """The activation as the report names it, with its approximation (gelu's tanh) if any."""
    approximate = act.kwargs.get("approximate", act.args[1] if len(act.args) > 1 else "none")
    name = _activation(act)
    return f"{name}(approximate={approximate!r})" if name == "gelu" and approximate != "none" else name


def _short(n: Node, act: Node) -> str:
    """The layer a node comes from (gate_proj) when it is not the MLP itself, else the node's name."""
    where = module_of(n)
    return where.split(" ")[0].split(".")[-1] if where and where != module_of(act) else n.name


class LoraSwigluPattern(Pattern):
    name = "lora_swiglu"

    def seeds(self, graph):
        for n in graph.nodes:
            if n.op == "call_function" and family_of(n.target) is not None:
                yield n

    def match(self, call: Node) -> Optional[Candidate]:
        family = family_of(call.target)  # the down projection's base: its lora_linear op and the fused form
        prod = family.single.arg(call, "x")
        op = canon(prod)
        if op is None or op.kind != "mul" or len(op.args) != 2:
            if isinstance(prod, Node) and prod.target in _IN_PLACE_MULS and any(map(_activation, prod.args)):
                raise Reject("the SwiGLU product is computed in place")
            return None
        act = next((a for a in op.args if _activation(a)), None)
        if act is None:
            return None  # a product, but no gated activation: e.g. an RMSNorm's weight
        if _activation(act) != "silu":
            raise Reject(f"activation is {_described(act)}, not silu")
        if is_in_place(act):  # silu_ / F.silu(x, inplace=True) / F.silu(x, True)
            raise Reject("silu is applied in place")
        gate, up = (act.args[0] if act.args else act.kwargs.get("input")), other_operand(op, act)
        if not isinstance(up, Node):
            raise Reject(f"silu(gate) is multiplied by the constant {up!r}, not by an up projection")
        if up is act or op.kwargs:
            raise Reject("the product is not silu(gate) * up (silu squared, or keyword arguments)")
        if len(act.users) != 1:
            raise Reject(f"silu(gate) has {len(act.users)} users")
        if len(prod.users) != 1:
            raise Reject(f"the SwiGLU product has {len(prod.users)} users")
        if family.swiglu is None:
            raise Reject(f"{family.name} down base not fused yet")
        layer = family.single.parse(call)
        if layer is None:
            raise Reject("a LoRA op call not in the form the lora pattern writes (keywords, argument count)")
        out = sole_getitem(call, 0)
        if out is None:
            raise Reject("the down projection's t or seed output is used")
        gv, uv = value(gate), value(up)
        if gv is None or uv is None:
            raise Reject("silu(gate) or up has no recorded value: cannot check shapes and dtypes")
        if gv.dtype != uv.dtype:
            raise Reject(f"silu(gate) and up differ in dtype ({gv.dtype} and {uv.dtype})")
        if not same_shape(gv.shape, uv.shape):  # symbolic sizes: unknown counts as different, no guard
            raise Reject(f"silu(gate) {tuple(gv.shape)} and up {tuple(uv.shape)} differ in shape (a broadcast)")
        # the fused op takes the layer's arguments with (gate, up) for its input x
        args = family.swiglu.build(gate=gate, up=up, **{k: v for k, v in layer._asdict().items() if k != "x"})
        fused = family.swiglu.op

        def replace(g):
            new = g.call_function(fused, args)
            return g.call_function(operator.getitem, (new, 0))  # the op returns (y, t, seed)

        variant = f"silu({_short(gate, act)})·{_short(up, act)} → {_short(out, act)} ({family.name})"
        return Candidate([prod, act, call, out], out, replace, variant)  # the product first: reports name the MLP
