"""LoRA siblings: fused LoRA layers that read the same input (q/k/v, gate/up) → one
torch.ops.foak.lora_linear_siblings call (ops/lora_siblings.py).

Runs on what the `lora` pattern left: `torch.ops.foak.lora_linear` calls. Siblings are grouped
when they share the input node, have dense bases of one dtype, the same output dtype, and no
LoRA dropout (each layer draws its own mask). Opt-in (`backend(patterns=[..., "lora_siblings"])`)
until its GPU benefit is measured.
"""
import operator
from typing import Optional

from torch.fx import Node

from .. import ops  # noqa: F401  (registers torch.ops.foak.*)
from ..engine import Candidate, Pattern, Reject
from ..nodes import module_of, value
import torch

_LORA = torch.ops.foak.lora_linear.default
_SIBLINGS = torch.ops.foak.lora_linear_siblings.default


def _lora_output(call: Node) -> Optional[Node]:
    """The getitem taking y from a lora_linear call, when that is the call's only use."""
    users = list(call.users)
    if len(users) == 1 and users[0].target is operator.getitem and users[0].args[1] == 0:
        return users[0]
    return None


def _calls(x: Node) -> list:
    """x's lora_linear users, in graph order."""
    calls = [u for u in x.users if u.op == "call_function" and u.target is _LORA and u.args and u.args[0] is x]
    if len(calls) < 2:
        return calls
    order = {n: i for i, n in enumerate(x.graph.nodes)}
    return sorted(calls, key=order.__getitem__)


_MODE_SWITCHES = {torch._C._set_grad_enabled, torch.amp.autocast_mode._enter_autocast,
                  torch.amp.autocast_mode._exit_autocast}


def _same_mode(calls: list) -> None:
    """The grouped call runs where the first sibling ran: no grad-mode or autocast switch may lie
    between the siblings."""
    first, last = calls[0], calls[-1]
    n = first.next
    while n is not last and n.op != "output":
        if n.op == "call_function" and n.target in _MODE_SWITCHES:
            raise Reject(f"`{n.name}` switches grad or autocast mode between the siblings")
        n = n.next


class LoraSiblingsPattern(Pattern):
    name = "lora_siblings"

    def seeds(self, graph):
        for n in graph.nodes:
            if len(_calls(n)) >= 2:
                yield n

    def match(self, x: Node) -> Optional[Candidate]:
        calls = _calls(x)
        if any(len(c.args) != 8 or c.kwargs or value(c.args[1]) is None for c in calls):
            raise Reject("a lora_linear call not in the form the lora pattern writes (keywords, unknown weight)")
        trained = [c.name for c in calls if c.args[2] is not None and getattr(value(c.args[2]), "requires_grad", False)]
        if trained:
            raise Reject(f"trained base bias on {trained}: the grouped op has no bias gradient")
        dropped = [c.name for c in calls if c.args[6] != 0.0]
        if dropped:
            raise Reject(f"LoRA dropout on {dropped}: each sibling draws its own mask, not grouped")
        outs = [_lora_output(c) for c in calls]
        if any(o is None for o in outs):
            raise Reject("a sibling's t or seed output is used: not grouped")
        kinds = {(value(c.args[1]).dtype, c.args[7]) for c in calls}
        if len(kinds) != 1:
            raise Reject(f"siblings differ in base dtype / output dtype {sorted(map(str, kinds))}")
        _same_mode(calls)
        args = (x, [c.args[1] for c in calls], [c.args[2] for c in calls], [c.args[3] for c in calls],
                [c.args[4] for c in calls], [float(c.args[5]) for c in calls], calls[0].args[7])
        names = [(module_of(o) or o.name).split(" ")[0].split(".")[-1] for o in outs]
        nodes = [n for c, o in zip(calls, outs) for n in (o, c)]

        def replace(g):
            return g.call_function(_SIBLINGS, args)
        return Candidate(nodes, outs, replace, f"{len(calls)} siblings ({', '.join(names)})")
