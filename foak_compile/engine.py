"""The matching engine: finds each pattern's candidates in a Dynamo graph, checks that a
candidate is exactly the pattern, and splices the fused op in its place.

A pattern only describes its shape (`Pattern.match`); the engine owns what is common to all
of them: the rule that no intermediate may be used outside the match, the graph surgery,
failure containment, and recording matches and near-misses in the report.
"""
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from torch.fx import Graph, GraphModule, Node

from .nodes import module_of, source_of
from .report import GraphReport, Match, NearMiss

log = logging.getLogger("foak_compile")


class Reject(Exception):
    """Raised by a pattern for a candidate that is not exactly the pattern: a near-miss."""


@dataclass
class Candidate:
    nodes: list[Node]           # every node the replacement removes, `output` included
    output: Node                # whose uses the replacement takes over
    replace: Callable[[Graph], Node]  # inserts the fused call (before `output`) and returns it
    variant: str = ""           # which syntactic variant matched, for the report


class Pattern:
    name: str = ""

    def seeds(self, graph: Graph) -> Iterable[Node]:
        """Nodes that may anchor this pattern, in graph order."""
        raise NotImplementedError

    def match(self, seed: Node) -> Optional[Candidate]:
        """A Candidate, None if `seed` is no candidate at all, or raise Reject(reason)."""
        raise NotImplementedError


def _outside_users(cand: Candidate) -> Optional[str]:
    inside = set(cand.nodes)
    for n in cand.nodes:
        if n is cand.output:
            continue
        outside = [u for u in n.users if u not in inside]
        if outside:
            return (f"intermediate `{n.name}` has {len(n.users)} users "
                    f"({len(outside)} outside the pattern: {', '.join(u.name for u in outside)})")
    return None


def _where(node: Node) -> dict:
    return {"source": source_of(node), "module": module_of(node)}


def _splice(gm: GraphModule, cand: Candidate) -> Node:
    graph = gm.graph
    before = set(graph.nodes)
    try:
        with graph.inserting_before(cand.output):
            new = cand.replace(graph)
    except Exception:
        for n in reversed([n for n in graph.nodes if n not in before]):
            graph.erase_node(n)
        raise
    new.meta.update({k: v for k, v in cand.output.meta.items() if k not in new.meta})
    cand.output.replace_all_uses_with(new)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(cand.nodes, key=order.__getitem__, reverse=True):
        graph.erase_node(n)
    return new


def run_patterns(gm: GraphModule, patterns: list[Pattern], report: GraphReport) -> None:
    for pattern in patterns:
        seeds = list(pattern.seeds(gm.graph))
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
            reason = _outside_users(cand)
            if reason:
                report.near_misses.append(NearMiss(pattern.name, reason, nodes=[n.name for n in cand.nodes],
                                                  **_where(cand.nodes[0])))
                continue
            where, names = _where(cand.nodes[0]), [n.name for n in cand.nodes]
            try:
                new = _splice(gm, cand)
            except Exception as err:  # contain it: this match stays as the user wrote it
                log.warning("foak: %s rewrite failed at %s: %s", pattern.name, where["source"], err)
                report.near_misses.append(NearMiss(pattern.name, f"rewrite failed: {err!r}", nodes=names, **where))
                continue
            removed.update(cand.nodes)
            report.matches.append(Match(pattern.name, variant=cand.variant, nodes=names,
                                        replacement=new.name, **where))
    gm.graph.lint()
    gm.recompile()
