"""What the backend did to each graph: matches, near-misses with reasons, code before/after.

Reports are kept in-process (`foak_compile.reports()`) and, with a dump directory
(`dump_dir=` or config.dump_dir, FOAK_DUMP_DIR), written as DIR/<graph id>/{report.json, report.txt,
before.py, after.py}.
"""

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass
class Match:
    pattern: str
    source: str = ""
    module: str = ""
    variant: str = ""
    nodes: list[str] = field(default_factory=list)
    replacement: str = ""


@dataclass
class NearMiss:
    pattern: str
    reason: str
    source: str = ""
    module: str = ""
    nodes: list[str] = field(default_factory=list)


@dataclass
class GraphReport:
    graph_id: str
    matches: list[Match] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    code_before: str = ""
    code_after: str = ""
    dump_path: Optional[str] = None

    def counts(self) -> dict[str, int]:
        return dict(Counter(m.pattern for m in self.matches))

    def near_miss_counts(self) -> dict[str, int]:
        return dict(Counter(m.pattern for m in self.near_misses))

    def summary(self) -> str:
        def fmt(c: dict[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"

        return f"foak: graph {self.graph_id}: matched {fmt(self.counts())}; near-misses {fmt(self.near_miss_counts())}"

    def to_json(self) -> dict[str, Any]:
        return {
            "graph_id": self.graph_id,
            "counts": self.counts(),
            "matches": [asdict(m) for m in self.matches],
            "near_misses": [asdict(m) for m in self.near_misses],
        }

    def to_text(self) -> str:
        out = [self.summary(), ""]
        for m in self.matches:
            out.append(f"MATCH {m.pattern}" + (f" [{m.variant}]" if m.variant else "") + f" -> {m.replacement}")
            out.append(f"    at {m.source}" + (f"\n    in {m.module}" if m.module else ""))
            out.append(f"    replaced: {', '.join(m.nodes)}")
        for m in self.near_misses:
            out.append(f"NEAR-MISS {m.pattern}: {m.reason}")
            out.append(f"    at {m.source}" + (f"\n    in {m.module}" if m.module else ""))
        return "\n".join(out) + "\n"

    def dump(self, root: str) -> str:
        path = os.path.join(root, self.graph_id)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "report.json"), "w") as f:
            json.dump(self.to_json(), f, indent=1)
        for name, text in (
            ("report.txt", self.to_text()),
            ("before.py", self.code_before),
            ("after.py", self.code_after),
        ):
            with open(os.path.join(path, name), "w") as f:
                f.write(text)
        self.dump_path = path
        return path


_REPORTS: list[GraphReport] = []


def record(report: GraphReport) -> None:
    _REPORTS.append(report)


def reports() -> list[GraphReport]:
    """Every graph report of this process since the last `reset_reports()`, oldest first."""
    return list(_REPORTS)


def reset_reports() -> None:
    _REPORTS.clear()


def total_counts(rs: Optional[list[GraphReport]] = None) -> dict[str, int]:
    """Matches per pattern over `rs` (default: every report of this process)."""
    c: Counter[str] = Counter()
    for r in reports() if rs is None else rs:
        c.update(r.counts())
    return dict(c)
