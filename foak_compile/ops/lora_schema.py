"""The arguments of the LoRA op family, by name: {dense, bitsandbytes 4-bit, GPTQ base} × {one layer,
siblings, SwiGLU}.

One pattern writes these ops (patterns/lora.py) and others read and rewrite its calls (lora_siblings,
lora_swiglu), so the argument order is declared once, here, and patterns name arguments instead of
counting them: `Layout.build(**named)` makes a call's arguments, `Layout.parse(node)` reads them back.
ops/__init__.py checks at import that each registered op's schema has exactly these names in this
order (`check_registered`): an op whose signature changes fails there, not in a pattern's match.

Every op of the family is laid out the same way:

    one layer   x      | base tensors | bias, lora_a, lora_b, scaling, dropout_p | base constants | out_dtype
    SwiGLU      gate, up | ...the rest as one layer
    siblings    x      | one list per per-layer argument (plural name), no dropout_p | shared constants | out_dtype

where each kind of base layer (`Family`) names its tensors and constants.
"""

from collections import namedtuple
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Optional

import torch
from torch.fx import Node

_ADAPTER = ("bias", "lora_a", "lora_b", "scaling", "dropout_p")
# A siblings op takes each per-layer argument as a list, under these names; the rest is shared by the
# group. (weight_shape, too: flattened, (out, in) of each layer in turn.)
_PER_LAYER = {
    "weight": "weights",
    "qweight": "qweights",
    "absmax": "absmaxes",
    "nested_absmax": "nested_absmaxes",
    "nested_code": "nested_codes",
    "offset": "offsets",
    "qzeros": "qzeros",
    "scales": "scales",
    "g_idx": "g_idxs",
    "bias": "biases",
    "lora_a": "lora_a",
    "lora_b": "lora_b",
    "scaling": "scalings",
    "weight_shape": "weight_shapes",
}


class Layout:
    """One op's arguments, named in the op's order."""

    def __init__(self, op_name: str, fields: tuple):
        self.op_name = op_name
        self.fields = fields
        self.Args = namedtuple(f"{op_name}_args", fields)

    def __repr__(self) -> str:
        return f"Layout({self.op_name}: {', '.join(self.fields)})"

    @cached_property
    def op(self) -> torch._ops.OpOverload:
        """torch.ops.foak.<op_name>.default (registered by importing foak_compile.ops)."""
        return getattr(torch.ops.foak, self.op_name).default

    def build(self, **named) -> tuple:
        """The op's positional arguments: every field named once, nothing else (TypeError otherwise)."""
        return tuple(self.Args(**named))

    def view(self, values) -> tuple:
        """`values` in op order (an autograd context's inputs or needs_input_grad) as a named tuple."""
        return self.Args(*values)

    def parse(self, node: Any):
        """A named view of a call's arguments; None unless it calls this op with all of them by position,
        the form patterns write."""
        if (
            not (isinstance(node, Node) and node.op == "call_function" and node.target is self.op)
            or node.kwargs
            or len(node.args) != len(self.fields)
        ):
            return None
        return self.Args(*node.args)

    def arg(self, node: Node, field: str) -> Any:
        """The call's positional argument `field`, None if the call does not pass it by position."""
        i = self.fields.index(field)
        return node.args[i] if i < len(node.args) else None

    def grads(self, need=None, **named) -> tuple:
        """An autograd formula's result: the named inputs' gradients, None for the other inputs and,
        given need (needs_input_grad), for inputs autograd did not ask about."""
        unknown = set(named) - set(self.fields)
        if unknown:
            raise TypeError(f"{self.op_name} has no input(s) {sorted(unknown)}")
        need = self.view(need) if need is not None else None
        return tuple(named.get(f) if need is None or getattr(need, f) else None for f in self.fields)

    def check(self) -> None:
        """Raise unless the registered op's schema names exactly these fields, in order."""
        names = tuple(a.name for a in self.op._schema.arguments)
        if names != self.fields:
            raise RuntimeError(
                f"torch.ops.foak.{self.op_name} takes {names}, but ops/lora_schema.py "
                f"declares {self.fields}: update the one to match the other"
            )


@dataclass(frozen=True)
class Family:
    """One kind of base layer: the tensors it is given by (its weight first), the constants that
    describe their format, and the family's ops."""

    name: str  # as reports name it
    tensors: tuple
    consts: tuple
    single: Layout
    siblings: Layout
    swiglu: Optional[Layout]  # None: no SwiGLU op for this base yet

    @property
    def weight(self) -> str:
        return self.tensors[0]

    def group(self, layers: list, **given) -> tuple:
        """The siblings op's arguments for one-layer calls `layers` (parsed): each per-layer argument
        as the list of the layers' values, each shared one from the first layer, unless `given`."""
        single_name = {_PER_LAYER.get(f, f): f for f in self.single.fields}
        named = {}
        for f in self.siblings.fields:
            if f in given:
                named[f] = given[f]
            elif single_name[f] in _PER_LAYER:
                named[f] = [getattr(v, single_name[f]) for v in layers]
            else:
                named[f] = getattr(layers[0], f)
        return self.siblings.build(**named)


def per_layer(field: str) -> str:
    """The siblings op's name for one-layer argument `field` (a list of them)."""
    return _PER_LAYER[field]


def _family(name: str, suffix: str, tensors: tuple, consts: tuple, swiglu: bool = True) -> Family:
    single = ("x",) + tensors + _ADAPTER + consts + ("out_dtype",)
    siblings = tuple(_PER_LAYER.get(f, f) for f in single if f != "dropout_p")  # siblings have no dropout
    return Family(
        name,
        tensors,
        consts,
        Layout(f"lora_linear{suffix}", single),
        Layout(f"lora_linear{suffix}_siblings", siblings),
        Layout(f"lora_linear{suffix}_swiglu", ("gate", "up") + single[1:]) if swiglu else None,
    )


DENSE = _family("dense", "", ("weight",), ())
BNB4 = _family(
    "4-bit",
    "_4bit",
    ("qweight", "absmax", "nested_absmax", "nested_code", "offset"),
    ("quant_type", "blocksize", "nested_blocksize", "weight_shape", "compute_dtype"),
)
GPTQ = _family(
    "GPTQ", "_gptq", ("qweight", "qzeros", "scales", "g_idx"), ("bits", "zero_format", "compute_dtype"), swiglu=False
)
FAMILIES = (DENSE, BNB4, GPTQ)


def layouts() -> list:
    return [lay for f in FAMILIES for lay in (f.single, f.siblings, f.swiglu) if lay is not None]


def family_of(target: Any) -> Optional[Family]:
    """The family whose one-layer op `target` is (a node's target), else None."""
    return next((f for f in FAMILIES if target is f.single.op), None)


def check_registered() -> None:
    for lay in layouts():
        lay.check()
