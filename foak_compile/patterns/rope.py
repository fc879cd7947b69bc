"""Rotary embedding: HF's `x·cos + rotate_half(x)·sin` → torch.ops.foak.rope (ops/rope.py).

What Dynamo records for apply_rotary_pos_emb (per tensor, cos/sin unsqueezed once for both):

    cos_u = cos.unsqueeze(1); sin_u = sin.unsqueeze(1)
    a = q * cos_u
    x1 = q[..., :h]; x2 = q[..., h:]; r = cat((-x2, x1), dim=-1)
    q_embed = a + r * sin_u                     (and the same for k)

Each application is anchored at its `add`. When another application uses the same cos/sin
(the k of the same attention layer) the two become one `foak.rope(q, k, cos, sin, dim)`;
otherwise the lone one becomes `foak.rope_one`. cos/sin enter the op *before* the unsqueeze:
[B or 1, S, D] per token, so packed or left-padded position_ids are just other values.

Near-misses: interleaved (GPT-J) pairs, rotate_half over another split or direction,
partial rotary (a rotated slice concatenated with a pass-through part), cos/sin that are not
`unsqueeze(1|2)` of a [B or 1, S, D] tensor, dtypes or shapes the kernel does not take.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import Node

from .. import ops  # noqa: F401  (registers torch.ops.foak.*)
from ..engine import Candidate, Pattern, Reject, outside_users
from ..ops import SUPPORTED_DTYPES
from ..nodes import canon, is_kind, same_shape, same_size, value

# ops that move data without arithmetic: how a rotation is built from x
_MOVES = {"getitem", "neg", "cat", "stack"}
_MOVE_METHODS = {"flatten", "view", "reshape", "roll", "contiguous", "chunk", "split", "narrow"}
_MOVE_FUNCTIONS = {torch.flatten, torch.roll, torch.chunk, torch.split, torch.narrow, torch.reshape}


@dataclass
class _Application:
    x: Node  # the rotated tensor (q or k)
    cos: Node  # [B or 1, S, D], before the unsqueeze
    sin: Node
    dim: int  # unsqueeze_dim: 1 → x is [B, H, S, D]; 2 → [B, S, H, D]
    unsqueezes: list  # the cos/sin unsqueeze nodes this application uses
    nodes: list  # its own nodes: products, rotate_half, the add
    out: Node  # the add


def _moves(n: Node) -> bool:
    op = canon(n)
    if op is not None:
        return op.kind in _MOVES
    return (n.op == "call_method" and n.target in _MOVE_METHODS) or (
        n.op == "call_function" and n.target in _MOVE_FUNCTIONS
    )


def _kind(n: Node) -> str:
    op = canon(n)
    return op.kind if op is not None else getattr(n.target, "__name__", str(n.target))


def _path_kinds(r, x: Node, depth: int = 5) -> Optional[set]:
    """The op kinds on the ways `r` is built from x by moving data (slices, negation, cat/stack,
    reshapes) within `depth` steps; None if it is not."""
    if not isinstance(r, Node) or r is x or not _moves(r):
        return None
    kinds = None
    for a in r.all_input_nodes:
        sub = set() if a is x else (_path_kinds(a, x, depth - 1) if depth > 1 else None)
        if sub is not None:
            kinds = (kinds or set()) | sub | {_kind(r)}
    return kinds


def _built_from(r, x: Node) -> bool:
    """Whether `r` is a rotation-like rearrangement of x: moved data with a sign flip or a rejoin."""
    kinds = _path_kinds(r, x)
    return kinds is not None and bool(kinds & {"neg", "cat", "stack", "roll"})


def _last_dim_slice(n) -> Optional[tuple]:
    """(base, start, stop, step) for `base[..., a:b:c]` (or every leading dim sliced whole)."""
    op = canon(n)
    if op is None or op.kind != "getitem":
        return None
    base, idx = op.args[0], op.args[1]
    bv = value(base)
    if bv is None or not isinstance(idx, tuple) or not idx or not isinstance(idx[-1], slice):
        return None
    lead = idx[:-1]
    if not (lead == (Ellipsis,) or (len(idx) == bv.dim() and all(s == slice(None) for s in lead))):
        return None
    size = bv.shape[-1]
    if not isinstance(size, int):
        return None
    sl = idx[-1]
    if any(not (v is None or isinstance(v, int)) for v in (sl.start, sl.stop, sl.step)):
        return None
    start, stop, step = sl.indices(size)
    return base, start, stop, step


def _interleaved(r: Node, x: Node, depth: int = 5) -> bool:
    """Pieces of x stacked along the last dim or strided by 2: GPT-J's rotate_every_two.
    (Stacked along dim -2 and flattened back, pieces are concatenated: see _joined.)"""
    if not isinstance(r, Node) or r is x or not _moves(r):
        return False
    sl, op = _last_dim_slice(r), canon(r)
    if (op is not None and op.kind == "stack" and not _stacked_at(r, -2)) or (sl is not None and sl[3] == 2):
        return True
    return depth > 1 and any(_interleaved(a, x, depth - 1) for a in r.all_input_nodes)


def _stacked_at(n: Node, dim_from_end: int) -> bool:
    """Whether the stack `n` inserts its new dim at `dim_from_end` (negative) of its result."""
    op, v = canon(n), value(n)
    dim = op.arg(1, "dim", 0)
    return v is not None and isinstance(dim, int) and dim in (dim_from_end, v.dim() + dim_from_end)


def _target_name(n: Node) -> str:
    return n.target if n.op == "call_method" else getattr(n.target, "__name__", "")


def _dim_is_last(n: Node, i: int, default: int = 0) -> bool:
    """Whether the `dim` argument (position i) of a chunk/split of n.args[0] is its last dim."""
    dim = n.args[i] if len(n.args) > i else n.kwargs.get("dim", default)
    xv = value(n.args[0])
    return xv is not None and isinstance(dim, int) and dim in (-1, xv.dim() - 1)


def _piece(n, x: Node) -> Optional[tuple]:
    """(start, stop, nodes) when n is a contiguous last-dim piece of x: `x[..., a:b]`, or an
    item of `x.chunk(2, -1)` or `x.split(size or sizes, -1)` (method or function); else None."""
    sl = _last_dim_slice(n)
    if sl is not None:
        return (sl[1], sl[2], [n]) if sl[0] is x and sl[3] == 1 else None
    op = canon(n)
    if op is None or op.kind != "getitem" or not isinstance(op.args[0], Node) or not isinstance(op.args[1], int):
        return None
    parent, i = op.args[0], op.args[1]
    name = _target_name(parent)
    if (
        parent.op not in ("call_method", "call_function")
        or name not in ("chunk", "split")
        or not parent.args
        or parent.args[0] is not x
        or not _dim_is_last(parent, 2)
    ):
        return None
    d = value(x).shape[-1]
    size = (
        parent.args[1]
        if len(parent.args) > 1
        else parent.kwargs.get("chunks", parent.kwargs.get("split_size_or_sections", parent.kwargs.get("split_size")))
    )
    if name == "chunk":
        if size != 2:
            return None
        sizes = [-(-d // 2), d // 2]
    elif isinstance(size, int) and size > 0:
        sizes = [min(size, d - a) for a in range(0, d, size)]
    elif isinstance(size, (list, tuple)) and all(isinstance(v, int) for v in size):
        sizes = list(size)
    else:
        return None
    if not 0 <= i < len(sizes):
        return None
    start = sum(sizes[:i])
    return start, start + sizes[i], [n, parent]


def _joined(r: Node, x: Node) -> Optional[tuple]:
    """(parts, nodes) when r joins pieces along the last dim: `cat(parts, -1)`, or
    `stack(parts, -2)` flattened (or reshaped) back to x's shape, which is the same values."""
    op = canon(r)
    if op is not None and op.kind == "cat":
        dim = op.arg(1, "dim", 0)
        return (op.arg(0, "tensors"), [r]) if dim in (-1, value(r).dim() - 1) else None
    if _target_name(r) not in ("flatten", "reshape", "view") or not r.args or not is_kind(r.args[0], "stack"):
        return None
    st = r.args[0]
    rv, sv, xv = value(r), value(st), value(x)
    if not _stacked_at(st, -2) or None in (rv, sv, xv) or sv.dim() != xv.dim() + 1:
        return None
    if not same_shape(rv.shape, xv.shape) or not same_shape(sv.shape[:-2], xv.shape[:-1]):
        return None  # flattened into another shape than x's
    return canon(st).arg(0, "tensors"), [st, r]


def _check_rotate_half(r: Node, x: Node, d: int) -> list:
    """The nodes of `cat((-x[..., h:], x[..., :h]), dim=-1)` with h = d/2 (halves also from
    chunk/split, the join also a stack at -2 flattened back), or Reject why not."""
    joined = _joined(r, x)
    if joined is None and _interleaved(r, x):
        raise Reject(
            "interleaved (GPT-J style) rotation of pairs (x[..., ::2], x[..., 1::2]); "
            "only HF rotate_half over the two halves is supported"
        )
    if joined is None:
        raise Reject(f"x·cos + f(x)·sin where f is `{r.name}`, not HF rotate_half")
    parts, join_nodes = joined
    if len(parts) != 2:
        raise Reject(f"rotate_half joins {len(parts)} parts along the last dim, not 2")
    neg, lo = canon(parts[0]), _piece(parts[1], x)
    hi = _piece(neg.args[0], x) if neg is not None and neg.kind == "neg" else None
    if hi is None or lo is None:
        raise Reject(
            "rotate_half is not cat((-x[..., h:], x[..., :h]), -1) "
            "(other sign or order: the rotation would run the other way)"
        )
    if d % 2 or (lo[0], lo[1], hi[0], hi[1]) != (0, d // 2, d // 2, d):
        raise Reject(
            f"rotate_half splits head_dim {d} into [{lo[0]}:{lo[1]}] and [{hi[0]}:{hi[1]}], not at the middle {d // 2}"
        )
    return list(dict.fromkeys(lo[2] + hi[2] + [parts[0]] + join_nodes))


def _partial_rotary(x: Node, out: Node) -> Optional[str]:
    sl = _last_dim_slice(x)
    if sl is None or (sl[1], sl[2]) == (0, value(sl[0]).shape[-1]):
        return None
    rejoined = any(canon(u) is not None and canon(u).kind == "cat" for u in out.users)
    if not rejoined:
        return None  # a slice of a fused projection, rotated whole: fine
    return (
        f"partial rotary: rotates x[..., {sl[1]}:{sl[2]}] of a head_dim {value(sl[0]).shape[-1]} tensor "
        "and concatenates the pass-through part (rotary_dim < head_dim); not supported"
    )


def _as_unsqueeze(n) -> Optional[tuple]:
    """(base, dim) for `base.unsqueeze(dim)` / `torch.unsqueeze(base, dim)`, or an index that
    only inserts one new dim (`base[:, None]`, `base[:, :, None, :]`, `base[..., None, :]`)."""
    op = canon(n)
    if op is None:
        return None
    if op.kind == "unsqueeze":
        return op.arg(0, "input"), op.arg(1, "dim")
    if op.kind != "getitem" or not isinstance(op.args[1], tuple) or value(n) is None:
        return None
    idx = op.args[1]
    if (
        idx.count(None) != 1
        or idx.count(Ellipsis) > 1
        or any(i is not None and i is not Ellipsis and i != slice(None) for i in idx)
    ):
        return None
    k = idx.index(None)
    if Ellipsis in idx and idx.index(Ellipsis) < k:  # counted from the end
        return op.args[0], value(n).dim() - (len(idx) - k)
    return op.args[0], k


def _unsqueezed(n, what: str) -> tuple:
    """(base, dim, node) for an unsqueeze (see _as_unsqueeze) of a [B or 1, S, D] base at dim 1 or 2."""
    found = _as_unsqueeze(n)
    if found is None:
        raise Reject(f"{what} is not `{what}.unsqueeze(1|2)` of a per-token [B, S, D] tensor")
    base, dim = found
    bv = value(base)
    if bv is None or bv.dim() != 3 or not isinstance(dim, int) or dim % 4 not in (1, 2):
        raise Reject(
            f"{what} is unsqueezed at dim {dim} from shape "
            f"{tuple(bv.shape) if bv is not None else '?'}; needs [B or 1, S, D] at dim 1 or 2"
        )
    return base, dim % 4, n


def _check_values(x: Node, cos: Node, sin: Node, dim: int, out: Node) -> None:
    xv, cv, sv, ov = value(x), value(cos), value(sin), value(out)
    if xv is None or xv.dim() != 4:
        raise Reject(f"rotated tensor has shape {tuple(xv.shape) if xv is not None else '?'}, not 4-D")
    if xv.device.type not in ("cuda", "cpu") or cv.device != xv.device or sv.device != xv.device:
        raise Reject(f"devices {xv.device}/{cv.device}/{sv.device} unsupported")
    seq = xv.shape[2] if dim == 1 else xv.shape[1]
    if (
        not same_shape(cv.shape, sv.shape)
        or not same_size(cv.shape[2], xv.shape[3])
        or not same_size(cv.shape[1], seq)
        or not (same_size(cv.shape[0], 1) or same_size(cv.shape[0], xv.shape[0]))
    ):
        raise Reject(
            f"cos/sin {tuple(cv.shape)} are not per-token [B or 1, S, D] for x {tuple(xv.shape)} "
            f"with unsqueeze_dim {dim}"
        )
    if not same_shape(ov.shape, xv.shape):
        raise Reject(f"result {tuple(ov.shape)} is broadcast beyond x {tuple(xv.shape)}")
    if cv.dtype != sv.dtype:
        raise Reject(f"cos is {cv.dtype} but sin is {sv.dtype}: products round to different dtypes")
    for t, what in ((xv, "x"), (cv, "cos/sin"), (ov, "result")):
        if t.dtype not in SUPPORTED_DTYPES:
            raise Reject(f"{what} dtype {t.dtype} unsupported")
    if ov.dtype != torch.promote_types(xv.dtype, cv.dtype):
        raise Reject(f"result dtype {ov.dtype} is not the promotion of {xv.dtype} and {cv.dtype}")
    if cv.requires_grad or sv.requires_grad:
        raise Reject("cos/sin require grad (learned rotary); the op has no cos/sin gradient")


def _same_tokens(a, b) -> bool:
    """Whether two applications rotate the same [B, S] tokens with the same head_dim: one launch walks
    q's tokens for both (a k of another batch size broadcasts in eager against a batch-1 cos/sin)."""
    av, bv = value(a.x).shape, value(b.x).shape
    seq = 2 if a.dim == 1 else 1
    return all(same_size(av[i], bv[i]) for i in (0, seq, 3))


def _products(out: Node):
    """(x·cos, r·sin) operand pairs of the add, in either order, where r is built from x."""
    op = canon(out)
    # an add: the partner search also reaches here from a mul's user, which may be a sub
    if (
        op is None
        or op.kind != "add"
        or len(op.args) < 2
        or any(canon(a) is None or canon(a).kind != "mul" for a in op.args[:2])
    ):
        return None
    for mc_node, ms_node in ((op.args[0], op.args[1]), (op.args[1], op.args[0])):
        mc, msin = canon(mc_node), canon(ms_node)
        for x, cu in ((mc.args[0], mc.args[1]), (mc.args[1], mc.args[0])):
            for r, su in ((msin.args[0], msin.args[1]), (msin.args[1], msin.args[0])):
                if isinstance(x, Node) and _built_from(r, x):
                    return mc_node, ms_node, x, cu, r, su
    return None


def _application(out: Node) -> Optional[_Application]:
    """The rotation whose result is `out`; None if `out` is no rotation at all."""
    found = _products(out)
    if found is None:
        return None
    mc, ms, x, cu, r, su = found
    why = _partial_rotary(x, out)
    if why:
        raise Reject(why)
    xv = value(x)
    d = xv.shape[-1] if xv is not None else None
    if not isinstance(d, int):
        raise Reject("head_dim is symbolic")
    rot = _check_rotate_half(r, x, d)
    cos, cdim, cnode = _unsqueezed(cu, "cos")
    sin, sdim, snode = _unsqueezed(su, "sin")
    if cdim != sdim:
        raise Reject(f"cos is unsqueezed at dim {cdim} but sin at {sdim}")
    _check_values(x, cos, sin, cdim, out)
    return _Application(x, cos, sin, cdim, [cnode, snode], [mc] + rot + [ms, out], out)


def _order(n: Node) -> dict:
    return {m: i for i, m in enumerate(n.graph.nodes)}


class RopePattern(Pattern):
    name = "rope"

    def seeds(self, graph):
        for n in graph.nodes:
            op = canon(n)
            if op is not None and op.kind == "add":
                yield n

    def match(self, seed: Node) -> Optional[Candidate]:
        app = _application(seed)
        if app is None:
            return None
        partner = self._partner(app)
        if partner is None:
            nodes = app.nodes + self._own_unsqueezes([app])
            call = (app.x, app.cos, app.sin, app.dim)
            return Candidate(
                nodes,
                app.out,
                lambda g: g.call_function(torch.ops.foak.rope_one.default, call),
                f"single, unsqueeze_dim={app.dim}",
            )
        order = _order(seed)
        first, second = sorted((app, partner), key=lambda a: order[a.out])
        nodes = first.nodes + second.nodes + self._own_unsqueezes([first, second])
        call = (first.x, second.x, first.cos, first.sin, first.dim)
        return Candidate(
            nodes,
            [first.out, second.out],
            lambda g: g.call_function(torch.ops.foak.rope.default, call),
            f"q+k, unsqueeze_dim={first.dim}",
        )

    @staticmethod
    def _own_unsqueezes(apps: list) -> list:
        """The cos/sin unsqueezes used only by these applications (the op takes cos/sin before them)."""
        inside = {n for a in apps for n in a.nodes}
        uns = dict.fromkeys(u for a in apps for u in a.unsqueezes)
        return [u for u in uns if set(u.users) <= inside]

    @staticmethod
    def _partner(app: _Application) -> Optional[_Application]:
        """Another clean application on the same cos/sin that one launch can also rotate."""
        if outside_users(app.nodes, [app.out]):
            return None  # the engine will report this one; don't drag a good partner down with it
        order = _order(app.out)
        unsqueezes = [u for u in app.cos.users if _as_unsqueeze(u) is not None]
        for u in unsqueezes:
            for m in u.users:
                if m in app.nodes or len(m.users) != 1:
                    continue
                try:
                    other = _application(next(iter(m.users)))
                except Reject:
                    continue
                if (
                    other is None
                    or other.out is app.out
                    or other.x is app.x
                    or (other.cos, other.sin, other.dim) != (app.cos, app.sin, app.dim)
                    or not _same_tokens(app, other)
                    or outside_users(other.nodes, [other.out])
                ):
                    continue
                first_out = min(order[app.out], order[other.out])
                if max(order[app.x], order[other.x], order[app.cos], order[app.sin]) < first_out:
                    return other
        return None
