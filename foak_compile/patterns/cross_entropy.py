"""Cross-entropy → torch.ops.foak.cross_entropy, and lm_head + cross-entropy →
torch.ops.foak.linear_cross_entropy (ops/cross_entropy.py).

Loss spellings: F.cross_entropy (nn.CrossEntropyLoss inlines to it) and
F.nll_loss(F.log_softmax(x, -1)) (function or method; log_softmax's dtype=float32 upcast too),
on [tokens, vocab] logits with [tokens] int64 labels: any ignore_index, reduction
mean/sum/none, label_smoothing. HF's causal-LM loss is
`cross_entropy(logits.float().view(-1, V), labels, ignore_index=-100, reduction=mean|sum)`
(sum is then divided by num_items_in_batch, which stays in the graph): the upcast and the
view join the match when nothing else uses them, so the op reads the logits in their own
dtype and no fp32 copy is made.

linear_cross_entropy needs the logits to come from F.linear through such upcasts/views only,
and to have no other user. HF's CausalLM forward returns the logits in its output, so under a
plain `model(input_ids, labels=labels)` it is a near-miss (the logits have an outside user)
and cross_entropy matches instead; it matches when the compiled code keeps only the loss.

Between lm_head and loss, linear_cross_entropy also takes what models do to their logits: a
scale by a constant (Granite's `logits / logits_scaling`, Cohere's `logits * logit_scale`) and
Gemma 2/3's final-logit softcapping `c * tanh(logits / c)`, scale first; the op applies them to
each logit inside the loss kernels (kernels/cross_entropy.py `Epilogue`), rounded as eager rounds.

Near-misses: class weights, legacy size_average/reduce, probability (float) or non-int64
labels, the class dim not last; for the lm_head, a softcap or scale spelt otherwise (two
constants, a scale after the softcap, a tensor scale), or mixing half-precision and fp32 steps.
"""

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import ops  # noqa: F401  (registers torch.ops.foak.*)
from ..engine import Candidate, Pattern, Reject
from ..ops import SUPPORTED_DTYPES
from ..ops.cross_entropy import REDUCTIONS
from ..nodes import canon, is_kind, item_float, other_operand, value

LOSS_KINDS = ("cross_entropy", "nll_loss")


@dataclass
class _Loss:
    node: Node  # the cross_entropy / nll_loss call
    logits: Node  # whose rows are softmaxed (log_softmax's input for nll_loss)
    labels: Node
    ignore_index: int
    label_smoothing: float
    reduction: str
    nodes: list  # what the loss itself removes: [log_softmax, views,] the loss node
    variant: list


def _is_exact_upcast(src: torch.Tensor, out: torch.Tensor) -> bool:
    return out.dtype == src.dtype or (out.dtype == torch.float32 and src.dtype in SUPPORTED_DTYPES)


def _producer(n) -> Optional[Node]:
    """n's input when n leaves every row's values and the rows' order as they are: an exact
    upcast, a view/reshape keeping the last dim (merging leading dims), `.contiguous()`."""
    if not isinstance(n, Node) or not n.args or not isinstance(n.args[0], Node):
        return None
    src, out = value(n.args[0]), value(n)
    if src is None or out is None or src.dim() == 0 or out.dim() == 0:
        return None
    op = canon(n)
    if op is not None and op.kind == "cast":
        return op.args[0] if _is_exact_upcast(src, out) else None
    shape_only = (n.op == "call_method" and n.target in ("view", "reshape", "contiguous", "flatten")) or (
        n.op == "call_function" and n.target in (torch.reshape, torch.flatten)
    )
    if shape_only and src.dtype == out.dtype and src.shape[-1] == out.shape[-1]:
        return n.args[0]
    return None


def _row_selection(n) -> Optional[tuple]:
    """(src, index) for n = src[index] with int / constant-slice entries on leading dims only, as
    `logits[:, :-1]` (a hand-written next-token shift): the same rows of the lm_head's output are
    the lm_head of the same rows of its input, hidden[index]."""
    if not (
        isinstance(n, Node)
        and n.op == "call_function"
        and n.target is operator.getitem
        and isinstance(n.args[0], Node)
        and value(n.args[0]) is not None
        and value(n) is not None
    ):
        return None
    index = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    plain = all(
        (isinstance(i, int) and not isinstance(i, bool))
        or (
            isinstance(i, slice)
            and all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (i.start, i.stop, i.step))
        )
        for i in index
    )
    if not plain or len(index) >= value(n.args[0]).dim():  # the vocab dim stays whole
        return None
    return n.args[0], index


def _constant(a) -> tuple:
    """(number, nodes) for a Python number, or the `.item()` of one (a module's float attribute
    under dynamic=True, specialised on as rms_norm does with eps); (None, []) otherwise."""
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(a), []
    v = item_float(a)
    return (v, [a]) if v is not None else (None, [])


def _hint(v) -> float:
    """The value of a `_constant`, without guarding on a symbolic one (that waits for the splice)."""
    return float(v.node.hint) if isinstance(v, torch.SymFloat) else float(v)


def _is_tanh(n) -> bool:
    return isinstance(n, Node) and (
        (n.op == "call_function" and n.target in (torch.tanh, F.tanh)) or (n.op == "call_method" and n.target == "tanh")
    )


def _softcap_step(n) -> Optional[tuple]:
    """(z, c, nodes, problem) for n = `c * tanh(z / c)`, Gemma 2's final-logit softcapping, where
    `problem` says why a softcap spelt otherwise is not fused (else None); None when n is no tanh
    times something."""
    op = canon(n)
    if op is None or op.kind != "mul" or len(op.args) != 2:
        return None
    t = next((a for a in op.args if _is_tanh(a)), None)
    if t is None:
        return None
    c, c_nodes = _constant(other_operand(op, t))
    inner = canon(t.args[0]) if t.args else None
    if inner is None or inner.kind not in ("div", "mul") or not isinstance(inner.args[0], Node):
        return None
    c_in, in_nodes = _constant(inner.args[1])
    problem = None
    if c is None or c_in is None:
        problem = "softcap c·tanh(z/c) with a tensor c"
    elif inner.kind != "div" or _hint(c_in) != _hint(c) or not 0 < _hint(c) < math.inf:
        what = "·" if inner.kind == "mul" else "/"
        problem = f"softcap {_hint(c):g}·tanh(z{what}{_hint(c_in):g}): only c·tanh(z/c) with one finite c > 0 is fused"
    return inner.args[0], c, [t.args[0], t, n] + c_nodes + in_nodes, problem


def _scale_step(n) -> Optional[tuple]:
    """(z, kind, s, nodes, problem) for n = z * s, s * z or z / s with a constant s (`problem`: why
    a scale is not fused, else None); None otherwise."""
    op = canon(n)
    if op is None or op.kind not in ("mul", "div") or len(op.args) != 2:
        return None
    tensors = [a for a in op.args if isinstance(a, Node) and value(a) is not None]
    if len(tensors) == 2:  # a 0-d tensor scale (no size is read: no guard on symbolic shapes)
        z = [a for a in tensors if value(a).dim() != 0]
        if len(z) == 1 and (op.kind == "mul" or op.args[0] is z[0]):
            return z[0], op.kind, None, [n], "logit scale is a tensor, not a constant"
        return None
    if len(tensors) != 1 or (op.kind == "div" and op.args[0] is not tensors[0]):
        return None
    s, s_nodes = _constant(other_operand(op, tensors[0]))
    if s is None:
        return None
    problem = None if 0 < abs(_hint(s)) < math.inf else f"logit scale {_hint(s):g}"
    return tensors[0], op.kind, s, [n] + s_nodes, problem


@dataclass
class _Head:
    """The lm_head's F.linear below a loss and what lies between them."""

    linear: Node
    nodes: list  # the chain's nodes, lm_head first
    scale: object = 1.0
    divisor: object = 1.0
    softcap: object = 0.0
    step_dtypes: tuple = ()  # the dtypes the scale/softcap steps computed in
    rows: Optional[tuple] = None  # a row selection of the logits (`_row_selection`), applied to the hidden states
    rows_of: Optional[torch.Size] = None  # the shape it selects from: must be the lm_head output's

    def epilogue_args(self) -> tuple:
        rounded = bool(self.step_dtypes) and self.step_dtypes[0] != torch.float32
        # float() only here, when the match is spliced in: a symbolic constant is guarded on then
        return float(self.scale), float(self.divisor), float(self.softcap), rounded

    def variant(self) -> list:
        out = ["rows selected"] if self.rows is not None else []
        out += [f"logits * {_hint(self.scale):g}"] if _hint(self.scale) != 1.0 else []
        out += [f"logits / {_hint(self.divisor):g}"] if _hint(self.divisor) != 1.0 else []
        out += [f"softcap {_hint(self.softcap):g}"] if _hint(self.softcap) else []
        return out


def _lm_head(x) -> Optional[_Head]:
    """Walk up from the loss's logits to an F.linear through upcasts/views (`_producer`), at most
    one softcap and, before it, at most one constant scale; None when x is not from a linear. A
    step the op does not implement is reported (Reject) only once the walk has reached the lm_head:
    a loss over other logits is cross_entropy's, and no near-miss of this pattern."""
    chain, head = [], _Head(None, [])
    seen_scale, problem = False, None
    while not is_kind(x, "linear"):
        src = _producer(x)
        if src is None and head.rows is None and (sel := _row_selection(x)) is not None:
            src, head.rows = sel
            head.rows_of = value(src).shape
        if src is not None:
            chain[:0] = [x]
            x = src
            continue
        out, cap = x, _softcap_step(x)
        if cap is not None:
            x, head.softcap, nodes, bad = cap
            if bad is None and (seen_scale or len(head.step_dtypes) > 0):
                bad = "a softcap after a logit scale or a second softcap between lm_head and loss"
        else:
            step = _scale_step(x)
            if step is None:
                return None
            x, kind, s, nodes, bad = step
            if bad is None and seen_scale:
                bad = "two logit scales between lm_head and loss"
            seen_scale = True
            if kind == "mul":
                head.scale = s
            else:
                head.divisor = s
        problem = problem or bad
        head.step_dtypes += (value(out).dtype,)
        chain[:0] = nodes
    if problem:
        raise Reject(problem)
    # a constant's `.item()` joins the match once, and only if nothing else reads it
    inside = set(chain)
    chain = [n for n in dict.fromkeys(chain) if item_float(n) is None or set(n.users) <= inside]
    head.linear, head.nodes = x, [x] + chain
    return head


def _log_softmax_input(x: Node, nodes: list, variant: list) -> Optional[Node]:
    """For nll_loss(x): the input of the log_softmax that x reshapes, or None."""
    chain, cur = [], x
    while not is_kind(cur, "log_softmax"):
        src = _producer(cur)
        if src is None or value(src).dtype != value(cur).dtype:  # rounded log-probs: not ours
            return None
        chain.insert(0, cur)
        cur = src
    op = canon(cur)
    inp, dim = op.arg(0, "input"), op.arg(1, "dim")
    iv, ov = value(inp), value(cur)
    if iv is None or ov is None:
        raise Reject("log_softmax without shape information")
    if dim is None:
        raise Reject("log_softmax without an explicit dim")
    if dim not in (-1, iv.dim() - 1):
        raise Reject(f"log_softmax over dim {dim}, not the last")
    if not _is_exact_upcast(iv, ov):
        raise Reject(f"log_softmax from {iv.dtype} to {ov.dtype}")
    nodes[:0] = [cur] + chain
    variant[0] = "nll_loss(log_softmax)" + (f" upcast from {iv.dtype}" if ov.dtype != iv.dtype else "")
    return inp


def _parse_loss(seed: Node) -> Optional[_Loss]:
    """The loss call's meaning, Reject for arguments we do not implement, None for no candidate."""
    op = canon(seed)
    x, labels = op.arg(0, "input"), op.arg(1, "target")
    if op.arg(2, "weight") is not None:
        raise Reject("class weights (weight=) are not supported")
    if op.arg(3, "size_average") is not None or op.arg(5, "reduce") is not None:
        raise Reject("legacy size_average/reduce arguments")
    ignore_index, reduction = op.arg(4, "ignore_index", -100), op.arg(6, "reduction", "mean")
    smoothing = op.arg(7, "label_smoothing", 0.0) if op.kind == "cross_entropy" else 0.0
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise Reject(f"ignore_index is a {type(ignore_index).__name__}, not a constant int")
    if reduction not in REDUCTIONS:
        raise Reject(f"reduction {reduction!r}")
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)):
        raise Reject(f"label_smoothing is a {type(smoothing).__name__}, not a constant")
    if not 0.0 <= smoothing <= 1.0:
        raise Reject(f"label_smoothing {smoothing} outside [0, 1] (torch raises)")
    xv, yv = value(x), value(labels)
    if xv is None or yv is None:
        raise Reject("no shape information")
    if yv.is_floating_point():
        raise Reject("class-probability (floating point) targets")
    if yv.dtype != torch.int64:
        raise Reject(f"labels of dtype {yv.dtype}, not int64")
    if xv.dim() != 2 or yv.dim() != 1:
        raise Reject(
            f"logits of shape {tuple(xv.shape)} with labels {tuple(yv.shape)}: only "
            "[tokens, vocab] with [tokens] (the class dim last)"
        )
    nodes, variant = [seed], [f"F.{op.kind}"]
    if op.kind == "nll_loss":
        x = _log_softmax_input(x, nodes, variant)
        if x is None:
            return None  # log-probs from elsewhere: nothing to fuse
    variant.append(f"reduction={reduction}")
    if smoothing:
        variant.append(f"label_smoothing={smoothing}")
    return _Loss(seed, x, labels, ignore_index, float(smoothing), reduction, nodes, variant)


def _check_input(t: Optional[torch.Tensor], what: str) -> None:
    if t is None:
        raise Reject(f"{what} without shape information")
    if t.dtype not in SUPPORTED_DTYPES:
        raise Reject(f"{what} of dtype {t.dtype} unsupported")
    if t.device.type not in ("cuda", "cpu"):
        raise Reject(f"device {t.device.type} unsupported")
    if not isinstance(t.shape[-1], int):
        raise Reject(f"{what}: the last dim is symbolic")


def _check_loss_dtype(loss) -> None:
    """Like rms_norm: the loss must see fp32 logits (HF upcasts with .float()). Over bf16/fp16
    logits torch rounds log-probabilities to that dtype; our fp32 kernel would not. What the
    loss call receives decides: log_softmax(x_bf16, dtype=torch.float32) is an exact upcast."""
    lv = value(canon(loss.node).arg(0, "input"))
    if lv is not None and lv.dtype in (torch.bfloat16, torch.float16):
        raise Reject(
            f"loss computed over {lv.dtype} logits without an fp32 upcast (the fp32 kernel would round differently)"
        )


def _call(target, args):
    """The fused op returns (loss, lse); the graph takes the loss."""

    def replace(g):
        call = g.call_function(target, args)
        return g.call_function(operator.getitem, (call, 0))

    return replace


def _call_lce(args, head: _Head):
    def replace(g):
        hidden = args[0] if head.rows is None else g.call_function(operator.getitem, (args[0], head.rows))
        return _call(torch.ops.foak.linear_cross_entropy.default, (hidden,) + args[1:] + head.epilogue_args())(g)

    return replace


class _LossPattern(Pattern):
    def seeds(self, graph):
        for n in graph.nodes:
            op = canon(n)
            if op is not None and op.kind in LOSS_KINDS:
                yield n


class CrossEntropyPattern(_LossPattern):
    name = "cross_entropy"

    def match(self, seed: Node) -> Optional[Candidate]:
        loss = _parse_loss(seed)
        if loss is None:
            return None
        _check_loss_dtype(loss)
        nodes, variant, x = list(loss.nodes), list(loss.variant), loss.logits
        # Upcasts/views only feeding the loss join the match: the op reads what they read.
        while len(x.users) == 1 and (src := _producer(x)) is not None:
            if value(src).dtype != value(x).dtype:
                variant.append(f"upcast from {value(src).dtype}")
            nodes.insert(0, x)
            x = src
        _check_input(value(x), "logits")
        args = (x, loss.labels, loss.ignore_index, loss.label_smoothing, loss.reduction, value(seed).dtype)
        return Candidate(nodes, seed, _call(torch.ops.foak.cross_entropy.default, args), ", ".join(variant))


class LinearCrossEntropyPattern(_LossPattern):
    name = "linear_cross_entropy"
    # a graph returns the logits when its caller does (a plain model call: compile the loss alone) or when a
    # graph break after the lm_head hands them to the next graph (then TORCH_LOGS=graph_breaks says where)
    graph_output_hint = (
        "this graph returns the logits: to the caller (a model call returns them: compile a "
        "loss-only function, `lambda **b: model(**b).loss`, or compile_for_trainer(model, "
        "loss_only=True)) or to the code after a graph break (TORCH_LOGS=graph_breaks)"
    )

    def match(self, seed: Node) -> Optional[Candidate]:
        loss = _parse_loss(seed)
        if loss is None:
            return None
        head = _lm_head(loss.logits)
        if head is None:
            return None  # logits not from a linear: cross_entropy's business
        x = head.linear
        if len(set(head.step_dtypes)) > 1:
            raise Reject(
                f"logit scale/softcap steps in {' and '.join(map(str, head.step_dtypes))}: "
                "only all in the logits' dtype or all in fp32"
            )
        _check_loss_dtype(loss)
        lin = canon(x)
        hidden, weight, bias = lin.arg(0, "input"), lin.arg(1, "weight"), lin.arg(2, "bias")
        hv, wv, ov = value(hidden), value(weight), value(x)
        _check_input(hv, "hidden states")
        if wv is None or ov is None or wv.dim() != 2 or wv.shape[0] != ov.shape[-1]:
            raise Reject("lm_head weight is not [vocab, hidden]")
        bv = value(bias) if bias is not None else None
        if bias is not None and (
            bv is None or bv.dim() != 1 or bv.dtype != wv.dtype or not statically_known_true(bv.shape[0] == wv.shape[0])
        ):
            # F.linear also broadcasts a [1] bias; the kernels read one per vocabulary column
            raise Reject(
                f"lm_head bias {tuple(bv.shape) if bv is not None else '?'} is not a [vocab] "
                f"tensor of the weight's dtype"
            )
        if not hv.dtype == wv.dtype == ov.dtype:
            raise Reject(f"lm_head gives {ov.dtype} from {hv.dtype} × {wv.dtype} (autocast?)")
        if head.step_dtypes and head.step_dtypes[0] not in (ov.dtype, torch.float32):
            raise Reject(f"logit scale/softcap in {head.step_dtypes[0]} over {ov.dtype} logits")
        if head.rows is not None and [str(d) for d in head.rows_of] != [str(d) for d in ov.shape]:
            # hidden[index] is those rows only where the index sees the lm_head's own leading dims
            raise Reject(
                f"the logits are indexed after a reshape of the lm_head's output "
                f"{tuple(ov.shape)} to {tuple(head.rows_of)}"
            )
        variant = ["F.linear" + (" + bias" if bias is not None else "")] + head.variant() + loss.variant
        if ov.dtype != value(loss.logits).dtype:
            variant.append(f"upcast from {ov.dtype}")
        args = (
            hidden,
            weight,
            bias,
            loss.labels,
            loss.ignore_index,
            loss.label_smoothing,
            loss.reduction,
            value(seed).dtype,
        )
        return Candidate(head.nodes + loss.nodes, seed, _call_lce(args, head), ", ".join(variant))
