"""lm_head + cross-entropy, loss and backward on a GPU: peak memory and time, bf16.

    eager     F.cross_entropy(F.linear(h, w).float(), y)   (what HF's causal-LM loss does)
    inductor  torch.compile of the same function
    liger     LigerFusedLinearCrossEntropyLoss, when liger_kernel is installed
    foak      the same function through foak's backend: linear_cross_entropy → the op, which picks
              the token-chunked or (frozen lm_head, by size) the vocabulary-tiled online path
    foak_chunked / foak_online  (frozen lm_head only) the same with the path forced
              (FOAK_LCE_ONLINE=0 / 1; kernels/cross_entropy.py / cross_entropy_online.py)

Both cases are run: gradients for the hidden states and the lm_head weight (full fine-tuning,
"weight_grad": true) and for the hidden states only (LoRA: the lm_head is frozen). Peak memory
is torch.cuda.max_memory_allocated during one loss+backward, above what was allocated before
it (inputs, no grads). Each method's loss and grads are compared with eager's.

--softcap C measures Gemma 2's loss instead: F.cross_entropy((C·tanh(F.linear(h, w) / C)).float(), y),
which foak fuses whole (the softcap applied inside its kernels) and Liger takes as its `softcap`.

--sweep adds, before the cases, the tuning data the defaults come from: the row kernel's
bandwidth per BLOCK_V / num_warps, and the op's time and peak per chunk size (rows), with
and without dropping the ignored rows. --online-sweep: the online path's time and peak per
(rows per block, vocabulary columns per piece), frozen lm_head.

    python -m benchmarks.bench_cross_entropy --out $OUT/ce.json [--sweep] [--modes trained frozen]
        [--softcap 30] [--tokens 4096 16384] [--vocabs 128256 256000] [--hiddens 2048 4096]
"""

import argparse
import gc
import itertools
import json
import os
import time

import torch
import torch.nn.functional as F

import foak_compile

from foak_compile.kernels import cross_entropy as kernel
from foak_compile.kernels import cross_entropy_online as online

from .common import bench_ms, copy_bandwidth_gbs, environment

TOKENS = (4096, 16384)
VOCABS = (128256, 256000)
HIDDENS = (2048, 4096)
IGNORED = 0.25  # share of labels that are -100 (prompt / padding)
FIT_GB = 72  # leave headroom on an 80 GB card
REPS = 5
FORCED = ("foak_chunked", "foak_online")  # frozen lm_head: foak with its path forced


SOFTCAP = 0.0  # --softcap


def loss_fn(h, w, y):
    logits = F.linear(h, w)
    if SOFTCAP:
        logits = torch.tanh(logits / SOFTCAP) * SOFTCAP
    return F.cross_entropy(logits.float(), y, ignore_index=-100)


def eager_peak_gb(n, v, hdim):
    """Eager's peak: bf16 logits, their fp32 copy and the saved fp32 log-softmax in the forward,
    then fp32 grads of the log-probs and logits plus their bf16 cast in the backward
    (about 14 bytes per logit), on top of weight, hidden states and their grads."""
    return (14 * n * v + 4 * (v + n) * hdim) / 2**30


def _methods():
    out = {"eager": lambda: loss_fn, "inductor": lambda: torch.compile(loss_fn, dynamic=False)}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, **({"softcap": SOFTCAP} if SOFTCAP else {}))
        out["liger"] = lambda: lambda h, w, y: liger(w, h, y)
    except Exception as err:  # not installed (or broken): reported, not fatal
        out["liger"] = f"skipped: liger_kernel unavailable ({type(err).__name__}: {err})"
    backends = []

    def foak():
        be = foak_compile.backend(patterns=["linear_cross_entropy", "cross_entropy"])
        backends.append(be)
        return torch.compile(loss_fn, backend=be, dynamic=False)

    out["foak"] = foak

    def forced(flag):
        def make():
            compiled = foak()

            def fn(h, w, y):
                with foak_compile.config.patch(lce_online=flag):
                    return compiled(h, w, y)

            return fn

        return make

    out["foak_chunked"], out["foak_online"] = forced(False), forced(True)
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
        ref = {
            "loss": loss.detach().float().cpu(),
            "h": h.grad.cpu(),
            "w": w.grad.cpu() if w.grad is not None else None,
        }
    else:
        res["loss_rel_err"] = _rel(loss.detach().cpu(), ref["loss"])
        res["dh_rel_err"] = _rel(h.grad, ref["h"].cuda())
        if ref["w"] is not None:
            res["dw_rel_err"] = _rel(w.grad, ref["w"].cuda())
    res["ms"] = round(bench_ms(lambda: _step(fn, h, w, y), warmup=1, reps=REPS), 2)
    return res, ref


def _inputs(n, v, hdim, frozen):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(v, hdim, device="cuda", generator=g) / hdim**0.5).to(torch.bfloat16)
    w.requires_grad_(not frozen)
    h = torch.randn(n, hdim, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[torch.rand(n, device="cuda", generator=g) < IGNORED] = -100
    return h, w, y


def run_case(n, v, hdim, frozen, total_gb):
    torch._dynamo.reset()
    h, w, y = _inputs(n, v, hdim, frozen)
    case = {
        "tokens": n,
        "vocab": v,
        "hidden": hdim,
        "weight_grad": not frozen,
        "eager_peak_estimate_gb": round(eager_peak_gb(n, v, hdim), 1),
        "foak_chunk_rows": kernel.chunk_rows(n, v, hdim),
    }
    methods, backends = _methods()
    ref = None  # the first method measured (eager, unless it was skipped) is the reference
    for name, make in methods.items():
        if isinstance(make, str):
            case[name] = make
            continue
        if name in FORCED and not frozen:
            continue  # only a frozen lm_head has the choice
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
    for name in ("inductor", "liger", "foak") + FORCED:
        if isinstance(case.get(name), dict) and isinstance(case.get("eager"), dict):
            ours, eager = case[name], case["eager"]
            case[f"{name}_vs_eager"] = {
                "memory_x": round(eager["peak_gb"] / max(ours["peak_gb"], 1e-9), 2),
                "speedup_x": round(eager["ms"] / ours["ms"], 3),
            }
    for ours in ("foak",) + FORCED:  # the targets: memory at or below liger's, time at or below inductor's
        foak = case.get(ours)
        if not isinstance(foak, dict):
            continue
        for name in ("inductor", "liger"):
            if isinstance(case.get(name), dict):
                case[f"{ours}_vs_{name}"] = {
                    "peak_ratio": round(foak["peak_gb"] / max(case[name]["peak_gb"], 1e-9), 3),
                    "time_ratio": round(foak["ms"] / case[name]["ms"], 3),
                }
        case["targets_met" if ours == "foak" else f"{ours}_targets_met"] = {
            "memory_le_liger": foak["peak_gb"] <= case["liger"]["peak_gb"]
            if isinstance(case.get("liger"), dict)
            else None,
            "time_le_inductor": foak["ms"] <= case["inductor"]["ms"]
            if isinstance(case.get("inductor"), dict)
            else None,
        }
    print(case, flush=True)
    return case


KERNEL_CONFIGS = [(b, w) for b in (2048, 4096, 8192) for w in (4, 8, 16)]
PROGRAMS_PER_SM = (None, 1, 2, 4)  # None: one program per row
SWEEP_ROWS = (256, 512, 1024, 2048)


def kernel_sweep(copy_gbs):
    """The row kernel alone on one chunk of logits: loss only (reads it once) and loss + dlogits
    in place (reads it twice, writes it once); GB/s of those bytes, % of the copy bandwidth."""
    out = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for v in VOCABS:
        for rows in (512, 1024):
            x = torch.randn(rows, v, device="cuda", dtype=torch.bfloat16)
            y = torch.randint(0, v, (rows,), device="cuda")
            loss, lse = torch.empty(rows, device="cuda"), torch.empty(rows, device="cuda")
            scale = torch.ones(1, device="cuda")
            nbytes = x.numel() * x.element_size()
            for (block, warps), per_sm in itertools.product(KERNEL_CONFIGS, PROGRAMS_PER_SM):
                programs = per_sm and per_sm * sms

                def fwd():
                    kernel._forward_rows(x, y, -100, 0.0, loss, lse, block_v=block, num_warps=warps, programs=programs)

                def fwd_grad():
                    kernel._forward_rows(
                        x, y, -100, 0.0, loss, lse, block_v=block, num_warps=warps, grad_scale=scale, programs=programs
                    )

                f_ms, fg_ms = bench_ms(fwd, warmup=2, reps=10), bench_ms(fwd_grad, warmup=2, reps=10)
                out.append(
                    {
                        "rows": rows,
                        "vocab": v,
                        "block_v": block,
                        "num_warps": warps,
                        "programs": programs,
                        "fwd_ms": round(f_ms, 4),
                        "fwd_gbs": round(nbytes / f_ms / 1e6),
                        "fwd_grad_ms": round(fg_ms, 4),
                        "fwd_grad_gbs": round(3 * nbytes / fg_ms / 1e6),
                        "fwd_grad_pct_of_copy": round(100 * 3 * nbytes / fg_ms / 1e6 / copy_gbs, 1),
                    }
                )
            print(out[-1], flush=True)
            del x
    return out


def _kernel_ms_and_peak(fn):
    """(median ms, peak bytes above what was allocated before) of a kernel-level call, warmed up once."""
    fn()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    res = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del res
    return bench_ms(fn, warmup=1, reps=3), peak


def chunk_sweep():
    """The fused forward+gradients (kernel level: all the work but the backward's scaling) per
    chunk size; peak above the inputs, i.e. the gradients plus the chunk and its temporaries."""
    out = []
    saved = kernel.CHUNK_ELEMENTS, kernel.COMPACT
    try:
        for hdim in HIDDENS:
            for v in VOCABS:
                for n in TOKENS:
                    h, w, y = _inputs(n, v, hdim, frozen=False)
                    h, w = h.detach(), w.detach()
                    scale = (1.0 / (y != -100).sum()).float().reshape(1)
                    for frozen in (False, True):
                        # None: the default policy, also without dropping the ignored rows (the
                        # time when no label is ignored)
                        for rows, compact in [(r, True) for r in SWEEP_ROWS] + [(None, True), (None, False)]:
                            kernel.CHUNK_ELEMENTS, kernel.COMPACT = rows and rows * v, compact

                            def fn():
                                return kernel.linear_cross_entropy_forward_backward(
                                    h, w, None, y, -100, 0.0, scale, True, not frozen, False
                                )

                            ms, peak = _kernel_ms_and_peak(fn)
                            out.append(
                                {
                                    "tokens": n,
                                    "vocab": v,
                                    "hidden": hdim,
                                    "weight_grad": not frozen,
                                    "chunk_rows": kernel.chunk_rows(n, v, hdim),
                                    "default": rows is None,
                                    "compact": compact,
                                    "ms": round(ms, 2),
                                    "peak_gb": round(peak / 2**30, 3),
                                }
                            )
                            print(out[-1], flush=True)
                    del h, w, y
                    gc.collect()
                    torch.cuda.empty_cache()
    finally:
        kernel.CHUNK_ELEMENTS, kernel.COMPACT = saved
    return out


# (rows per block, columns per piece); rows None: as many as online.BUDGET holds at those columns
ONLINE_SWEEP = [(r, c) for r in (1024, 2048, 4096) for c in (2048, 4096, 8192)]
ONLINE_SWEEP += [(None, c) for c in (8192, 16384, 32768, 65536)]


def online_sweep(tokens, vocabs, hiddens):
    """The online path (frozen lm_head, kernel level) per (rows per block, columns per piece),
    beside the chunked path's default, on the same inputs."""
    out = []
    saved = online.ROWS, online.COLS
    try:
        for hdim in hiddens:
            for v in vocabs:
                for n in tokens:
                    h, w, y = _inputs(n, v, hdim, frozen=True)
                    h = h.detach()
                    scale = (1.0 / (y != -100).sum()).float().reshape(1)
                    for path, rows, cols in [("chunked", None, None)] + [("online", *t) for t in ONLINE_SWEEP]:
                        if path == "online":
                            online.ROWS, online.COLS = rows, cols

                        def fn():
                            return kernel.linear_cross_entropy_forward_backward(
                                h, w, None, y, -100, 0.0, scale, True, False, False, online=path == "online"
                            )

                        ms, peak = _kernel_ms_and_peak(fn)
                        if path == "online" and rows is None:  # the budget's rows, as the path picked them
                            rows = f"budget:{online.block_rows(int((y != -100).sum()), v, hdim, h.element_size())}"
                        out.append(
                            {
                                "tokens": n,
                                "vocab": v,
                                "hidden": hdim,
                                "path": path,
                                "rows": rows,
                                "cols": cols,
                                "ms": round(ms, 2),
                                "peak_gb": round(peak / 2**30, 3),
                            }
                        )
                        print(out[-1], flush=True)
                    del h, w, y
                    gc.collect()
                    torch.cuda.empty_cache()
    finally:
        online.ROWS, online.COLS = saved
    return out


def _save(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def _summary(case):
    cols = [f"{case['tokens']}x{case['vocab']}x{case['hidden']} {'trained' if case['weight_grad'] else 'frozen '}"]
    for name in ("eager", "inductor", "liger", "foak") + FORCED:
        r = case.get(name)
        cols.append(f"{name} {r['ms']:.1f}ms/{r['peak_gb']:.2f}GB" if isinstance(r, dict) else f"{name} -")
    r = case.get("foak")
    if isinstance(r, dict):
        cols.append(
            f"err loss {r.get('loss_rel_err', 0):.1e} dh {r.get('dh_rel_err', 0):.1e} "
            f"dw {r.get('dw_rel_err', 0) if 'dw_rel_err' in r else float('nan'):.1e}"
        )
    return " | ".join(cols)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/cross_entropy.json")
    p.add_argument(
        "--modes",
        nargs="*",
        choices=("trained", "frozen"),
        default=["trained", "frozen"],
        help="trained: weight and hidden grads; frozen (LoRA): hidden grads only; none given: no cases (sweeps only)",
    )
    p.add_argument("--frozen", action="store_true", help="only the frozen case (= --modes frozen)")
    p.add_argument("--sweep", action="store_true", help="also the kernel and chunk-size sweeps")
    p.add_argument("--online-sweep", action="store_true", help="also the online path's rows × columns sweep")
    p.add_argument(
        "--online-cols",
        type=int,
        default=None,
        help="vocabulary columns per piece of the online path (online.COLS) for the whole run",
    )
    p.add_argument("--softcap", type=float, default=0.0, help="Gemma 2's final-logit softcap between lm_head and loss")
    p.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    p.add_argument("--vocabs", type=int, nargs="+", default=VOCABS)
    p.add_argument("--hiddens", type=int, nargs="+", default=HIDDENS)
    args = p.parse_args()
    global SOFTCAP
    SOFTCAP = args.softcap
    modes = ["frozen"] if args.frozen else args.modes
    if args.online_cols:
        online.COLS = args.online_cols
    total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    res = {
        "env": environment(),
        "dtype": "bfloat16",
        "ignored_label_share": IGNORED,
        "softcap": SOFTCAP,
        "copy_bandwidth_gbs": round(copy_bandwidth_gbs(), 1),
        "foak_chunk_rows_min_max": [kernel.CHUNK_ROWS_MIN, kernel.CHUNK_ROWS_MAX],
        "online_cols": online.COLS,
        "cases": [],
    }
    t0 = time.time()
    if args.sweep:
        res["kernel_sweep"] = kernel_sweep(res["copy_bandwidth_gbs"])
        _save(args.out, res)
        res["chunk_sweep"] = chunk_sweep()
        _save(args.out, res)
    if args.online_sweep:
        res["online_sweep"] = online_sweep(args.tokens, args.vocabs, args.hiddens)
        _save(args.out, res)
    for mode in modes:
        for hdim in args.hiddens:
            for v in args.vocabs:
                for n in args.tokens:
                    res["cases"].append(run_case(n, v, hdim, mode == "frozen", total_gb))
                    _save(args.out, res)
    res["total_s"] = round(time.time() - t0, 1)
    _save(args.out, res)
    print("\n".join(_summary(c) for c in res["cases"]))


if __name__ == "__main__":
    main()
