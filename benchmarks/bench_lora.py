"""LoRA layer forward+backward on a GPU, per projection shape of Llama-3.2-1B and Llama-3.1-8B:
eager peft vs inductor (torch.compile of the peft layer) vs foak (the op called directly, and
the peft layer compiled with the foak backend), over a dense bf16 base and a bitsandbytes NF4
base (double-quantised, blocksize 64, bf16 compute).

    PYTHONPATH=$PWD python -m benchmarks.bench_lora --out $OUT/lora.json

Times are medians of CUDA-event-timed fwd+bwd steps (x requires grad, as in any layer but the
first; lora_A/lora_B trained, the base frozen); peak memory is the step's high-water mark above
what was allocated before it. Without bitsandbytes the NF4 cases say so in the JSON.
"""

import argparse
import traceback

import torch
import torch.nn as nn

import foak_compile
from foak_compile.kernels import bnb4

from .common import bench_ms, environment, write_json

TOKENS = 4096
RANK = 16
ALPHA = 32
SHAPES = {  # name: (in_features, out_features)
    "1B q/o 2048->2048": (2048, 2048),
    "1B gate/up 2048->8192": (2048, 8192),
    "1B down 8192->2048": (8192, 2048),
    "8B q/o 4096->4096": (4096, 4096),
    "8B gate/up 4096->14336": (4096, 14336),
    "8B down 14336->4096": (14336, 4096),
}
DTYPE = torch.bfloat16


class Holder(nn.Module):
    """One projection for peft to wrap."""

    def __init__(self, base):
        super().__init__()
        self.proj = base

    def forward(self, x):
        return self.proj(x)


def _bnb():
    try:
        import bitsandbytes as bnb

        return bnb, None
    except Exception as err:  # missing, or no CUDA build for this machine
        return None, f"bitsandbytes unavailable: {err!r}"


def peft_layer(in_f, out_f, base_kind, adapter_dtype):
    """A peft LoRA layer over a dense bf16 or a bitsandbytes NF4 base, on the GPU."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=DTYPE)
    if base_kind == "nf4":
        bnb, _ = _bnb()
        base = bnb.nn.Linear4bit(
            in_f, out_f, bias=False, compute_dtype=DTYPE, compress_statistics=True, quant_type="nf4"
        )
        base.weight = bnb.nn.Params4bit(
            dense.weight.data.cpu(), requires_grad=False, compress_statistics=True, quant_type="nf4", module=base
        )
        base = base.to("cuda")  # quantises
    else:
        base = dense
    holder = Holder(base)
    if base_kind == "nf4":
        holder.is_loaded_in_4bit = True
    model = get_peft_model(
        holder,
        LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"]),
        autocast_adapter_dtype=(adapter_dtype == torch.float32),
    )
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn_like(p, dtype=adapter_dtype) * 0.02  # non-zero B: the adapter really runs
    return model


def foak_op(model, base_kind):
    """A callable x -> y running torch.ops.foak.lora_linear(_4bit) on the peft layer's tensors."""
    layer = model.base_model.model.proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    if base_kind == "dense":
        w = layer.base_layer.weight
        return lambda x: torch.ops.foak.lora_linear(x, w, None, a, b, s, 0.0, DTYPE)[0]
    qw = layer.base_layer.weight
    qs = qw.quant_state
    nested = (
        (qs.state2.absmax, qs.state2.code, qs.offset, qs.state2.blocksize) if qs.nested else (None, None, None, 256)
    )
    args = (qw, qs.absmax, nested[0], nested[1], nested[2], None)
    return lambda x: torch.ops.foak.lora_linear_4bit(
        x, *args, a, b, s, 0.0, qs.quant_type, qs.blocksize, nested[3], list(qs.shape), DTYPE, DTYPE
    )[0]


def step_fn(fn, x, dy, params):
    def step():
        x.grad = None
        for p in params:
            p.grad = None
        fn(x).backward(dy)

    return step


def peak_mb(step):
    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def check(fn, ref, x, dy, params):
    """Max |difference| to eager peft of y, dx and each adapter grad, relative to eager's largest value."""
    out = {}
    results = []
    for f in (fn, ref):
        x.grad = None
        for p in params:
            p.grad = None
        y = f(x)
        y.backward(dy)
        results.append([y.detach().float()] + [t.grad.detach().float() for t in [x] + params])
    for name, a, b in zip(["y", "dx", "dA", "dB"], *results):
        out[name] = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    return out


def run_case(in_f, out_f, base_kind, adapter_dtype):
    model = peft_layer(in_f, out_f, base_kind, adapter_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(TOKENS, in_f, device="cuda", dtype=DTYPE, requires_grad=True)
    dy = torch.randn(TOKENS, out_f, device="cuda", dtype=DTYPE)
    be = foak_compile.backend(inner="inductor")
    variants = {  # one set of weights for all: the same adapter grads are produced each time
        "eager_peft": model,
        "inductor": torch.compile(model),
        "foak_op": foak_op(model, base_kind),
        "foak_backend": torch.compile(model, backend=be),
    }
    return measure_variants(variants, model, x, dy, params, in_f, out_f, be)


def measure_variants(variants, model, x, dy, params, in_f, out_f, be):
    """Time fwd+bwd and fwd of each variant, its peak memory and base-GEMM TFLOP/s, foak's speedups
    over eager peft and inductor, what the backend matched, and the op's error vs eager."""
    res = {}
    for name, fn in variants.items():
        try:
            step = step_fn(fn, x, dy, params)
            res[name] = {"fwd_bwd_ms": round(bench_ms(step), 4), "peak_mb": round(peak_mb(step), 1)}
            with torch.no_grad():
                res[name]["fwd_ms"] = round(bench_ms(lambda: fn(x)), 4)
        except Exception as err:
            res[name] = {"error": repr(err), "trace": traceback.format_exc(limit=3)}
    flops = 2 * 2 * x.shape[0] * in_f * out_f  # base forward + dX (no dW: frozen); LoRA terms are O(r)
    for v in res.values():
        if "fwd_bwd_ms" in v:
            v["base_tflops"] = round(flops / v["fwd_bwd_ms"] / 1e9, 1)
    for base in ("eager_peft", "inductor"):
        for ours in ("foak_op", "foak_backend"):
            if "fwd_bwd_ms" in res.get(base, {}) and "fwd_bwd_ms" in res.get(ours, {}):
                res[f"{ours}_speedup_vs_{base}"] = round(res[base]["fwd_bwd_ms"] / res[ours]["fwd_bwd_ms"], 3)
    res["foak_backend_matches"] = foak_compile.total_counts(be.reports).get("lora", 0)
    res["foak_variants"] = [m.variant for r in be.reports for m in r.matches if m.pattern == "lora"]
    res["foak_near_misses"] = [m.reason for r in be.reports for m in r.near_misses if m.pattern == "lora"]
    try:
        res["rel_err_foak_op_vs_eager"] = check(variants["foak_op"], model, x, dy, params)
    except Exception as err:
        res["rel_err_foak_op_vs_eager"] = repr(err)
    return res


def dequant_case(in_f, out_f):
    """The dequantisation alone: foak's Triton kernel vs bitsandbytes' CUDA kernel (ms, GB/s written)."""
    bnb, _ = _bnb()
    w = torch.randn(out_f, in_f, device="cuda", dtype=DTYPE)
    q, qs = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = lambda: bnb4.dequantize_4bit(
        q,
        qs.absmax,
        64,
        "nf4",
        qs.shape,
        DTYPE,
        qs.state2.absmax,  # noqa: E731
        qs.state2.code,
        qs.offset,
        qs.state2.blocksize,
    )
    theirs = lambda: bnb.functional.dequantize_4bit(q, qs)  # noqa: E731
    exact = bool(torch.equal(ours(), theirs()))
    nbytes = out_f * in_f * (2 + 0.5)
    out = {"bit_exact_vs_bitsandbytes": exact}
    for name, fn in (("foak", ours), ("bitsandbytes", theirs)):
        ms = bench_ms(fn)
        out[name] = {"ms": round(ms, 4), "gbs": round(nbytes / ms / 1e6, 1)}
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/lora.json")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument(
        "--fp32-adapters",
        action="store_true",
        help="also time peft's default on a bf16 base: fp32 adapters (the op runs them in bf16)",
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_lora needs a CUDA GPU")
    bnb, why = _bnb()
    res = {
        "env": environment(),
        "tokens": TOKENS,
        "rank": RANK,
        "alpha": ALPHA,
        "dtype": "bfloat16",
        "nf4": why or "bitsandbytes NF4, double-quantised, blocksize 64",
        "cases": {},
    }
    if bnb is not None:
        res["env"]["bitsandbytes"] = getattr(bnb, "__version__", "?")
    adapter_dtypes = [torch.bfloat16] + ([torch.float32] if args.fp32_adapters else [])
    for name in args.shapes:
        in_f, out_f = SHAPES[name]
        case = res["cases"][name] = {}
        for adt in adapter_dtypes:
            tag = "bf16 adapters" if adt == torch.bfloat16 else "fp32 adapters"
            case[f"dense, {tag}"] = run_case(in_f, out_f, "dense", adt)
            write_json(args.out, res)  # partial results survive a later failure
            if bnb is None:
                case[f"nf4, {tag}"] = {"skipped": why}
            else:
                try:
                    case[f"nf4, {tag}"] = run_case(in_f, out_f, "nf4", adt)
                except Exception as err:
                    case[f"nf4, {tag}"] = {"error": repr(err), "trace": traceback.format_exc(limit=5)}
            write_json(args.out, res)
            torch._dynamo.reset()
        if bnb is not None:
            try:
                case["nf4 dequant only"] = dequant_case(in_f, out_f)
            except Exception as err:
                case["nf4 dequant only"] = {"error": repr(err)}
        write_json(args.out, res)


if __name__ == "__main__":
    main()
