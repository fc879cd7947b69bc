"""Checkpoint regions with Python side effects (transformers >= 5.2x sets a context variable inside every
attention forward): traced whole with foak imported, and a near-miss when a region falls back to eager."""

import os
import subprocess
import sys

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import foak_compile
from tests.helpers import rel_err

FLAG = "skip_fwd_side_effects_in_bwd_under_checkpoint"
pytestmark = pytest.mark.skipif(not hasattr(torch._dynamo.config, FLAG), reason="torch without the Dynamo flag")

ACTIVE = []  # module-level state outside every region: changing it is a side effect


class _Layer(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = torch.nn.RMSNorm(d, eps=1e-6)
        self.proj = torch.nn.Linear(d, d)

    def forward(self, x):
        ACTIVE.append(id(self))  # push and pop: transformers' kernel routing sets and resets its state
        out = self.proj(self.norm(x))
        ACTIVE.pop()
        return out


class _Checkpointed(torch.nn.Module):
    """Two checkpointed layers, unrolled: a graph break inside a loop would skip the whole frame."""

    def __init__(self, d):
        super().__init__()
        self.first, self.second = _Layer(d), _Layer(d)

    def forward(self, x):
        x = checkpoint(self.first, x, use_reentrant=False)
        x = checkpoint(self.second, x * 2, use_reentrant=False)
        return x.square().mean()


def _run(model, x, call):
    model.zero_grad(set_to_none=True)
    loss = call(x)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_a_region_with_a_side_effect_is_rewritten_inside():
    d, layers = int(torch.randint(20, 60, ())), 2
    model, x = _Checkpointed(d), torch.randn(3, 7, d)
    ref_loss, ref_grads = _run(model, x, model)
    ACTIVE.clear()  # eager's recompute stops after the last tensor it needs, before the pop
    be = foak_compile.backend(inner="aot_eager")
    loss, grads = _run(model, x, torch.compile(model, backend=be))
    assert rel_err(loss, ref_loss) < 1e-5
    assert all(rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads))
    assert len(be.reports) == 1 and be.reports[0].code_before.count("tag_activation_checkpoint(") == layers
    assert be.reports[0].counts() == {"rms_norm": layers}
    assert ACTIVE == []  # the forward's push and pop; the recompute replays neither


def test_a_region_that_falls_back_is_a_near_miss():
    d = int(torch.randint(20, 60, ()))
    model, x = _Checkpointed(d), torch.randn(2, 5, d)
    ref_loss, _ = _run(model, x, model)
    be = foak_compile.backend(inner="aot_eager")
    with torch._dynamo.config.patch(**{FLAG: False}):
        loss, _ = _run(model, x, torch.compile(model, backend=be))
    assert rel_err(loss, ref_loss) < 1e-5
    misses = [m for r in be.reports for m in r.near_misses if m.pattern == "checkpoint"]
    assert misses, [r.summary() for r in be.reports]
    assert "fell back to eager" in misses[0].reason and "HOP" in misses[0].reason
    assert "skip_fwd_side_effects_in_bwd_under_checkpoint is off" in misses[0].reason
    assert "rms_norm" not in foak_compile.total_counts(be.reports)  # the layers ran unfused


@pytest.mark.slow  # fresh interpreters
@pytest.mark.parametrize("env,want", [(None, True), ("0", False)])
def test_importing_foak_sets_the_flag_unless_opted_out(env, want):
    code = "import torch; assert not torch._dynamo.config.%s; import foak_compile; print(torch._dynamo.config.%s)" % (
        FLAG,
        FLAG,
    )
    environ = {k: v for k, v in os.environ.items() if k != "FOAK_CHECKPOINT_SIDE_EFFECTS"}
    if env is not None:
        environ["FOAK_CHECKPOINT_SIDE_EFFECTS"] = env
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(want)
