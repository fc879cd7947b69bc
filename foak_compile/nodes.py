"""Reading Dynamo-level FX nodes independently of how the user's code spelt the op.

Dynamo records `x * y` as operator.mul, `torch.mul(x, y)` as torch.mul and `x.mul(y)` as a
call_method; `.float()`, `.to(torch.float32)` and `.type_as(t)` are all casts. `canon` folds
these spellings into one `Op(kind, args, kwargs)` so patterns are written once.
"""

import functools
import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

_FUNCTIONS = {
    operator.mul: "mul",
    torch.mul: "mul",
    operator.add: "add",
    torch.add: "add",
    operator.sub: "sub",
    torch.sub: "sub",
    operator.truediv: "div",
    torch.div: "div",
    operator.pow: "pow",
    torch.pow: "pow",
    operator.neg: "neg",
    torch.neg: "neg",
    torch.rsqrt: "rsqrt",
    torch.sqrt: "sqrt",
    torch.reciprocal: "reciprocal",
    torch.mean: "mean",
    F.rms_norm: "rms_norm",
    F.layer_norm: "layer_norm",
    torch.layer_norm: "layer_norm",
    # data movement (rotary embeddings' rotate_half)
    torch.cat: "cat",
    torch.concat: "cat",
    torch.concatenate: "cat",
    torch.stack: "stack",
    torch.unsqueeze: "unsqueeze",
    operator.getitem: "getitem",
}
if hasattr(torch, "rms_norm"):
    _FUNCTIONS[torch.rms_norm] = "rms_norm"

_METHODS = {
    "mul": "mul",
    "add": "add",
    "sub": "sub",
    "div": "div",
    "pow": "pow",
    "neg": "neg",
    "rsqrt": "rsqrt",
    "sqrt": "sqrt",
    "reciprocal": "reciprocal",
    "mean": "mean",
    "unsqueeze": "unsqueeze",
}
_CAST_METHODS = {"to", "float", "half", "bfloat16", "double", "type", "type_as"}

# Losses and the lm_head (patterns/cross_entropy.py).
_FUNCTIONS.update(
    {
        F.linear: "linear",
        F.cross_entropy: "cross_entropy",
        F.nll_loss: "nll_loss",
        F.log_softmax: "log_softmax",
        torch.log_softmax: "log_softmax",
    }
)
_METHODS.update({"log_softmax": "log_softmax"})

# LoRA's input dropout (patterns/lora.py); args (input, p, training) in both spellings.
_FUNCTIONS.update({F.dropout: "dropout", torch.dropout: "dropout"})


@dataclass
class Op:
    kind: str
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name, default)


def value(node: Any) -> Optional[torch.Tensor]:
    """The (fake) tensor a node produces, from Dynamo's or AOT's meta."""
    if not isinstance(node, Node):
        return None
    v = node.meta.get("example_value", node.meta.get("val"))
    return v if isinstance(v, torch.Tensor) else None


def item_float(node: Any) -> Optional[torch.SymFloat]:
    """The symbolic float a `.item()` node reads, when it has a concrete hint: how Dynamo passes a
    module's float attribute (RMSNorm's eps, LoRA's scaling) under dynamic=True. None otherwise."""
    if not (isinstance(node, Node) and node.op == "call_method" and node.target == "item"):
        return None
    v = node.meta.get("example_value", node.meta.get("val"))
    return v if isinstance(v, torch.SymFloat) and v.node.has_hint() else None


_MODE_SWITCHES = {
    torch._C._set_grad_enabled,
    torch.amp.autocast_mode._enter_autocast,
    torch.amp.autocast_mode._exit_autocast,
}


def is_mode_switch(n: Node) -> bool:
    """A grad-mode or autocast switch: an op fused on one side of it must not move to the other."""
    return n.op == "call_function" and n.target in _MODE_SWITCHES


def canon(node: Any) -> Optional[Op]:
    if not isinstance(node, Node):
        return None
    if node.op == "call_function" and node.target in _FUNCTIONS:
        kind = _FUNCTIONS[node.target]
        if kind in ("add", "sub") and node.kwargs.get("alpha", 1) != 1:
            return None
        if kind == "div" and node.kwargs.get("rounding_mode") is not None:
            return None
        return Op(kind, tuple(node.args), dict(node.kwargs))
    if node.op == "call_method":
        if node.target in _METHODS:
            return Op(_METHODS[node.target], tuple(node.args), dict(node.kwargs))
        if node.target in _CAST_METHODS and _is_pure_cast(node):
            return Op("cast", (node.args[0],), {"dtype": value(node).dtype})
    return None


def _is_pure_cast(node: Node) -> bool:
    """Only the dtype changes: same shape and device, no copy/memory-format/non_blocking tricks."""
    src, out = value(node.args[0]), value(node)
    if src is None or out is None or set(node.kwargs) - {"dtype", "device"}:
        return False
    return src.shape == out.shape and src.device == out.device


def is_kind(node: Any, kind: str) -> bool:
    op = canon(node)
    return op is not None and op.kind == kind


_IN_PLACE_FUNCTIONS = {
    "iadd",
    "isub",
    "imul",
    "itruediv",
    "ifloordiv",
    "imod",
    "ipow",
    "imatmul",
    "iand",
    "ior",
    "ixor",
    "ilshift",
    "irshift",
    "setitem",
    "delitem",
}


@functools.lru_cache(maxsize=None)
def _inplace_position(target) -> Optional[int]:
    """Where a function takes its `inplace` flag (F.relu(x, True), F.dropout(x, p, t, True)), or None."""
    try:
        params = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


def is_in_place(n: Node) -> bool:
    """n writes into an existing tensor: `x.add_()`, `x += y`, `x[i] = y`, `out=`, `inplace=True` (or
    the flag by position). `operator.and_`/`or_`/`not_` only look like in-place methods."""
    if n.op == "call_method":
        name = str(n.target)
    elif n.op == "call_function":
        name = getattr(n.target, "_opname", None) or getattr(n.target, "__name__", "")  # aten: _opname
        if getattr(n.target, "__module__", None) in ("_operator", "operator"):
            return name in _IN_PLACE_FUNCTIONS
    else:
        return False
    if (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_FUNCTIONS:
        return True
    if "out" in n.kwargs or n.kwargs.get("inplace") is True:
        return True
    try:
        i = _inplace_position(n.target) if n.op == "call_function" else None
    except TypeError:  # an unhashable target
        i = None
    return i is not None and len(n.args) > i and n.args[i] is True


def other_operand(op: Op, node: Node) -> Any:
    """For a binary op with `node` as one operand, the other one."""
    a, b = op.args[0], op.args[1]
    return b if a is node else a


def source_of(node: Node) -> str:
    """`file:line in fn: code` of the user's frame that produced `node`."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln for ln in trace.strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        ln = lines[i].strip()
        if ln.startswith("File "):
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            try:
                path, rest = ln[len('File "') :].split('", line ', 1)
                lineno, fn = rest.split(", in ", 1)
            except ValueError:
                return ln
            short = "/".join(path.split("/")[-3:])
            return f"{short}:{lineno} in {fn}: {code}"
    return ""


def module_of(node: Node) -> str:
    """Innermost nn.Module path and class, e.g. `model.layers.0.input_layernorm (LlamaRMSNorm)`."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, cls = list(stack.values())[-1]
    path = _strip_dynamo_prefix(str(path))
    name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1].strip("'>")
    return f"{path} ({name})" if path else name


def _strip_dynamo_prefix(path: str) -> str:
    # "L['args'][0].model.layers.0" / "L['self'].model.norm" -> "model.layers.0" / "model.norm"
    import re

    path = re.sub(r"^[LG]\['[^']*'\](\[\d+\])?\.?", "", path)
    # attribute access Dynamo spells out on wrapper modules (peft): "__dict__['_modules']['base_model']"
    path = re.sub(r"\.?(__dict__\['_modules'\]|_modules)\['([^']*)'\]", r".\2", path)
    return path.lstrip(".")


# --- small facts the patterns share ---------------------------------------------------------------


def sole_user(n: Node) -> Optional[Node]:
    """n's one user, or None when it has none or several."""
    return next(iter(n.users)) if len(n.users) == 1 else None


def same_size(a, b) -> bool:
    """a == b without guarding on symbolic sizes (unknown counts as different)."""
    return statically_known_true(a == b)


def same_shape(a, b) -> bool:
    return len(a) == len(b) and all(same_size(i, j) for i, j in zip(a, b))


def sole_getitem(call: Node, index: int) -> Optional[Node]:
    """The `call[index]` node when it is call's only user: one output of a multi-output op (a foak
    LoRA op's y) taken, the others (its t, seed) unused."""
    user = sole_user(call)
    if user is not None and user.target is operator.getitem and user.args[1] == index:
        return user
    return None
