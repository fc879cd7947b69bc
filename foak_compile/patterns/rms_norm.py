"""RMSNorm: `w * (x·rsqrt(mean(x², -1, keepdim) + eps))` in the spellings real models use,
and `F.rms_norm` / `nn.RMSNorm` → torch.ops.foak.rms_norm (ops/rms_norm.py).

Accepted variants: fp32 upcast of the input and cast back (before or after the weight
multiply), `pow(2)` or `x*x`, `rsqrt(v)` or `/ sqrt(v)`, weight on either side, a weight
that is itself computed (Gemma's `1 + w.float()`), no weight. Anything else is left alone.
"""

from typing import Optional

import torch
from torch.fx import Node

from .. import ops  # noqa: F401  (registers torch.ops.foak.*)
from ..engine import Candidate, Pattern, Reject
from ..ops import SUPPORTED_DTYPES
from ..nodes import canon, is_kind, item_float, other_operand, sole_user, value


def _is_last_dim(dim, ndim: int) -> bool:
    if isinstance(dim, (list, tuple)):
        if len(dim) != 1:
            return False
        dim = dim[0]
    return isinstance(dim, int) and dim in (-1, ndim - 1)


def _squared(n: Node) -> Optional[Node]:
    """x for `x.pow(2)`, `x ** 2` or `x * x`."""
    op = canon(n)
    if op is None:
        return None
    if op.kind == "pow" and op.args[1] in (2, 2.0):
        return op.args[0]
    if op.kind == "mul" and op.args[0] is op.args[1]:
        return op.args[0]
    return None


def _same_value(a, b) -> bool:
    """`a is b`, or two casts of one tensor to one dtype (`x.float()` written twice)."""
    if a is b:
        return True
    ca, cb = canon(a), canon(b)
    return (
        ca is not None
        and cb is not None
        and ca.kind == cb.kind == "cast"
        and ca.args[0] is cb.args[0]
        and ca.kwargs["dtype"] == cb.kwargs["dtype"]
    )


def _mean_centred(n: Node) -> bool:
    op = canon(n)
    if op is not None and op.kind == "cast":
        op = canon(op.args[0])
    if op is None or op.kind != "sub" or not is_kind(op.args[1], "mean"):
        return False
    return canon(op.args[1]).args[0] is op.args[0]


def _weight_ok(w, like: torch.Tensor) -> bool:
    wv = value(w)
    return (
        wv is not None
        and wv.dim() == 1
        and wv.shape[0] == like.shape[-1]
        and wv.dtype in SUPPORTED_DTYPES
        and wv.device == like.device
    )


def _check_input(xv: torch.Tensor) -> None:
    if xv.device.type not in ("cuda", "cpu"):
        raise Reject(f"device {xv.device.type} unsupported")
    if not isinstance(xv.shape[-1], int):
        raise Reject("hidden size is symbolic")


def _eps(eps) -> tuple:
    """(eps, nodes): a number, or the SymFloat and the `.item()` node that reads it.

    Under dynamic=True Dynamo does not specialise float attributes such as HF's
    `variance_epsilon`: it passes them as 0-d tensors and reads them with `.item()`. The op
    takes a float, so the replacement specialises on the value (`float()` guards on it, which
    is what torch does for every float by default); the `.item()` goes with the match."""
    if not isinstance(eps, Node):
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise Reject(f"eps is a {type(eps).__name__}, not a constant")
        return eps, []
    v = item_float(eps)
    if v is not None:
        return v, [eps]
    raise Reject("eps is a tensor")


def _call(x, weight, eps, mid, out):
    # float() only here, when the match is spliced in: a symbolic eps is guarded on only then
    return lambda g: g.call_function(torch.ops.foak.rms_norm.default, (x, weight, float(eps), mid, out))


class RMSNormPattern(Pattern):
    name = "rms_norm"

    def seeds(self, graph):
        for n in graph.nodes:
            op = canon(n)
            if op is not None and op.kind in ("rsqrt", "sqrt", "rms_norm", "layer_norm"):
                yield n

    def match(self, seed: Node) -> Optional[Candidate]:
        kind = canon(seed).kind
        if kind == "layer_norm":
            raise Reject("LayerNorm subtracts the mean: not an RMSNorm")
        if kind == "rms_norm":
            return self._functional(seed)
        return self._decomposed(seed, kind)

    def _functional(self, seed: Node) -> Candidate:
        op = canon(seed)
        x, shape, weight, eps = op.arg(0, "input"), op.arg(1, "normalized_shape"), op.arg(2, "weight"), op.arg(3, "eps")
        xv = value(x)
        _check_input(xv)
        if len(shape) != 1:
            raise Reject(f"normalizes over {len(shape)} trailing dims; only the last is supported")
        if xv.dtype not in SUPPORTED_DTYPES:
            raise Reject(f"dtype {xv.dtype} unsupported")
        eps, eps_nodes = _eps(torch.finfo(torch.float32).eps if eps is None else eps)  # None: torch's default
        if weight is not None and not _weight_ok(weight, xv):
            raise Reject("weight is not a supported [hidden] tensor")
        nodes = [seed] + [n for n in eps_nodes if len(n.users) == 1]
        return Candidate(nodes, seed, _call(x, weight, eps, None, value(seed).dtype), "F.rms_norm")

    def _decomposed(self, seed: Node, kind: str) -> Optional[Candidate]:
        add = canon(seed.args[0])
        if add is None or add.kind != "add":
            return None
        a, b = add.args[0], add.args[1]
        mean_node, eps = (a, b) if is_kind(a, "mean") else (b, a)
        mean = canon(mean_node)
        if mean is None or mean.kind != "mean" or _squared(mean.args[0]) is None:
            return None  # rsqrt of something that is not a mean of squares: not a candidate
        eps, eps_nodes = _eps(eps)
        sq_node = mean.args[0]
        xf = _squared(sq_node)
        xv = value(xf)
        _check_input(xv)
        dim, keepdim = mean.arg(1, "dim"), mean.arg(2, "keepdim", False)
        if not _is_last_dim(dim, xv.dim()):
            raise Reject(f"mean over dim {dim}, not the last dim")
        if not keepdim:
            raise Reject("mean without keepdim=True")
        if mean.kwargs.get("dtype") is not None:
            raise Reject("mean with a dtype argument")
        if _mean_centred(xf):
            raise Reject("input is mean-centred (LayerNorm), not an RMSNorm")
        if xv.dtype != torch.float32:
            if xv.dtype in SUPPORTED_DTYPES:
                raise Reject(
                    f"statistics computed in {xv.dtype} without an fp32 upcast "
                    "(the fp32 kernel would round differently)"
                )
            raise Reject(f"dtype {xv.dtype} unsupported")

        norm = self._normalising_user(seed, kind, xf)
        nodes = [sq_node, mean_node, seed.args[0], seed, norm]
        variant = ["x*x" if is_kind(sq_node, "mul") else "pow(2)", kind]

        # The fp32 upcast (one node, or one per use) joins the match when nothing else uses it.
        x = xf
        upcasts = list(dict.fromkeys([xf, other_operand(canon(norm), seed) if kind == "rsqrt" else norm.args[0]]))
        up = canon(xf)
        if (
            up is not None
            and up.kind == "cast"
            and value(up.args[0]).dtype in SUPPORTED_DTYPES
            and all(set(u.users) <= {sq_node, norm} for u in upcasts)
        ):
            x = up.args[0]
            nodes[:0] = upcasts
            variant.append(f"upcast from {value(x).dtype}")
        elif len(upcasts) > 1:
            raise Reject("reduces and normalises two separate upcasts that have other users")

        out, mid, weight = self._absorb_tail(norm, nodes, variant)
        nodes += [n for n in eps_nodes if len(n.users) == 1]  # an `.item()` eps read for this norm alone
        return Candidate(nodes, out, _call(x, weight, eps, mid, value(out).dtype), ", ".join(variant))

    @staticmethod
    def _normalising_user(seed: Node, kind: str, xf: Node) -> Node:
        want = "mul" if kind == "rsqrt" else "div"
        for u in seed.users:
            op = canon(u)
            if op is None or op.kind != want:
                continue
            if (want == "mul" and _same_value(other_operand(op, seed), xf)) or (
                want == "div" and op.args[1] is seed and _same_value(op.args[0], xf)
            ):
                return u
        raise Reject(f"the {kind} does not normalise the tensor whose mean square it took")

    @staticmethod
    def _absorb_tail(norm: Node, nodes: list, variant: list):
        """Walk `[cast] [* weight] [cast]` after the normalisation while each step has one user."""
        cur, mid, weight = norm, None, None
        nxt = sole_user(cur)
        op = canon(nxt)
        if op is not None and op.kind == "cast" and op.kwargs["dtype"] in SUPPORTED_DTYPES:
            cur, mid = nxt, op.kwargs["dtype"]
            nodes.append(cur)
            nxt = sole_user(cur)
            op = canon(nxt)
        if (
            op is not None
            and op.kind == "mul"
            and _weight_ok(other_operand(op, cur), value(cur))
            and value(nxt).shape == value(cur).shape
        ):
            weight = other_operand(op, cur)
            variant.append("weight after cast" if mid is not None else "weight in fp32")
            cur = nxt
            nodes.append(cur)
            nxt = sole_user(cur)
            op = canon(nxt)
            # A trailing cast is exact to absorb only when the product was rounded to fp32.
            if (
                op is not None
                and op.kind == "cast"
                and op.kwargs["dtype"] in SUPPORTED_DTYPES
                and value(cur).dtype == torch.float32
            ):
                cur = nxt
                nodes.append(cur)
                variant.append("cast back")
        else:
            mid = None  # a lone cast is the output dtype, not an intermediate rounding
        if mid == torch.float32:
            mid = None
        return cur, mid, weight
