"""The matching engine: finds each pattern's candidates in a Dynamo graph, checks that a
candidate is exactly the pattern, and splices the fused op in its place.

A pattern only describes its shape (`Pattern.match`); the engine owns what is common to all
of them: the rule that no intermediate may be used outside the match, the graph surgery,
failure containment, and recording matches and near-misses in the report.
"""

import logging
import operator
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

from torch.fx import Graph, GraphModule, Node

from .nodes import is_in_place, is_mode_switch, module_of, source_of
from .report import GraphReport, Match, NearMiss

log = logging.getLogger("foak_compile")


class Reject(Exception):
    """Raised by a pattern for a candidate that is not exactly the pattern: a near-miss."""


@dataclass
class Candidate:
    nodes: list[Node]  # every node the replacement removes, `output` included
    # whose uses the replacement takes over; a list when the fused op returns a tuple
    # (output[i]'s uses go to new[i])
    output: Union[Node, list[Node]]
    replace: Callable[[Graph], Node]  # inserts the fused call (before the first output) and returns it
    variant: str = ""  # which syntactic variant matched, for the report

    def outputs(self) -> list[Node]:
        return list(self.output) if isinstance(self.output, list) else [self.output]


class Pattern:
    """One fusion: `seeds` proposes anchors, `match` checks one and builds its Candidate."""

    name: str = ""
    # appended to the near-miss when an intermediate is blocked by being a graph output: how to get the fusion
    graph_output_hint: str = ""

    def seeds(self, graph: Graph) -> Iterable[Node]:
        """Nodes that may anchor this pattern, in graph order."""
        raise NotImplementedError

    def match(self, seed: Node) -> Optional[Candidate]:
        """A Candidate, None if `seed` is no candidate at all, or raise Reject(reason)."""
        raise NotImplementedError


def outside_users(nodes: list[Node], outputs: list[Node]) -> Optional[str]:
    """Why `nodes` cannot be removed (an intermediate used outside them), or None."""
    inside, outs = set(nodes), set(outputs)
    for n in nodes:
        if n in outs:
            continue
        outside = [u for u in n.users if u not in inside]
        if outside:
            return (
                f"intermediate `{n.name}` has {len(n.users)} users "
                f"({len(outside)} outside the pattern: {', '.join(u.name for u in outside)})"
            )
    return None


def _outside_users(cand: Candidate, pattern: Pattern) -> Optional[str]:
    reason = outside_users(cand.nodes, cand.outputs())
    outs = set(cand.outputs())
    if (
        reason
        and pattern.graph_output_hint
        and any(u.op == "output" for n in cand.nodes if n not in outs for u in n.users)
    ):
        reason += f"; {pattern.graph_output_hint}"
    return reason


def _span_problem(cand: Candidate, order: dict[Node, int]) -> Optional[str]:
    """Why the fused op, which runs at one place, could compute something else than the nodes it
    replaces, which ran across a span of the graph: an in-place op inside that span (an input may
    change along it; any in-place op counts, there is no alias analysis) or a grad-mode / autocast
    switch (the nodes on either side ran in different modes). Models' patterns have neither."""
    if any(n not in order for n in cand.nodes):
        order.update((n, i) for i, n in enumerate(cand.nodes[0].graph.nodes))
    inside = set(cand.nodes)
    first = min(cand.nodes, key=order.__getitem__)
    last = max(cand.nodes, key=order.__getitem__)
    n = first.next
    while n is not last and first is not last and n.op != "output":
        if n not in inside and is_in_place(n):
            return f"`{n.name}` writes a tensor in place between the pattern's first and last node"
        if is_mode_switch(n):
            return f"`{n.name}` switches grad or autocast mode between the pattern's first and last node"
        n = n.next
    return None


def _where(node: Node) -> dict[str, str]:
    return {"source": source_of(node), "module": module_of(node)}


_PROVENANCE = ("stack_trace", "nn_module_stack", "source_fn_stack")


def _splice(gm: GraphModule, cand: Candidate) -> Node:
    graph = gm.graph
    outs = cand.outputs()
    order = {n: i for i, n in enumerate(graph.nodes)}
    before = set(graph.nodes)
    try:
        with graph.inserting_before(min(outs, key=order.__getitem__)):
            new = cand.replace(graph)
            takers = _unpack(graph, new, outs) if isinstance(cand.output, list) else [new]
        _check_order(graph, before)
        _check_reads(graph, before, set(cand.nodes))
    except Exception:
        for n in reversed([n for n in graph.nodes if n not in before]):
            graph.erase_node(n)
        raise
    for taker, out in zip(takers, outs):
        taker.meta.update({k: v for k, v in out.meta.items() if k not in taker.meta})
        out.replace_all_uses_with(taker)
    # every inserted node (an op call behind its getitem, casts) keeps the user's source line and module,
    # so a later pass that seeds on it reports where it sits
    provenance = {k: outs[0].meta[k] for k in _PROVENANCE if k in outs[0].meta}
    for n in graph.nodes:
        if n not in before:
            for k, v in provenance.items():
                n.meta.setdefault(k, v)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(cand.nodes, key=order.__getitem__, reverse=True):
        graph.erase_node(n)
    return new


def _unpack(graph: Graph, new: Node, outs: list[Node]) -> list[Node]:
    """getitem nodes for a tuple-returning replacement; its meta holds the tuple of values."""
    vals = tuple(o.meta.get("example_value", o.meta.get("val")) for o in outs)
    new.meta.update({k: v for k, v in outs[0].meta.items() if k not in new.meta and k not in ("example_value", "val")})
    new.meta.setdefault("example_value", vals)
    return [graph.call_function(operator.getitem, (new, i)) for i in range(len(outs))]


def _check_reads(graph: Graph, before: set[Node], doomed: set[Node]) -> None:
    """The replacement may not read a node the match removes (e.g. a norm's output taken as its own
    weight): found after the splice, the graph would be left half rewritten."""
    for n in graph.nodes:
        if n not in before:
            read = [a.name for a in n.all_input_nodes if a in doomed]
            if read:
                raise ValueError(f"{n.name} would read {', '.join(read)}, which the rewrite removes")


def _check_order(graph: Graph, before: set[Node]) -> None:
    """Inserted before the first output, a multi-output call may precede one of its inputs."""
    seen: set[Node] = set()
    for n in graph.nodes:
        if n not in before:
            late = [a.name for a in n.all_input_nodes if a not in seen]
            if late:
                raise ValueError(f"{n.name} would use {', '.join(late)} before it is computed")
        seen.add(n)


def run_patterns(gm: GraphModule, patterns: Iterable[Pattern], report: GraphReport) -> None:
    """Each pattern in turn over `gm`: splice every clean match, report matches and near-misses."""
    for pattern in patterns:
        seeds = list(pattern.seeds(gm.graph))
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        removed: set[Node] = set()
        for seed in seeds:
            if seed in removed:
                continue
            try:
                cand = pattern.match(seed)
            except Reject as why:
                report.near_misses.append(NearMiss(pattern.name, str(why), nodes=[seed.name], **_where(seed)))
                continue
            if cand is None:
                continue
            reason = _outside_users(cand, pattern) or _span_problem(cand, order)
            if reason:
                report.near_misses.append(
                    NearMiss(pattern.name, reason, nodes=[n.name for n in cand.nodes], **_where(cand.nodes[0]))
                )
                continue
            where, names = _where(cand.nodes[0]), [n.name for n in cand.nodes]
            try:
                new = _splice(gm, cand)
            except Exception as err:  # contain it: this match stays as the user wrote it
                log.warning("foak: %s rewrite failed at %s: %s", pattern.name, where["source"], err)
                report.near_misses.append(NearMiss(pattern.name, f"rewrite failed: {err!r}", nodes=names, **where))
                continue
            removed.update(cand.nodes)
            report.matches.append(Match(pattern.name, variant=cand.variant, nodes=names, replacement=new.name, **where))
    gm.graph.lint()
    gm.recompile()
