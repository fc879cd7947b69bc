"""FOAK_OPAQUE_DEQUANT with inlined 4-bit LoRA ops (as on CUDA): the min-cut partitioner, CSE
included, must leave one dequant in the forward and one in the backward and keep no dequantised
weight between them (session 6 measured +1.8 GiB when the two calls were merged into one node).

The inlined (triton_op) bodies are traced here on the CPU: without dropout and with the dequant
opaque, no Triton launch is left in them. INLINE and OPAQUE are read at import, so the check runs
in a fresh interpreter."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("bitsandbytes")

SCRIPT = r"""
import json, random, sys
import torch
import bitsandbytes.functional as BF
from torch._functorch.aot_autograd import aot_function
from torch._functorch.partitioners import min_cut_rematerialization_partition
import foak_compile
from foak_compile.ops import dequant, registry

assert dequant.OPAQUE and registry.is_inlined("foak::lora_linear_4bit"), "environment not applied"
which, nested, seed = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
rng = random.Random(seed)
torch.manual_seed(seed)
in_f, r = rng.choice([48, 80, 112]), rng.randint(2, 6)
outs = [rng.randint(5, 41) for _ in range(2 if which == "siblings" else 1)]
quant = [BF.quantize_4bit(torch.randn(o, in_f), quant_type="nf4", compress_statistics=nested) for o in outs]

def state(st):
    if st.nested:
        return [st.absmax, st.state2.absmax, st.state2.code, st.offset], st.state2.blocksize
    return [st.absmax, None, None, None], 256

x = torch.randn(3, rng.randint(2, 9), in_f, requires_grad=True)
a = [(torch.randn(r, in_f) / 8).requires_grad_() for _ in outs]
b = [(torch.randn(o, r) / 8).requires_grad_() for o in outs]
nbs = state(quant[0][1])[1]
k = len(outs)
# every tensor an input of f (closed-over tensors would be constants of the trace); None stays None
flat_in = [q for q, _ in quant] + [t for _, st in quant for t in state(st)[0]]

def unflatten(ts):
    qs, rest = ts[:k], ts[k:]
    cols = [[rest[4 * i + j] for i in range(k)] for j in range(4)]  # absmax, nested_absmax, code, offset
    return qs, cols

def f(x, *args):
    a_, b_ = args[:k], args[k:2 * k]
    it = iter(args[2 * k:])
    ts = [None if t is None else next(it) for t in flat_in]
    qs, cols = unflatten(ts)
    st = quant[0][1]
    if which == "single":
        return torch.ops.foak.lora_linear_4bit(x, qs[0], *[c[0] for c in cols], None, a_[0], b_[0], 2.0, 0.0, "nf4",
                                               st.blocksize, nbs, list(st.shape), torch.float32, torch.float32)[0]
    flat = [v for o in outs for v in (o, in_f)]
    return torch.ops.foak.lora_linear_4bit_siblings(x, list(qs), *cols, [None] * k, list(a_), list(b_), [2.0] * k,
                                                    "nf4", st.blocksize, nbs, flat, torch.float32, torch.float32)[0]

graphs = []
def keep(gm, _):
    graphs.append(gm)
    return gm

g = aot_function(f, fw_compiler=keep, bw_compiler=keep, partition_fn=min_cut_rematerialization_partition)
g(x, *a, *b, *[t for t in flat_in if t is not None]).sum().backward()
fw, bw = graphs
def dequants(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and "dequantize_4bit" in str(n.target)]
saved = fw.graph.find_nodes(op="output")[0].args[0]
print(json.dumps({"forward": len(dequants(fw)), "backward": len(dequants(bw)),
                  "saved_dequant": [str(n) for n in saved if n in dequants(fw)],
                  "sites": sorted({n.args[-1] for n in dequants(fw) + dequants(bw)})}))
"""


@pytest.mark.parametrize("which", ["single", "siblings"])
@pytest.mark.parametrize("nested", [False, True])
def test_forward_and_backward_each_dequantise(which, nested):
    env = dict(os.environ, FOAK_INLINE="lora", FOAK_OPAQUE_DEQUANT="1", TRITON_INTERPRET="1")
    seed = int.from_bytes(os.urandom(2), "little")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, which, str(int(nested)), str(seed)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"forward": 1, "backward": 1, "saved_dequant": [], "sites": [0, 1]}, (got, seed)
