"""The backend as users meet it: registration, configuration, dumps, reports, inductor."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import foak_compile
from tests.models import batch, compare_with_eager, tiny_model


def _fresh_python(code: str, interpret: str = "1") -> str:
    """Run `code` in a new interpreter that has not imported foak_compile; its stdout."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TRITON_INTERPRET": interpret},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow
def test_entry_point_resolves_in_a_fresh_interpreter():
    code = (
        "import sys, torch\n"
        "from torch._dynamo.backends.registry import lookup_backend\n"
        "be = lookup_backend('foak')\n"
        "assert 'foak_compile' in sys.modules\n"
        "print(be.__module__, be.__name__)\n"
    )
    assert _fresh_python(code).strip() == "foak_compile.backend foak"


@pytest.mark.slow
def test_backend_string_compiles_and_runs_in_a_fresh_interpreter():
    code = (
        "import torch\n"
        "m = torch.nn.RMSNorm(37)\n"
        "f = torch.compile(m, backend='foak')\n"
        "x = torch.randn(3, 37)\n"
        "torch.testing.assert_close(f(x), m(x))\n"
        "import foak_compile\n"
        "print(foak_compile.total_counts())\n"
    )
    assert _fresh_python(code).strip().splitlines()[-1] == "{'rms_norm': 1}"


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown foak pattern"):
        foak_compile.backend(patterns=["rmsnorm"])
    with pytest.raises(ValueError, match="inner must be one of"):
        foak_compile.backend(inner="cudagraphs")


def test_dump_directory_and_log_line(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("FOAK_DUMP_DIR", str(tmp_path))
    model = tiny_model("llama")
    with caplog.at_level(logging.INFO, logger="foak_compile"):
        torch.compile(model, backend=foak_compile.backend(inner="eager"))(**batch(model))
    [graph_dir] = list(tmp_path.iterdir())
    assert {p.name for p in graph_dir.iterdir()} == {"report.json", "report.txt", "before.py", "after.py"}
    rep = json.loads((graph_dir / "report.json").read_text())
    rms = [m for m in rep["matches"] if m["pattern"] == "rms_norm"]
    assert len(rms) == 5 and rep["counts"]["rms_norm"] == 5
    assert all("modeling_llama.py" in m["source"] and m["nodes"] for m in rms)
    assert "torch.ops.foak.rms_norm" in (graph_dir / "after.py").read_text()
    assert "torch.ops.foak" not in (graph_dir / "before.py").read_text()
    assert "MATCH rms_norm" in (graph_dir / "report.txt").read_text()
    assert any("matched" in r.getMessage() and "rms_norm 5" in r.getMessage() for r in caplog.records)
    assert foak_compile.reports()[-1].dump_path == str(graph_dir)


def test_near_misses_reach_the_dump(tmp_path):
    ln = torch.nn.LayerNorm(11)
    torch.compile(ln, backend=foak_compile.backend(inner="eager", dump_dir=str(tmp_path)))(torch.randn(2, 11))
    [graph_dir] = list(tmp_path.iterdir())
    rep = json.loads((graph_dir / "report.json").read_text())
    assert rep["matches"] == [] and rep["near_misses"][0]["reason"].startswith("LayerNorm")


def test_pattern_selection_turns_rewrites_off():
    model = tiny_model("llama")
    be = foak_compile.backend(patterns=[], inner="aot_eager")
    torch.compile(model, backend=be)(**batch(model))
    assert be.reports[0].counts() == {} and "torch.ops.foak" not in be.reports[0].code_after


@pytest.mark.slow
def test_full_inductor_on_a_real_model():
    """The rewritten graph goes through AOTAutograd + inductor: loss and grads still match eager."""
    model = tiny_model("qwen3")
    be = compare_with_eager(model, batch(model), inner="inductor", rtol=1e-4, atol=1e-5)
    assert be.reports[0].counts()["rms_norm"] == 9


def test_a_failing_rewrite_is_contained():
    """A replacement that throws leaves the graph as the user wrote it and is reported."""
    from foak_compile.engine import Candidate, Pattern, run_patterns
    from foak_compile.report import GraphReport

    class Boom(Pattern):
        name = "boom"

        def seeds(self, graph):
            return [n for n in graph.nodes if n.op == "call_function"]

        def match(self, seed):
            def replace(g):
                g.call_function(torch.relu, (seed,))  # inserted, then the failure: must be undone
                raise RuntimeError("kernel compilation failed")

            return Candidate([seed], seed, replace)

    gm = torch.fx.symbolic_trace(lambda x: torch.sin(x) * 2)
    code = gm.code
    report = GraphReport("t")
    run_patterns(gm, [Boom()], report)
    assert gm.code == code and report.matches == []
    assert [m.reason for m in report.near_misses] == ["rewrite failed: RuntimeError('kernel compilation failed')"] * 2
    x = torch.randn(5)
    torch.testing.assert_close(gm(x), torch.sin(x) * 2)


def test_a_replacement_reading_a_removed_node_is_contained():
    """A replacement that reads a node of its own match (a 1-D `n * n` looked like a norm times a weight [H]
    whose weight is the norm itself) is refused before the graph changes, not after its uses moved."""
    from foak_compile.engine import Candidate, Pattern, run_patterns
    from foak_compile.report import GraphReport

    class ReadsItself(Pattern):
        name = "reads_itself"

        def seeds(self, graph):
            return [n for n in graph.nodes if n.op == "call_function" and n.target is torch.mul]

        def match(self, seed):
            inner = seed.args[0]
            return Candidate([inner, seed], seed, lambda g: g.call_function(torch.square, (inner,)))

    gm = torch.fx.symbolic_trace(lambda x: torch.mul(torch.sin(x), 3.0))
    code = gm.code
    report = GraphReport("t")
    run_patterns(gm, [ReadsItself()], report)
    assert gm.code == code and report.matches == []
    assert [m.reason for m in report.near_misses] == [
        "rewrite failed: ValueError('square would read sin, which the rewrite removes')"
    ]
    x = torch.randn(5)
    torch.testing.assert_close(gm(x), torch.sin(x) * 3.0)


@pytest.mark.slow
def test_cpu_without_triton_interpreter_falls_back_to_torch():
    """No GPU and no TRITON_INTERPRET: the ops take their torch path; results still match eager."""
    code = (
        "import copy, torch, foak_compile\n"
        "from foak_compile.kernels.common import INTERPRET\n"
        "from tests.models import tiny_model, batch, loss_and_grads\n"
        "assert not INTERPRET and not torch.cuda.is_available()\n"
        "m = tiny_model('llama'); b = batch(m); e = copy.deepcopy(m)\n"
        "l0, g0 = loss_and_grads(e, b)\n"
        "l1, g1 = loss_and_grads(m, b, call=torch.compile(m, backend=foak_compile.backend(inner='aot_eager')))\n"
        "torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)\n"
        "[torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6) for k in g0]\n"
        "print(sorted(foak_compile.total_counts().items()))\n"
    )
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the kernels")
    assert (
        _fresh_python(code, interpret="0").strip().splitlines()[-1]
        == "[('cross_entropy', 1), ('rms_norm', 5), ('rope', 2)]"
    )


def test_an_in_place_write_inside_a_match_leaves_it_alone():
    """The fused op runs at one place; the subgraph it replaces read its inputs across a span. An
    in-place op inside that span (here x changes between the variance and the normalisation) makes
    the candidate a near-miss for every pattern alike (the engine's rule), and eager's result stands."""
    w = torch.randn(24)

    def norm(x):
        variance = x.pow(2).mean(-1, keepdim=True)
        x.mul_(2.0)
        return w * (x * torch.rsqrt(variance + 1e-6))

    be = foak_compile.backend(patterns=["rms_norm"], inner="aot_eager")
    x = torch.randn(3, 24)
    torch.testing.assert_close(torch.compile(norm, backend=be)(x.clone()), norm(x.clone()))
    [miss] = be.reports[0].near_misses
    assert be.reports[0].counts() == {} and miss.pattern == "rms_norm"
    assert miss.reason == "`mul_` writes a tensor in place between the pattern's first and last node"


def test_a_grad_mode_switch_inside_a_match_leaves_it_alone():
    """Statistics under no_grad: eager's gradient skips the variance, a fused norm's would not. A
    grad-mode (or autocast) switch inside the span makes a near-miss for every pattern alike."""
    w = torch.randn(24)

    def norm(x):
        with torch.no_grad():
            variance = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(variance + 1e-6))

    be = foak_compile.backend(patterns=["rms_norm"], inner="aot_eager")
    x = torch.randn(3, 24, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    torch.compile(norm, backend=be)(x).sum().backward()
    norm(ref_x).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    [miss] = be.reports[0].near_misses
    assert be.reports[0].counts() == {} and "switches grad or autocast mode between the pattern's" in miss.reason


def test_the_span_rule_reads_only_the_span():
    """A one-node match (F.rms_norm, a bare cross_entropy) spans nothing: a mode switch or an in-place
    write elsewhere in the graph leaves it matched; `&` / `|` are no in-place ops."""
    import torch.nn.functional as F

    w = torch.randn(16)

    def f(x, z, logits, labels, keep):
        with torch.no_grad():
            q = z + 1
        z.add_(1)
        labels = torch.where(keep & (labels > 0) | keep, labels, -100)
        return F.rms_norm(x, (16,), w, 1e-6), q, F.cross_entropy(logits.float(), labels)

    be = foak_compile.backend(patterns=["rms_norm", "cross_entropy"], inner="aot_eager")
    args = (torch.randn(3, 16), torch.randn(2), torch.randn(5, 7), torch.randint(0, 7, (5,)), torch.rand(5) > 0.3)
    got = torch.compile(f, backend=be)(*[a.clone() for a in args])
    for a, b in zip(got, f(*[a.clone() for a in args])):
        torch.testing.assert_close(
            a, b, equal_nan=True
        )  # every label ignored (keep all False, p=0.3**5): NaN, as torch
    assert be.reports[0].counts() == {"rms_norm": 1, "cross_entropy": 1}, be.reports[0].to_text()


def test_an_in_place_flag_by_position_counts():
    """F.relu(h, True) rewrites h between the lm_head (which read h) and the loss: not fused."""
    import torch.nn.functional as F

    w = torch.randn(7, 16)

    def f(x, labels):
        h = x * 1
        logits = F.linear(h, w)
        F.relu(h, True)
        return F.cross_entropy(logits, labels)

    be = foak_compile.backend(patterns=["linear_cross_entropy", "cross_entropy"], inner="aot_eager")
    x, y = torch.randn(5, 16), torch.randint(0, 7, (5,))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(f, backend=be)(x, y), f(x, y))
    assert "linear_cross_entropy" not in be.reports[0].counts()
    assert any("writes a tensor in place" in m.reason for m in be.reports[0].near_misses)


@pytest.mark.parametrize(
    "mode,env,want",
    [
        ("reduce-overhead", None, True),
        ("max-autotune-no-cudagraphs", None, False),
        ("reduce-overhead", False, False),
        ("max-autotune-no-cudagraphs", True, True),
    ],
)
def test_opaque_dequant_follows_cuda_graphs(mode, env, want, monkeypatch, foak_config):
    """The 4-bit dequant is traced as an opaque op exactly when the backend compiles for CUDA graphs
    (mode="reduce-overhead"), unless FOAK_OPAQUE_DEQUANT (here: config.opaque_dequant) says always/never."""
    import torch._inductor.compile_fx as cfx
    from foak_compile.ops import dequant

    foak_config(opaque_dequant=env)
    seen = []

    def spy(gm, example_inputs, config_patches=None):
        seen.append(dequant.opaque())
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", spy)
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x * 2 + 1, backend=foak_compile.backend(mode=mode))
    x = torch.randn(int(torch.randint(2, 50, ())))
    torch.testing.assert_close(fn(x), x * 2 + 1)
    assert seen == [want] and not foak_compile.config.current().cuda_graphs


def _norm_model():
    d = int(torch.randint(9, 40, ()))
    return torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.RMSNorm(d, eps=1e-6)), torch.randn(3, d)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,options",
    [
        ("max-autotune-no-cudagraphs", None),
        (None, {"trace.enabled": False}),
        (None, {"foak.patterns": ["rms_norm"], "max_autotune": False}),
    ],
)
def test_torch_compile_mode_and_options_reach_inductor(mode, options, monkeypatch):
    """torch.compile(model, backend="foak", mode=..., options=...), the spellings torch.compile users know:
    inductor gets the mode's and the options' config, foak's own options take the prefix 'foak.'."""
    import torch._inductor.compile_fx as cfx

    real, seen = cfx.compile_fx, []

    def spy(gm, example_inputs, config_patches=None, **kw):
        seen.append(dict(config_patches or {}))
        return real(gm, example_inputs, config_patches=config_patches, **kw)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    model, x = _norm_model()
    foak_compile.reset_reports()
    out = torch.compile(model, backend="foak", mode=mode, options=options)(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    want = {
        **(torch._inductor.list_mode_options(mode) if mode else {}),
        **{k: v for k, v in (options or {}).items() if not k.startswith("foak.")},
    }
    assert seen[0] == want  # (compile_fx calls itself again inside the patched config)
    assert foak_compile.total_counts() == {"rms_norm": 1}


def test_unknown_options_are_named():
    model, x = _norm_model()
    for options, match in (
        ({"trace.enabld": True}, "unknown inductor option.*trace.enabld"),
        ({"foak.pattern": ["rope"]}, "unknown foak option 'foak.pattern'"),
        ({"foak.patterns": ["rmsnorm"]}, "unknown foak pattern"),
    ):
        torch._dynamo.reset()
        with pytest.raises(Exception, match=match):
            torch.compile(model, backend="foak", options=options)(x)
    with pytest.raises(ValueError, match="inductor settings; inner is 'aot_eager'"):
        foak_compile.backend(inner="aot_eager", options={"max_autotune": True})


def test_foak_options_reach_the_patterns():
    model, x = _norm_model()
    be = foak_compile.backend(inner="aot_eager")
    torch.compile(model, backend=be, options={"foak.patterns": ["rope"], "foak.inner": "aot_eager"})(x)
    assert be.reports and be.reports[0].counts() == {}  # rms_norm off: the options' pattern list ruled


@pytest.mark.slow  # a fresh interpreter
def test_torch_logs_and_structured_trace(tmp_path):
    """TORCH_LOGS=foak_compile prints each graph's summary line; TORCH_TRACE gets a foak_report artifact
    (what tlparse renders) with the matches."""
    code = (
        "import torch, foak_compile\n"
        "f = torch.compile(lambda x: torch.nn.functional.rms_norm(x, (8,), eps=1e-6),"
        " backend=foak_compile.backend(inner='aot_eager'))\n"
        "f(torch.randn(3, 8))\n"
    )
    env = dict(os.environ, TORCH_LOGS="foak_compile", TORCH_TRACE=str(tmp_path), TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "matched rms_norm 1" in out.stderr
    traces = "".join(p.read_text() for p in tmp_path.iterdir())
    assert '"name": "foak_report"' in traces and '"counts": {"rms_norm": 1}' in traces
