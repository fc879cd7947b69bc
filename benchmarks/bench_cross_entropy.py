"""lm_head + cross-entropy, loss and backward on a GPU: peak memory and time, bf16.

    eager     F.cross_entropy(F.linear(h, w).float(), y)   (what HF's causal-LM loss does)
    inductor  torch.compile of the same function
    liger     LigerFusedLinearCrossEntropyLoss, when liger_kernel is installed
    foak      the same function through foak's backend: linear_cross_entropy → the chunked op

Gradients are taken for the hidden states and the lm_head weight (full fine-tuning; --frozen
for the LoRA case, weight frozen). Peak memory is torch.cuda.max_memory_allocated during one
loss+backward, above what was allocated before it (inputs, no grads). Each method's loss
and grads are compared with eager's.

    python -m benchmarks.bench_cross_entropy --out $OUT/ce.json
"""
import argparse
import gc
import time

import torch
import torch.nn.functional as F

import foak_compile

from .common import bench_ms, environment, write_json

TOKENS = (4096, 16384)
VOCABS = (128256, 256000)
HIDDENS = (2048, 4096)
IGNORED = 0.25          # share of labels that are -100 (prompt / padding)
FIT_GB = 72             # leave headroom on an 80 GB card
REPS = 5


def loss_fn(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100)


def eager_peak_gb(n, v, hdim):
    """Eager's peak: bf16 logits, their fp32 copy and the saved fp32 log-softmax in the forward,
    then fp32 grads of the log-probs and logits plus their bf16 cast in the backward
    (about 14 bytes per logit), on top of weight, hidden states and their grads."""
    return (14 * n * v + 4 * (v + n) * hdim) / 2**30


def _methods():
    out = {"eager": lambda: loss_fn, "inductor": lambda: torch.compile(loss_fn, dynamic=False)}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        out["liger"] = lambda: (lambda h, w, y: liger(w, h, y))
    except Exception as err:  # not installed (or broken): reported, not fatal
        out["liger"] = f"skipped: liger_kernel unavailable ({type(err).__name__}: {err})"
    backends = []

    def foak():
        be = foak_compile.backend(patterns=["linear_cross_entropy", "cross_entropy"])
        backends.append(be)
        return torch.compile(loss_fn, backend=be, dynamic=False)
    out["foak"] = foak
    return out, backends


def _step(fn, h, w, y):
    h.grad = w.grad = None
    loss = fn(h, w, y)
    loss.backward()
    return loss


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def measure(fn, h, w, y, ref):
    """Peak GB above the inputs and median ms of loss+backward; errors against `ref`, the
    reference's results (None: this is the reference)."""
    t0 = time.time()
    _step(fn, h, w, y)  # compiles, autotunes, warms the allocator
    first_s = time.time() - t0
    h.grad = w.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = _step(fn, h, w, y)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    res = {"peak_gb": round(peak / 2**30, 3), "first_call_s": round(first_s, 1), "loss": loss.item()}
    if ref is None:  # keep the reference's results on the host, where they take no GPU memory
        ref = {"loss": loss.detach().float().cpu(), "h": h.grad.cpu(),
               "w": w.grad.cpu() if w.grad is not None else None}
    else:
        res["loss_rel_err"] = _rel(loss.detach().cpu(), ref["loss"])
        res["dh_rel_err"] = _rel(h.grad, ref["h"].cuda())
        if ref["w"] is not None:
            res["dw_rel_err"] = _rel(w.grad, ref["w"].cuda())
    res["ms"] = round(bench_ms(lambda: _step(fn, h, w, y), warmup=1, reps=REPS), 2)
    return res, ref


def run_case(n, v, hdim, frozen, total_gb):
    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(v, hdim, device="cuda", generator=g) / hdim ** 0.5).to(torch.bfloat16)
    w.requires_grad_(not frozen)
    h = torch.randn(n, hdim, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[torch.rand(n, device="cuda", generator=g) < IGNORED] = -100
    case = {"tokens": n, "vocab": v, "hidden": hdim, "eager_peak_estimate_gb": round(eager_peak_gb(n, v, hdim), 1)}
    methods, backends = _methods()
    ref = None  # the first method measured (eager, unless it was skipped) is the reference
    for name, make in methods.items():
        if isinstance(make, str):
            case[name] = make
            continue
        if name == "eager" and eager_peak_gb(n, v, hdim) > min(FIT_GB, total_gb * 0.9):
            case[name] = "skipped: does not fit"
            continue
        try:
            case[name], ref = measure(make(), h, w, y, ref)
            case.setdefault("errors_against", name)
        except torch.cuda.OutOfMemoryError:
            case[name] = "out of memory"
        finally:
            h.grad = w.grad = None
            gc.collect()
            torch.cuda.empty_cache()
    if backends:
        case["foak_matches"] = foak_compile.total_counts(backends[-1].reports)
    for name in ("inductor", "liger", "foak"):
        if isinstance(case.get(name), dict) and isinstance(case.get("eager"), dict):
            ours, eager = case[name], case["eager"]
            case[f"{name}_vs_eager"] = {"memory_x": round(eager["peak_gb"] / max(ours["peak_gb"], 1e-9), 2),
                                        "speedup_x": round(eager["ms"] / ours["ms"], 3)}
    print(case, flush=True)
    return case


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/cross_entropy.json")
    p.add_argument("--frozen", action="store_true", help="lm_head weight frozen (LoRA): no weight grad")
    args = p.parse_args()
    total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    res = {"env": environment(), "dtype": "bfloat16", "weight_grad": not args.frozen,
           "ignored_label_share": IGNORED, "cases": []}
    t0 = time.time()
    for hdim in HIDDENS:
        for v in VOCABS:
            for n in TOKENS:
                res["cases"].append(run_case(n, v, hdim, args.frozen, total_gb))
    res["total_s"] = round(time.time() - t0, 1)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
