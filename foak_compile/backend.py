"""The `foak` torch.compile backend: pattern passes over Dynamo's graph, then an inner compiler.

torch.compile(model, backend="foak")                       # all patterns, inductor
torch.compile(model, backend=foak_compile.backend(patterns=["rms_norm"], inner="aot_eager",
                                                  dump_dir="dumps"))
"""

import contextlib
import itertools
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

import torch
import torch._inductor
from torch._dynamo.backends.registry import lookup_backend

from . import config
from .checkpointing import new_region_breaks, side_effects_allowed
from .engine import Pattern, run_patterns
from .patterns import DEFAULT, PATTERNS
from .report import GraphReport, NearMiss, record

log = logging.getLogger("foak_compile")
INNER = ("inductor", "aot_eager", "eager")
FOAK_OPTIONS = ("patterns", "inner", "dump_dir")  # torch.compile(options={"foak.patterns": [...], ...})
_graph_ids = itertools.count()
CompiledFn = Callable[..., Any]  # what a torch.compile backend returns: the graph's forward, compiled


class FoakBackend:
    """A configured backend; pass an instance to torch.compile(backend=...)."""

    def __init__(
        self,
        patterns: Optional[Iterable[str]] = None,
        inner: str = "inductor",
        dump_dir: Optional[str] = None,
        mode: Optional[str] = None,
        options: Optional[dict[str, Any]] = None,
    ) -> None:
        names = list(DEFAULT) if patterns is None else list(patterns)
        unknown = [n for n in names if n not in PATTERNS]
        if unknown:
            raise ValueError(f"unknown foak pattern(s) {unknown}; known: {sorted(PATTERNS)}")
        if inner not in INNER:
            raise ValueError(f"inner must be one of {INNER}, not {inner!r}")
        options = dict(options or {})
        if (mode is not None or options) and inner != "inductor":
            raise ValueError(f"mode={mode!r} / options={options} are inductor settings; inner is {inner!r}")
        if mode is not None:
            torch._inductor.list_mode_options(mode)  # raises for an unknown mode
        bad = sorted(set(options) - set(torch._inductor.list_options())) if options else []
        if bad:
            raise ValueError(
                f"unknown inductor option(s) {bad} (foak's own take the prefix 'foak.': "
                f"{['foak.' + k for k in FOAK_OPTIONS]})"
            )
        names = sorted(dict.fromkeys(names), key=list(PATTERNS).index)  # patterns run in their fixed order
        self.pattern_names: list[str] = names
        self.inner, self.dump_dir, self.mode = inner, dump_dir, mode
        self.options: dict[str, Any] = options
        self.reports: list[GraphReport] = []

    def __call__(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: Sequence[Any],
        mode: Optional[str] = None,
        options: Optional[dict[str, Any]] = None,
    ) -> CompiledFn:
        """torch.compile(..., backend=..., mode=..., options=...) passes its mode and options here."""
        be = self if mode is None and not options else self.with_options(mode, options)
        return be._compile(gm, example_inputs)

    def with_options(self, mode: Optional[str] = None, options: Optional[dict[str, Any]] = None) -> "FoakBackend":
        """This backend with torch.compile's `mode` and `options` on top: inductor options as they are,
        foak's own under the prefix 'foak.' (foak.patterns, foak.inner, foak.dump_dir). Reports go to
        this backend's `reports`."""
        ours, inductor_options = {}, {}
        for key, value in (options or {}).items():
            if key.startswith("foak."):
                if key[5:] not in FOAK_OPTIONS:
                    raise ValueError(f"unknown foak option {key!r}; known: {['foak.' + k for k in FOAK_OPTIONS]}")
                ours[key[5:]] = value
            else:
                inductor_options[key] = value
        be = FoakBackend(
            patterns=ours.get("patterns", self.pattern_names),
            inner=ours.get("inner", self.inner),
            dump_dir=ours.get("dump_dir", self.dump_dir),
            mode=self.mode if mode is None else mode,
            options={**self.options, **inductor_options},
        )
        be.reports = self.reports
        return be

    def _compile(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> CompiledFn:
        report = GraphReport(graph_id=_graph_id(), code_before=gm.code)
        _run_nested(gm, [PATTERNS[n]() for n in self.pattern_names], report)
        for reason in new_region_breaks():  # layers Dynamo left out of every graph: say why, once
            report.near_misses.append(NearMiss("checkpoint", _region_break_reason(reason)))
        report.code_after = gm.code
        dump_dir = self.dump_dir or config.current().dump_dir
        if dump_dir:
            report.dump(dump_dir)
        self.reports.append(report)
        record(report)
        log.info(report.summary())  # TORCH_LOGS=foak_compile shows it beside Dynamo's logs
        _trace_artifact(report)
        if self.inner == "eager":
            return gm.forward
        patches = {**(torch._inductor.list_mode_options(self.mode) if self.mode else {}), **self.options}
        if patches:  # e.g. "reduce-overhead": CUDA graphs take the launch cost off the host
            from torch._inductor.compile_fx import compile_fx

            # replayed graphs hide an opaque op's host cost: the quantised bases' dequant goes opaque (compile time)
            with config.patch(cuda_graphs=True) if patches.get("triton.cudagraphs") else contextlib.nullcontext():
                return compile_fx(gm, example_inputs, config_patches=patches)
        return lookup_backend(self.inner)(gm, example_inputs)

    def __repr__(self) -> str:
        return (
            f"foak_compile.backend(patterns={self.pattern_names}, inner={self.inner!r}, "
            f"dump_dir={self.dump_dir!r}, mode={self.mode!r}, options={self.options!r})"
        )


# Higher-order ops whose body is ordinary model code that runs as written: the same rewrites hold there.
# tag_activation_checkpoint is how Dynamo records a torch.utils.checkpoint region (HF gradient
# checkpointing puts every decoder layer in one).
_BODY_HOPS = ("tag_activation_checkpoint",)


def _run_nested(gm: torch.fx.GraphModule, patterns: list[Pattern], report: GraphReport) -> None:
    """Patterns over `gm` and, first, over the bodies of its checkpoint regions."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "__name__", "") not in _BODY_HOPS:
            continue
        body_node, operands = node.args[0], node.args[1:]
        body = getattr(gm, body_node.target, None) if getattr(body_node, "op", None) == "get_attr" else None
        if not isinstance(body, torch.fx.GraphModule):
            continue
        inputs = [n for n in body.graph.nodes if n.op == "placeholder"]
        for ph, arg in zip(inputs, operands):
            # the body's inputs are the region's operands: let patterns see the real tensor behind each
            # (e.g. a bitsandbytes weight's quant_state), as they do at the top level
            if isinstance(arg, torch.fx.Node) and "grapharg" in arg.meta and "grapharg" not in ph.meta:
                ph.meta["grapharg"] = arg.meta["grapharg"]
        _run_nested(body, patterns, report)
    run_patterns(gm, patterns, report)


def _trace_artifact(report: GraphReport) -> None:
    """The report as a structured-trace artifact: with TORCH_TRACE=DIR, tlparse lists it on the compile's
    page next to Dynamo's and inductor's (a no-op without TORCH_TRACE)."""
    try:
        from torch._logging import trace_structured
    except ImportError:
        return
    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": "foak_report", "encoding": "json"},
        payload_fn=lambda: json.dumps({**report.to_json(), "text": report.to_text()}),
    )


def _region_break_reason(reason: str) -> str:
    try:
        import transformers

        versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    except ImportError:
        versions = f"torch {torch.__version__}"
    return (
        f"a checkpoint region (gradient checkpointing) or another higher-order op fell back to eager before "
        f"this graph, so the layers inside it are not fused ({versions}): {reason}"
        + (
            ""
            if side_effects_allowed()
            else "; Dynamo's skip_fwd_side_effects_in_bwd_under_checkpoint is off (FOAK_CHECKPOINT_SIDE_EFFECTS=0,"
            " or a torch without it)"
        )
    )


def _graph_id() -> str:
    n = next(_graph_ids)
    try:  # Dynamo's own id (frame/attempt), so dumps line up with TORCH_LOGS output
        from torch._guards import CompileContext

        cid = CompileContext.current_compile_id()
        if cid is not None:
            return f"graph_{n:03d}_frame{str(cid).strip('[]').replace('/', '_')}"
    except Exception:
        pass
    return f"graph_{n:03d}"


def backend(
    patterns: Optional[Iterable[str]] = None,
    inner: str = "inductor",
    dump_dir: Optional[str] = None,
    mode: Optional[str] = None,
    options: Optional[dict[str, Any]] = None,
) -> FoakBackend:
    """A foak backend with a choice of patterns, inner compiler, dump directory, and inductor's `mode`
    ("reduce-overhead" = CUDA graphs, "max-autotune", ...) and `options` (inductor config), as torch.compile
    takes them."""
    return FoakBackend(patterns, inner, dump_dir, mode, options)


def foak(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    mode: Optional[str] = None,
    options: Optional[dict[str, Any]] = None,
) -> CompiledFn:
    """The `backend="foak"` entry point: every default pattern, inductor with torch.compile's mode/options."""
    return FoakBackend()(gm, example_inputs, mode=mode, options=options)
