"""LoRA: `base(x) + lora_B(lora_A(dropout(x))) * scaling` → torch.ops.foak.lora_linear (dense
base), torch.ops.foak.lora_linear_4bit (bitsandbytes Linear4bit base), ops/lora.py, or
torch.ops.foak.lora_linear_gptq (gptqmodel TorchLinear base), ops/lora_gptq.py.

What Dynamo records for peft's lora.Linear (peft casts x to the adapter dtype first and casts
the sum back to the base's dtype):

    result = linear(x, W, bias)                      # base_layer
    xa = x.to(adapter dtype); xa = dropout(xa, p)    # each optional
    up = linear(linear(xa, A), B) * scaling
    out = (result + up).to(result dtype)

and for lora.bnb.Linear4bit `result = base_layer(x).clone()`, `up = up.to(result dtype)`.
Each adapter is anchored at its up-projection `linear(linear(·, A), B)`. A dense base is the
F.linear itself. A 4-bit base is recognised by its module, not by the ops it happens to run
(CPU and CUDA bitsandbytes record different op sequences): the nodes Dynamo attributes to a
bitsandbytes Linear4bit (node.meta['nn_module_stack']) are replaced as one unit, and the
packed weight's real Params4bit gives its quant_state (format, block sizes, shape) and the
identity of the graph inputs holding absmax and the double-quantisation statistics. A GPTQ base
(peft's GPTQLoraLinear over gptqmodel) is recognised the same way: a gptqmodel TorchLinear in the
stack, its packed buffers (qweight, qzeros, scales, g_idx) among the call's graph inputs, the bit
width read from their shapes; gptqmodel's other kernels (Marlin, ExLlama, Triton, fused CPU
ops) run opaque code and are reported instead.

Near-misses (left alone, reported): DoRA (the adapter output is scaled by a tensor), several
active adapters on one layer, lora_bias (lora_B has a bias), a base that is not nn.Linear or
bitsandbytes Linear4bit or gptqmodel TorchLinear (Linear8bitLt, transformers Conv1D i.e.
fan_in_fan_out, gptqmodel's opaque kernels, ...),
a Linear4bit already repacked for bitsandbytes' CPU inference kernel, a base weight that
requires grad, a LoRA layer whose base runs alone (adapters merged or disabled), dropout
that is in place or has a non-constant p, scaling that is not a constant.
"""

import operator
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.fx import Node

from ..engine import Candidate, Pattern, Reject
from ..nodes import canon, is_kind, item_float, module_of, other_operand, same_shape, sole_user, value
from ..ops import SUPPORTED_DTYPES
from ..ops.lora import BNB4_BLOCKSIZES
from ..ops.lora_gptq import bit_widths as gptq_bit_widths
from ..ops.lora_schema import BNB4, DENSE, GPTQ, Family

_BNB_4BIT = "bitsandbytes.nn.modules.Linear4bit"
_OTHER_BASES = {  # base layer classes we recognise but do not fuse, with why
    "bitsandbytes.nn.modules.Linear8bitLt": "8-bit base layer (bitsandbytes Linear8bitLt) is not supported",
    "transformers.pytorch_utils.Conv1D": "fan_in_fan_out base (transformers Conv1D, weight stored [in, out]) "
    "is not supported",
}
_MUTATING = re.compile(r"(^|_)(set_|copy_|_set_data)$")
_GPTQMODEL = "gptqmodel.nn_modules.qlinear.BaseQuantLinear"  # every gptqmodel quantised linear
_GPTQMODEL_GPTQ = "gptqmodel.nn_modules.qlinear.GPTQQuantLinear"  # those holding the GPTQ layout
_GPTQ_BUFFERS = ("qweight", "qzeros", "scales", "g_idx")  # the GPTQ checkpoint format's tensor names


@dataclass
class _Adapter:
    x: Node  # the layer input, before peft's cast to the adapter dtype
    a: Node
    b: Node
    scaling: object  # a float, or the SymFloat of an `.item()` under dynamic=True
    p: float  # dropout probability (0: none, or dropout in eval mode)
    nodes: list  # casts, dropout, both linears, the scaling multiply, a cast of the result
    out: Node  # what is added to the base result
    variant: list


@dataclass
class _Base:
    family: Family  # which op: lora_linear, lora_linear_4bit or lora_linear_gptq
    args: dict  # the op's arguments that describe the base (its tensors, bias, constants), by name
    nodes: list
    cdt: torch.dtype  # the base GEMM's compute dtype
    wshape: tuple  # (out_features, in_features)
    variant: list


# --- small helpers -------------------------------------------------------------------------------


def _is_clone(n) -> bool:
    return (
        isinstance(n, Node)
        and not n.kwargs
        and ((n.op == "call_method" and n.target == "clone") or (n.op == "call_function" and n.target is torch.clone))
    )


def _float_cast(n) -> bool:
    op = canon(n)
    return op is not None and op.kind == "cast" and op.kwargs["dtype"] in SUPPORTED_DTYPES


def _stack(n: Node) -> list:
    """[(key, path, class)] of the modules `n` was recorded in, outermost first."""
    return [(k, v[0], v[1]) for k, v in (n.meta.get("nn_module_stack") or {}).items()]


def _class_names(cls) -> set:
    if isinstance(cls, type):
        return {f"{c.__module__}.{c.__name__}" for c in cls.__mro__}
    return {str(cls)}


def _is_lora_layer(cls) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(cls, type) and issubclass(cls, LoraLayer)


def _real(n: Node) -> Any:
    """The real object behind a graph input: a lifted parameter's tensor, or a get_attr target."""
    if n.op == "placeholder":
        try:
            return n.meta["grapharg"].example
        except (KeyError, AttributeError, RuntimeError):
            return None
    if n.op == "get_attr":
        obj = n.graph.owning_module
        for atom in str(n.target).split("."):
            obj = getattr(obj, atom, None)
        return obj
    return None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --- the adapter ---------------------------------------------------------------------------------


def _up_projection(n: Node) -> bool:
    return is_kind(n, "linear") and is_kind(canon(n).arg(0, "input"), "linear")


def _adapter_input(n, nodes: list, variant: list) -> tuple:
    """Strip peft's cast and the dropout from the adapter's input: (x, p)."""
    p = 0.0
    while True:
        if len(n.users) != 1:  # shared with the base (Gemma's norm ends in a cast): the layer input
            return n, p
        op = canon(n)
        if op is not None and op.kind == "cast" and op.kwargs["dtype"] in SUPPORTED_DTYPES:
            nodes.insert(0, n)
            n = op.args[0]
        elif op is not None and op.kind == "dropout":
            prob, training = op.arg(1, "p", 0.5), op.arg(2, "training", op.kwargs.get("train", True))
            if op.arg(3, "inplace", False):
                raise Reject("in-place dropout on the adapter input")
            if not _number(prob) or not isinstance(training, bool):
                raise Reject("adapter dropout with a non-constant p or training flag")
            if not 0.0 <= prob < 1.0:
                raise Reject(f"adapter dropout p={prob} outside [0, 1)")
            p = float(prob) if training else 0.0
            variant.append(f"dropout p={prob}" + ("" if training else " (eval: identity)"))
            nodes.insert(0, n)
            n = op.args[0]
        else:
            return n, p


def _scaled(n: Node, nodes: list) -> tuple:
    """(node after the scaling, scaling) for `n * s` / `s * n`, or (n, 1.0) without a multiply."""
    user = sole_user(n)
    op = canon(user)
    if op is None or op.kind != "mul":
        return n, 1.0
    s = other_operand(op, n)
    sym = item_float(s)
    if sym is not None:  # dynamic=True: peft's float scaling read with .item() from a 0-d tensor
        # specialised on its value (a guard, what torch does for every float by default); the
        # .item() goes with the match when the multiply is its only user
        nodes += [user] + ([s] if len(s.users) == 1 else [])
        return user, sym  # float() when spliced (_call): a match rejected later leaves no guard
    if isinstance(s, Node):
        raise Reject(
            f"adapter output is multiplied by a tensor `{s.name}`, not a constant scaling "
            "(DoRA's magnitude, use_dora=True?)"
        )
    if not _number(s):
        raise Reject(f"adapter scaling is a {type(s).__name__}, not a number")
    nodes.append(user)
    return user, float(s)


def _reaches_add(n: Optional[Node], steps: int = 3) -> bool:
    """Whether n flows into an add through a few single-user multiplies/casts (DoRA's
    `mag · up · s` added to the rescaled base, in a graph cut off from its module)."""
    for _ in range(steps):
        n = sole_user(n) if n is not None else None
        op = canon(n)
        if op is None or op.kind not in ("mul", "cast", "add"):
            return False
        if op.kind == "add":
            return True
    return False


def _in_lora_layer(n: Node) -> bool:
    return any(_is_lora_layer(cls) for _, _, cls in _stack(n))


def _adapter(up: Node) -> Optional[_Adapter]:
    """The adapter whose up-projection is `up`, up to (not including) the add; None if the
    low-rank chain is not added to anything (not a LoRA layer)."""
    upo = canon(up)
    down = upo.arg(0, "input")
    downo = canon(down)
    nodes, variant = [down, up], []
    try:
        out, s = _scaled(up, nodes)
    except Reject:
        if _in_lora_layer(up) or _reaches_add(sole_user(up)):
            raise
        return None  # some other model's low-rank product: not ours to report
    user = sole_user(out)
    cast = _float_cast(user)
    if cast:  # peft's 4-bit layer casts the adapter output to the result dtype
        nodes.append(user)
        out = user
    add_node = sole_user(out)
    add = canon(add_node)
    if add is None or add.kind != "add" or out not in add.args[:2]:
        return None  # a low-rank chain that is not added to a base result: not a LoRA layer
    if cast and canon(out).kwargs["dtype"] != value(add_node).dtype:
        # the op rounds the adapter's term only to the result dtype: another cast's rounding (or
        # overflow) would be dropped
        raise Reject(
            f"adapter output cast to {canon(out).kwargs['dtype']}, not to the result dtype {value(add_node).dtype}"
        )
    if downo.arg(2, "bias") is not None:
        raise Reject("lora_A has a bias")
    if upo.arg(2, "bias") is not None:
        raise Reject("lora_B has a bias (lora_bias=True): not supported")
    x, p = _adapter_input(downo.arg(0, "input"), nodes, variant)
    return _Adapter(x, downo.arg(1, "weight"), upo.arg(1, "weight"), s, p, nodes, out, variant)


def _is_adapter_out(n) -> bool:
    """Whether n is a scaled low-rank chain linear(linear(·)) [· s] [cast]."""
    if _float_cast(n):
        n = canon(n).args[0]
    op = canon(n)
    if op is not None and op.kind == "mul":
        n = next((o for o in op.args[:2] if isinstance(o, Node) and _up_projection(o)), None)
    return isinstance(n, Node) and _up_projection(n)


# --- the base ------------------------------------------------------------------------------------


def _dense_base(lin: Node, x: Node, nodes: list) -> _Base:
    op = canon(lin)
    inp, w, bias = op.arg(0, "input"), op.arg(1, "weight"), op.arg(2, "bias")
    if inp is not x:
        raise Reject(f"base layer reads `{getattr(inp, 'name', inp)}` but the adapter reads `{x.name}`")
    wv = value(w)
    if wv is None or wv.dim() != 2:
        raise Reject("base weight is not a 2-D tensor")
    if wv.requires_grad:
        raise Reject("base weight requires grad (trained base): the op has no base-weight gradient")
    if wv.dtype not in SUPPORTED_DTYPES:
        raise Reject(f"base weight dtype {wv.dtype} unsupported")
    if bias is not None and (value(bias) is None or value(bias).shape != (wv.shape[0],)):
        raise Reject("base bias is not a [out_features] tensor")
    return _Base(
        DENSE,
        dict(weight=w, bias=bias),
        nodes + [lin],
        wv.dtype,
        tuple(wv.shape),
        ["dense" + (" + bias" if bias is not None else "")],
    )


def _scope(r: Node, key: str) -> list:
    """The nodes one module call consists of (its graph inputs excluded)."""
    out = []
    for n in r.graph.nodes:
        if n.op in ("placeholder", "output") or key not in (n.meta.get("nn_module_stack") or {}):
            continue
        if n.op == "get_attr" and not isinstance(_real(n), torch.fx.GraphModule):
            continue  # a parameter or buffer: an input, not part of the computation
        out.append(n)
    return out


def _graph_inputs_by_identity(graph) -> dict:
    return {
        id(v): n for n in graph.nodes if n.op in ("placeholder", "get_attr") if isinstance(v := _real(n), torch.Tensor)
    }


def _closed_call(scope: list, r: Node, x: Node, what: str, mutated: str, why: str = "") -> list:
    """Check that a quantised base layer's nodes are one pure call of `x`: nothing mutated in
    place, `r` its only result used outside, `x` its only activation. Returns its other inputs
    (parameters, buffers, quant state); x may itself be a graph input, so it is told apart by name."""
    inside = set(scope)
    mutating = [n.name for n in scope if _MUTATING.search(getattr(n.target, "__name__", str(n.target)))]
    if mutating:
        raise Reject(f"the {what} call mutates {mutated} in place ({', '.join(mutating)}){why}")
    outs = [n for n in scope if any(u not in inside for u in n.users)]
    if outs != [r]:
        raise Reject(f"the {what} call has outputs {[n.name for n in outs]}, not just its result")
    inputs = list(dict.fromkeys(a for n in scope for a in n.all_input_nodes if a not in inside))
    acts = [a.name for a in inputs if a is x or a.op not in ("placeholder", "get_attr")]
    if acts != [x.name]:
        raise Reject(f"the {what} call reads {acts}, not the adapter's input `{x.name}` alone")
    inputs.remove(x)
    return inputs


def _bnb4_base(r: Node, key: str, x: Node, nodes: list) -> _Base:
    scope = _scope(r, key)
    inputs = _closed_call(
        scope, r, x, "Linear4bit", "its parameters", ": bitsandbytes repacks the weight for its CPU inference kernel"
    )
    weight = next((a for a in inputs if hasattr(_real(a), "quant_state")), None)
    qs = getattr(_real(weight), "quant_state", None) if weight is not None else None
    if qs is None:
        raise Reject("no quantised Params4bit weight (with a quant_state) among the Linear4bit's inputs")
    q = _quant_state(qs, r.graph)
    extra = [a for a in inputs if a.op in ("placeholder", "get_attr") and a is not weight and a not in q["nodes"]]
    bias = _bias_input(extra, qs.shape[0])
    cdt = _compute_dtype(scope, x)
    args = dict(
        qweight=weight,
        absmax=q["absmax"],
        nested_absmax=q["nested_absmax"],
        nested_code=q["nested_code"],
        offset=q["offset"],
        bias=bias,
        quant_type=qs.quant_type,
        blocksize=int(qs.blocksize),
        nested_blocksize=q["nested_blocksize"],
        weight_shape=[int(s) for s in qs.shape],
        compute_dtype=cdt,
    )
    variant = [
        f"bitsandbytes 4-bit {qs.quant_type}"
        + (" double-quant" if qs.nested else "")
        + f" blocksize {qs.blocksize}, compute {str(cdt).split('.')[-1]}"
        + (" + bias" if bias is not None else "")
    ]
    return _Base(BNB4, args, nodes + scope, cdt, tuple(qs.shape), variant)


def _quant_state(qs, graph) -> dict:
    if getattr(qs, "packing_format_for_cpu", False):
        raise Reject("4-bit weight is in bitsandbytes' CPU inference layout (packing_format_for_cpu)")
    if qs.quant_type not in ("nf4", "fp4"):
        raise Reject(f"4-bit quant_type {qs.quant_type!r} unsupported")
    if qs.blocksize not in BNB4_BLOCKSIZES:
        raise Reject(f"4-bit blocksize {qs.blocksize} unsupported")
    if len(qs.shape) != 2:
        raise Reject(f"4-bit weight of shape {tuple(qs.shape)}, not 2-D")
    by_id = _graph_inputs_by_identity(graph)
    want = {"absmax": qs.absmax}
    if qs.nested:
        want.update(nested_absmax=qs.state2.absmax, nested_code=qs.state2.code, offset=qs.offset)
    found = {k: by_id.get(id(t)) for k, t in want.items()}
    missing = [k for k, n in found.items() if n is None]
    if missing:
        raise Reject(f"quant_state tensor(s) {missing} are not graph inputs")
    return {
        "absmax": found["absmax"],
        "nested_absmax": found.get("nested_absmax"),
        "nested_code": found.get("nested_code"),
        "offset": found.get("offset"),
        "nested_blocksize": int(qs.state2.blocksize) if qs.nested else 256,
        "nodes": set(found.values()),
    }


def _bias_input(extra: list, out_features: int) -> Optional[Node]:
    if not extra:
        return None
    bv = value(extra[0])
    if len(extra) > 1 or bv is None or tuple(bv.shape) != (out_features,) or not bv.is_floating_point():
        raise Reject(f"the Linear4bit call reads unexpected inputs {[e.name for e in extra]}")
    if bv.requires_grad:
        raise Reject("4-bit base bias requires grad")
    return extra[0]


def _compute_dtype(scope: list, x: Node) -> torch.dtype:
    """The dtype bitsandbytes casts the activation to (compute_dtype), else x's own."""
    casts = {canon(n).kwargs["dtype"] for n in scope if x in n.all_input_nodes and _float_cast(n)}
    if len(casts) > 1:
        raise Reject(f"the Linear4bit call casts its input to several dtypes {casts}")
    cdt = casts.pop() if casts else value(x).dtype
    if cdt not in SUPPORTED_DTYPES:
        raise Reject(f"4-bit compute dtype {cdt} unsupported")
    return cdt


# --- gptqmodel GPTQ base -------------------------------------------------------------------------


def _opaque(n: Node) -> bool:
    """An op whose numbers we cannot read off the graph: a custom or aten overload (Marlin,
    ExLlama, int4pack GEMMs), a higher-order op (autograd.Function, Triton kernels), a submodule."""
    if n.op == "call_module":
        return True
    return n.op == "call_function" and isinstance(
        n.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)
    )


def _input_name(n: Node) -> str:
    """Which GPTQ tensor a graph input is, from the attribute it was read from: Dynamo's source
    (`..._buffers['qweight']`) or a get_attr target, which may be flattened (`..._module_qweight`)."""
    if n.op == "get_attr":
        name = str(n.target)
    else:
        src = getattr(n.meta.get("grapharg"), "source", None)
        name = getattr(src, "name", "")
        name = name() if callable(name) else str(name)  # a method in older torch, a property in newer
    m = re.search(r"(?:^|[^a-zA-Z0-9])(qweight|qzeros|scales|g_idx|bias)(?:['\"]\])?_*$", name)
    return m.group(1) if m else ""


def _gptq_bits(qweight, qzeros, scales, g_idx) -> int:
    """The bit width whose packing the tensors' shapes follow (2, 4 or 8)."""
    fits = gptq_bit_widths(qweight, qzeros, scales, g_idx)
    if len(fits) != 1:
        raise Reject(
            f"GPTQ tensors qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales "
            f"{tuple(scales.shape)}, g_idx {tuple(g_idx.shape)} fit "
            + (
                f"several bit widths {fits}"
                if fits
                else "no 2/4/8-bit int32 packing (3-bit, planar, or int8/int16 words?)"
            )
        )
    return fits[0]


def _gptq_base(r: Node, key: str, cls, x: Node, nodes: list) -> _Base:
    scope = _scope(r, key)
    cname = getattr(cls, "__name__", str(cls))
    if _GPTQMODEL_GPTQ not in _class_names(cls):
        raise Reject(f"gptqmodel {cname} is not a GPTQ layer (AWQ, GGUF, FP8, ... pack differently)")
    # the class alone does not decide: TorchLinear runs gptqmodel's Triton kernel in eval on CUDA,
    # TorchFusedLinear plain torch ops in training; what the graph holds does
    opaque = sorted({str(n.target) for n in scope if _opaque(n)})
    if opaque:
        raise Reject(
            f"gptqmodel {cname} runs an opaque kernel ({', '.join(opaque)}); a GPTQ layer is fused "
            "where it dequantises in torch ops (TorchLinear, backend 'torch', in training mode)"
        )
    inputs = _closed_call(scope, r, x, "GPTQ layer", "tensors")
    role, unknown = {}, []
    for a in inputs:
        name, v = _input_name(a), value(a)
        if v is None:
            continue
        if name in _GPTQ_BUFFERS + ("bias",) and name not in role:
            role[name] = a
        elif v.is_floating_point():  # a rotation, gptqmodel's own adapter, ...: not the plain layer
            unknown.append(name or a.name)
        # integer tensors beyond the four are the library's unpacking tables (shift amounts)
    if unknown:
        raise Reject(f"the GPTQ layer call reads floating inputs {unknown} besides scales and bias")
    missing = [k for k in _GPTQ_BUFFERS if k not in role]
    if missing:
        raise Reject(f"the GPTQ layer call does not read its {missing} buffer(s)")
    qweight, qzeros, scales, g_idx = (value(role[k]) for k in _GPTQ_BUFFERS)
    bits = _gptq_bits(qweight, qzeros, scales, g_idx)
    xv = value(x)
    if scales.dtype not in SUPPORTED_DTYPES:
        raise Reject(f"GPTQ scales dtype {scales.dtype} unsupported")
    if any(value(role[k]).device != xv.device for k in role):
        raise Reject("the GPTQ layer's buffers are not all on the input's device")
    if any(value(role[k]).requires_grad for k in role):
        raise Reject("a GPTQ buffer requires grad (trained scales or bias): the op has no gradient for it")
    if any(isinstance(t := _real(role[k]), torch.Tensor) and t.is_inference() for k in role):
        # optimum packs under torch.inference_mode; the op would have to save them for backward
        raise Reject(
            "the GPTQ buffers are inference tensors (packed under torch.inference_mode): they cannot "
            "be saved for backward; clone them (a checkpoint loaded from disk holds normal tensors)"
        )
    bias = role.get("bias")
    if bias is not None and tuple(value(bias).shape) != (scales.shape[1],):
        raise Reject("GPTQ bias is not an [out_features] tensor")
    cdt = _gptq_compute_dtype(scope)
    n_in, n_out = g_idx.shape[0], scales.shape[1]
    g = _real(role["g_idx"])
    act_order = isinstance(g, torch.Tensor) and g.numel() > 1 and bool((g[1:] < g[:-1]).any())
    variant = [
        f"gptqmodel {cname} {bits}-bit, {scales.shape[0]} group(s)"
        + (", act-order" if act_order else "")
        + f", {str(scales.dtype).split('.')[-1]} scales, compute {str(cdt).split('.')[-1]}"
        + (" + bias" if bias is not None else "")
    ]
    # zero_format 2: TorchLinear reads its qzeros as v2 (gptqmodel converts v1 checkpoints on load)
    args = dict(
        qweight=role["qweight"],
        qzeros=role["qzeros"],
        scales=role["scales"],
        g_idx=role["g_idx"],
        bias=bias,
        bits=bits,
        zero_format=2,
        compute_dtype=cdt,
    )
    return _Base(GPTQ, args, nodes + scope, cdt, (n_out, n_in), variant)


_MATMULS = {torch.matmul, operator.matmul, torch.mm, torch.nn.functional.linear, torch.addmm}


def _gptq_compute_dtype(scope: list) -> torch.dtype:
    """The dtype of the layer's one GEMM (gptqmodel casts its dequantised weight to x's dtype)."""
    mms = [
        n
        for n in scope
        if (n.op == "call_function" and n.target in _MATMULS)
        or (n.op == "call_method" and n.target in ("matmul", "mm", "__matmul__"))
    ]
    if len(mms) != 1 or value(mms[0]) is None:
        raise Reject(f"the GPTQ layer call has {len(mms)} matrix products, not one")
    cdt = value(mms[0]).dtype
    if cdt not in SUPPORTED_DTYPES:
        raise Reject(f"GPTQ compute dtype {cdt} unsupported")
    return cdt


def _base(r: Node, x: Node) -> _Base:
    nodes = []
    if _is_clone(r):
        nodes.append(r)
        r = r.args[0]
    stack = _stack(r)
    names = _class_names(stack[-1][2]) if stack else set()
    # the module decides first: a quantised layer may run an F.linear on a weight it dequantises
    if _BNB_4BIT in names:
        return _bnb4_base(r, stack[-1][0], x, nodes)
    if _GPTQMODEL in names:
        return _gptq_base(r, stack[-1][0], stack[-1][2], x, nodes)
    for name, why in _OTHER_BASES.items():
        if name in names:
            raise Reject(why)
    if is_kind(r, "linear"):
        return _dense_base(r, x, nodes)
    op = canon(r)
    if op is not None and op.kind == "add" and any(_is_adapter_out(o) for o in op.args[:2]):
        raise Reject("several active adapters on one layer are not fused")
    if r.op == "placeholder":  # e.g. gptqmodel's TorchLinear in eval mode, whose weight caches break graphs
        raise Reject(
            f"base result `{r.name}` is a graph input: the base layer ran outside this graph (a graph break inside it)"
        )
    if not stack:
        raise Reject(f"base result `{r.name}` is no F.linear and has no module information")
    raise Reject(
        f"base layer {module_of(r) or r.name} is neither nn.Linear, bitsandbytes Linear4bit nor gptqmodel TorchLinear"
    )


# --- checks shared by both bases -----------------------------------------------------------------


def _check_shapes(ad: _Adapter, base: _Base, out: Node) -> None:
    xv, av, bv, ov = value(ad.x), value(ad.a), value(ad.b), value(out)
    if xv is None or av is None or bv is None or ov is None:
        raise Reject("no shape information")
    if xv.device.type not in ("cuda", "cpu"):
        raise Reject(f"device {xv.device.type} unsupported")
    for t, what in ((xv, "input"), (av, "lora_A"), (bv, "lora_B"), (ov, "result")):
        if t.dtype not in SUPPORTED_DTYPES:
            raise Reject(f"{what} dtype {t.dtype} unsupported")
    if av.dim() != 2 or bv.dim() != 2 or not same_shape((av.shape[1], bv.shape[1]), (xv.shape[-1], av.shape[0])):
        raise Reject(f"lora_A {tuple(av.shape)} / lora_B {tuple(bv.shape)} do not chain from x {tuple(xv.shape)}")
    if not same_shape(base.wshape, (bv.shape[0], av.shape[1])):
        raise Reject(f"base weight {tuple(base.wshape)} does not match the adapter's {bv.shape[0]}x{av.shape[1]}")
    if not same_shape(ov.shape, (*xv.shape[:-1], bv.shape[0])):
        raise Reject(f"result {tuple(ov.shape)} is not x {tuple(xv.shape)} projected to {bv.shape[0]} features")


def _next_adapter_add(n: Node) -> bool:
    """Whether `n` flows (through casts) into another `· + adapter` sum: a second active adapter."""
    cur, user = n, sole_user(n)
    while user is not None and _float_cast(user):
        cur, user = user, sole_user(user)
    op = canon(user)
    return op is not None and op.kind == "add" and _is_adapter_out(other_operand(op, cur))


class LoraPattern(Pattern):
    name = "lora"

    def seeds(self, graph):
        for n in graph.nodes:
            if _up_projection(n) or _lone_base_output(n):
                yield n

    def match(self, seed: Node) -> Optional[Candidate]:
        if not _up_projection(seed):
            return _base_alone(seed)
        ad = _adapter(seed)
        if ad is None:
            return None
        add = sole_user(ad.out)
        r = other_operand(canon(add), ad.out)
        if not isinstance(r, Node):
            return None  # adapter + a constant: no base layer
        base = _base(r, ad.x)
        nodes = [add] + base.nodes + ad.nodes  # the add first: reports name the LoRA layer
        out = add
        if _next_adapter_add(add):
            raise Reject("several active adapters on one layer are not fused")
        cast = sole_user(add)
        if _float_cast(cast) and not _next_adapter_add(cast):  # peft's `.to(result dtype)`
            nodes.append(cast)
            out = cast
        _check_shapes(ad, base, out)
        layout = base.family.single
        args = layout.build(
            x=ad.x,
            lora_a=ad.a,
            lora_b=ad.b,
            scaling=ad.scaling,
            dropout_p=ad.p,
            out_dtype=value(out).dtype,
            **base.args,
        )
        hint = float(ad.scaling.node.hint) if isinstance(ad.scaling, torch.SymFloat) else ad.scaling
        variant = base.variant + [f"r={value(ad.a).shape[0]}", f"scaling={hint:g}"] + ad.variant
        adt = value(ad.a).dtype
        if adt != base.cdt:
            variant.append(f"{str(adt).split('.')[-1]} adapter run in {str(base.cdt).split('.')[-1]}")
        return Candidate(nodes, out, _call(layout.op, args), ", ".join(variant))


def _call(target, args):
    """The op returns (y, t, seed); the graph takes y. A symbolic scaling is specialised here."""

    def replace(g):
        call = g.call_function(target, tuple(float(a) if isinstance(a, torch.SymFloat) else a for a in args))
        return g.call_function(operator.getitem, (call, 0))

    return replace


# --- a base layer of a LoRA layer running alone --------------------------------------------------


def _lone_base_output(n: Node) -> bool:
    """The result of a peft LoRA layer's base_layer call (the node leaving its module scope)."""
    if n.op not in ("call_function", "call_method"):
        return False
    stack = _stack(n)
    # peft's GPTQ layer reaches its base as `quant_linear_module` (an alias of base_layer)
    if (
        len(stack) < 2
        or not str(stack[-1][1]).endswith(("base_layer", "quant_linear_module"))
        or not _is_lora_layer(stack[-2][2])
    ):
        return False
    key = stack[-1][0]  # used past the base layer, not just stored away (graph outputs: a repacked absmax)
    return any(u.op != "output" and key not in (u.meta.get("nn_module_stack") or {}) for u in n.users)


def _base_alone(r: Node) -> Optional[Candidate]:
    users = list(r.users)
    while len(users) == 1 and (_is_clone(users[0]) or _float_cast(users[0])):
        r, users = users[0], list(users[0].users)
    for u in users:
        op = canon(u)
        if op is not None and op.kind == "add" and _is_adapter_out(other_operand(op, r)):
            return None  # an adapter is added: its up-projection's seed handles this layer
    raise Reject(
        "the LoRA layer's base output is not combined with an adapter in this graph "
        "(adapters merged or disabled, or applied after a graph break)"
    )
