"""FOAK_OPAQUE_DEQUANT with inlined 4-bit LoRA ops (as on CUDA): the min-cut partitioner, CSE
included, must leave one dequant in the forward and one in the backward and keep no dequantised
weight between them (merged into one node, the dequantised weight was kept: +1.8 GiB on the 1B step).

The inlined (triton_op) bodies are traced here on the CPU, through the kernels' torch paths
(TRITON_INTERPRET=0: the interpreter cannot run a launch on the tracer's fake tensors). INLINE is read at import, so the check runs in a fresh
interpreter; the dequant is opaque there by FOAK_OPAQUE_DEQUANT=1 or, with it unset, by tracing
under config.patch(cuda_graphs=True) (what the backend does for a CUDA-graphs mode)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.slow  # a fresh interpreter per case

SCRIPT = r"""
import contextlib, json, random, sys
import torch
import bitsandbytes.functional as BF
from torch._functorch.aot_autograd import aot_function
from torch._functorch.partitioners import min_cut_rematerialization_partition
import foak_compile
from foak_compile.ops import registry

which, fmt, seed, route = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
assert registry.is_inlined("foak::lora_linear_4bit"), "environment not applied"
assert foak_compile.config.current().opaque_dequant is (True if route == "forced" else None), "environment not applied"
rng = random.Random(seed)
torch.manual_seed(seed)
in_f, r = rng.choice([48, 80, 112]), rng.randint(2, 6)
outs = [rng.randint(5, 41) for _ in range(2 if which == "siblings" else 1)]
k = len(outs)
if fmt == "gptq":  # random 4-bit words are valid codes and zeros; groups of 16 input rows
    per = [[torch.randint(-2**31, 2**31 - 1, (in_f // 8, o), dtype=torch.int32),
            torch.randint(-2**31, 2**31 - 1, (in_f // 16, -(-o // 8)), dtype=torch.int32),
            torch.rand(in_f // 16, o) / 50, (torch.arange(in_f) // 16).to(torch.int32)] for o in outs]
else:
    quant = [BF.quantize_4bit(torch.randn(o, in_f), quant_type="nf4", compress_statistics=fmt == "nf4-nested")
             for o in outs]
    st0 = quant[0][1]
    nbs = st0.state2.blocksize if st0.nested else 256
    per = [[q, st.absmax] + ([st.state2.absmax, st.state2.code, st.offset] if st.nested else [None] * 3)
           for q, st in quant]
# every tensor an input of f (closed-over tensors would be constants of the trace); None stays None
flat_in = [t for p in per for t in p]
x = torch.randn(3, rng.randint(2, 9), in_f, requires_grad=True)
a = [(torch.randn(r, in_f) / 8).requires_grad_() for _ in outs]
b = [(torch.randn(o, r) / 8).requires_grad_() for o in outs]

def f(x, *args):
    a_, b_ = list(args[:k]), list(args[k:2 * k])
    it = iter(args[2 * k:])
    ts = [None if t is None else next(it) for t in flat_in]
    n = len(per[0])
    rows = [ts[i * n:(i + 1) * n] for i in range(k)]
    cols = [list(c) for c in zip(*rows)]
    if fmt == "gptq" and which == "single":
        return torch.ops.foak.lora_linear_gptq(x, *rows[0], None, a_[0], b_[0], 2.0, 0.0, 4, 2, torch.float32,
                                               torch.float32)[0]
    if fmt == "gptq":
        return torch.ops.foak.lora_linear_gptq_siblings(x, *cols, [None] * k, a_, b_, [2.0] * k, 4, 2, torch.float32,
                                                        torch.float32)[0]
    if which == "single":
        return torch.ops.foak.lora_linear_4bit(x, *rows[0], None, a_[0], b_[0], 2.0, 0.0, "nf4", st0.blocksize, nbs,
                                               list(st0.shape), torch.float32, torch.float32)[0]
    flat = [v for o in outs for v in (o, in_f)]
    return torch.ops.foak.lora_linear_4bit_siblings(x, *cols, [None] * k, a_, b_, [2.0] * k, "nf4", st0.blocksize,
                                                    nbs, flat, torch.float32, torch.float32)[0]

graphs = []
def keep(gm, _):
    graphs.append(gm)
    return gm

g = aot_function(f, fw_compiler=keep, bw_compiler=keep, partition_fn=min_cut_rematerialization_partition)
with foak_compile.config.patch(cuda_graphs=True) if route == "cuda_graphs" else contextlib.nullcontext():
    y = g(x, *a, *b, *[t for t in flat_in if t is not None])
y.sum().backward()
fw, bw = graphs
def dequants(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and "foak.dequantize_" in str(n.target)]
def base(n):  # through views (a saved transpose of the weight is the weight)
    while n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.is_view:
        n = n.args[0]
    return n
saved = fw.graph.find_nodes(op="output")[0].args[0]
print(json.dumps({"forward": len(dequants(fw)), "backward": len(dequants(bw)),
                  "saved_dequant": [str(n) for n in saved if isinstance(n, torch.fx.Node) and base(n) in dequants(fw)],
                  "sites": sorted({n.args[-1] for n in dequants(fw) + dequants(bw)})}))
"""


@pytest.mark.parametrize("which", ["single", "siblings"])
@pytest.mark.parametrize(
    "fmt,route",
    [
        ("nf4", "forced"),
        ("nf4-nested", "forced"),
        ("gptq", "forced"),
        ("nf4-nested", "cuda_graphs"),
        ("gptq", "cuda_graphs"),
    ],
)
def test_forward_and_backward_each_dequantise(which, fmt, route):
    env = dict(os.environ, FOAK_INLINE="lora", FOAK_OPAQUE_DEQUANT="1", TRITON_INTERPRET="0")
    if route == "cuda_graphs":
        del env["FOAK_OPAQUE_DEQUANT"]
    seed = int.from_bytes(os.urandom(2), "little")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, which, fmt, str(seed), route],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"forward": 1, "backward": 1, "saved_dequant": [], "sites": [0, 1]}, (got, seed)
