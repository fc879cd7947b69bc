"""Where the time of the 4096-token linear + cross-entropy goes (CUDA only), and what other tilings cost.

Per shape (4096 tokens, vocab 128256 / 256000, hidden 2048 / 4096, bf16, 25 % of labels ignored) and
lm_head trained / frozen:
- kernel level (kernels.cross_entropy.linear_cross_entropy_forward_backward: all the work but the
  backward's scaling), each path that applies: median ms (CUDA events), peak, and the profiler's GPU
  time per kernel name, so that GPU-busy time can be set against the elapsed time (a gap is host
  time: launches, syncs);
- case level (bench_cross_entropy's loss + backward, torch.compile with the foak backend; inductor
  beside it), profiled the same way, to see what the compiled call adds;
- frozen: the online path per (rows per block, columns per piece); trained: the chunked path per
  chunk size.
Peaks are above the inputs, outputs included, as bench_cross_entropy's case rows count them.

    python -m benchmarks.profile_lce --out $OUT/lce_profile.json
"""

import argparse
import gc
import time
from collections import defaultdict

import torch

import foak_compile
from foak_compile.kernels import cross_entropy as kernel
from foak_compile.kernels import cross_entropy_online as online

from .bench_cross_entropy import _inputs, _kernel_ms_and_peak, _step, loss_fn
from .common import bench_ms, environment, write_json

SHAPES = [(4096, v, h) for h in (2048, 4096) for v in (128256, 256000)]
ONLINE_TILES = [(r, c) for r in (512, 768, 1024, 1536, 2048) for c in (4096, 8192, 12288, 16384)]
CHUNK_ROWS = (256, 384, 512, 768, 1024)


def profile(fn, reps=3):
    """GPU ms per kernel name (per call, over `reps` calls) and the calls' host ms."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / reps
    per = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name][0] += ev.device_time_total / 1e3 / reps
            per[ev.name][1] += 1
    busy = sum(t for t, _ in per.values())
    top = sorted(per.items(), key=lambda kv: -kv[1][0])[:10]
    return {
        "wall_ms": round(wall, 2),
        "gpu_busy_ms": round(busy, 2),
        "kernels": [{"name": k[:90], "ms": round(t, 3), "launches": n // reps} for k, (t, n) in top],
    }


def _measured(fn):
    ms, peak = _kernel_ms_and_peak(fn)
    return {"ms": round(ms, 2), "peak_gb": round(peak / 2**30, 3)}


def case_level(h, w, y, frozen):
    """Loss + backward compiled: inductor, foak (default) and, frozen, foak with each path forced."""
    torch._dynamo.reset()
    out = {}
    h = h.detach().requires_grad_(True)
    w = w.detach().requires_grad_(not frozen)
    foak = torch.compile(
        loss_fn, backend=foak_compile.backend(patterns=["linear_cross_entropy", "cross_entropy"]), dynamic=False
    )  # the path is picked per call: one compile serves the forced rows
    variants = {"inductor": (torch.compile(loss_fn, dynamic=False), None), "foak": (foak, None)}
    if frozen:
        variants.update(foak_online=(foak, True), foak_chunked=(foak, False))
    for name, (fn, flag) in variants.items():
        foak_compile.config.configure(lce_online=flag)  # None: by size
        try:

            def step():
                return _step(fn, h, w, y)

            step()
            out[name] = {"ms": round(bench_ms(step, warmup=1, reps=5), 2), "profile": profile(step)}
        finally:
            foak_compile.config.reset()
            h.grad = w.grad = None
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    res = {"env": environment(), "cases": []}
    t_start = time.time()
    for n, v, hdim in SHAPES:
        for frozen in (True, False):
            h, w, y = _inputs(n, v, hdim, frozen)
            scale = (1.0 / (y != -100).sum()).float().reshape(1)
            hd, wd = h.detach(), w.detach()
            case = {"tokens": n, "vocab": v, "hidden": hdim, "weight_grad": not frozen}

            def call(online_flag=None):
                return kernel.linear_cross_entropy_forward_backward(
                    hd, wd, None, y, -100, 0.0, scale, True, not frozen, False, online=online_flag
                )

            paths = {"online": True, "chunked": False} if frozen else {"chunked": None}
            for name, flag in paths.items():
                case[f"kernel_{name}"] = dict(_measured(lambda: call(flag)), profile=profile(lambda: call(flag)))
            rows = []
            if frozen:
                saved = online.ROWS, online.COLS
                try:
                    for r, c in ONLINE_TILES:
                        online.ROWS, online.COLS = r, c
                        rows.append(dict(path="online", rows=r, cols=c, **_measured(lambda: call(True))))
                finally:
                    online.ROWS, online.COLS = saved
            else:
                saved = kernel.CHUNK_ELEMENTS
                try:
                    for r in CHUNK_ROWS:
                        kernel.CHUNK_ELEMENTS = r * v
                        rows.append(dict(path="chunked", rows=r, **_measured(call)))
                finally:
                    kernel.CHUNK_ELEMENTS = saved
            case["tilings"] = rows
            case["case_level"] = case_level(h, w, y, frozen)
            print(case, flush=True)
            res["cases"].append(case)
            del h, w, y, hd, wd
            gc.collect()
            torch.cuda.empty_cache()
    res["total_s"] = round(time.time() - t_start, 1)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
