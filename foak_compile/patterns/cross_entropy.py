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

Near-misses: class weights, legacy size_average/reduce, probability (float) or non-int64
labels, the class dim not last, softcapping c·tanh(logits/c) between lm_head and loss
(linear_cross_entropy only: cross_entropy on the capped logits is still matched).
"""
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.fx import Node

from .. import ops  # noqa: F401  (registers torch.ops.foak.*)
from ..engine import Candidate, Pattern, Reject
from ..kernels.common import TL_DTYPE
from ..ops.cross_entropy import REDUCTIONS
from ..nodes import canon, is_kind, value

LOSS_KINDS = ("cross_entropy", "nll_loss")


@dataclass
class _Loss:
    node: Node              # the cross_entropy / nll_loss call
    logits: Node            # whose rows are softmaxed (log_softmax's input for nll_loss)
    labels: Node
    ignore_index: int
    label_smoothing: float
    reduction: str
    nodes: list             # what the loss itself removes: [log_softmax, views,] the loss node
    variant: list


def _is_exact_upcast(src: torch.Tensor, out: torch.Tensor) -> bool:
    return out.dtype == src.dtype or (out.dtype == torch.float32 and src.dtype in TL_DTYPE)


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
    shape_only = ((n.op == "call_method" and n.target in ("view", "reshape", "contiguous"))
                  or (n.op == "call_function" and n.target is torch.reshape))
    if shape_only and src.dtype == out.dtype and src.shape[-1] == out.shape[-1]:
        return n.args[0]
    return None


def _softcapped(n) -> Optional[Node]:
    """z for `c * tanh(z / c)`, Gemma 2's final logit softcapping; else None."""
    op = canon(n)
    if op is None or op.kind != "mul":
        return None
    for t in op.args[:2]:
        if isinstance(t, Node) and ((t.op == "call_function" and t.target in (torch.tanh, F.tanh))
                                    or (t.op == "call_method" and t.target == "tanh")):
            inner = canon(t.args[0])
            if inner is not None and inner.kind in ("div", "mul") and isinstance(inner.args[0], Node):
                return inner.args[0]
    return None


def _from_linear(x) -> Optional[Node]:
    """The F.linear whose output x is, through `_producer` steps only; else None."""
    while x is not None and not is_kind(x, "linear"):
        x = _producer(x)
    return x


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
        raise Reject(f"logits of shape {tuple(xv.shape)} with labels {tuple(yv.shape)}: only "
                     "[tokens, vocab] with [tokens] (the class dim last)")
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
    if t.dtype not in TL_DTYPE:
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
        raise Reject(f"loss computed over {lv.dtype} logits without an fp32 upcast "
                     "(the fp32 kernel would round differently)")


def _call(target, args):
    """The fused op returns (loss, lse); the graph takes the loss."""
    def replace(g):
        call = g.call_function(target, args)
        return g.call_function(operator.getitem, (call, 0))
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

    def match(self, seed: Node) -> Optional[Candidate]:
        loss = _parse_loss(seed)
        if loss is None:
            return None
        chain, x = [], loss.logits
        while not is_kind(x, "linear"):
            src = _producer(x)
            if src is None:
                if _from_linear(_softcapped(x)) is not None:
                    raise Reject("final logit softcapping c·tanh(logits/c) between lm_head and loss is not fused")
                return None  # logits not from a linear: cross_entropy's business
            chain.insert(0, x)
            x = src
        _check_loss_dtype(loss)
        lin = canon(x)
        hidden, weight, bias = lin.arg(0, "input"), lin.arg(1, "weight"), lin.arg(2, "bias")
        hv, wv, ov = value(hidden), value(weight), value(x)
        _check_input(hv, "hidden states")
        if wv is None or ov is None or wv.dim() != 2 or wv.shape[0] != ov.shape[-1]:
            raise Reject("lm_head weight is not [vocab, hidden]")
        bv = value(bias) if bias is not None else None
        if bias is not None and (bv is None or bv.dim() != 1 or bv.dtype != wv.dtype):
            raise Reject("lm_head bias is not a [vocab] tensor of the weight's dtype")
        if not hv.dtype == wv.dtype == ov.dtype:
            raise Reject(f"lm_head gives {ov.dtype} from {hv.dtype} × {wv.dtype} (autocast?)")
        variant = ["F.linear" + (" + bias" if bias is not None else "")] + loss.variant
        if ov.dtype != value(loss.logits).dtype:
            variant.append(f"upcast from {ov.dtype}")
        args = (hidden, weight, bias, loss.labels, loss.ignore_index, loss.label_smoothing, loss.reduction,
                value(seed).dtype)
        return Candidate([x] + chain + loss.nodes, seed,
                         _call(torch.ops.foak.linear_cross_entropy.default, args), ", ".join(variant))
