"""A/B of the online linear + CE path's host-side choices, in one call (CUDA only): the fp32 GEMMs through
torch's C++ binding (out_dtype) or torch.ops' Python overloads, and the rows per block from the budget or
fixed at 1024; frozen lm_head, 4096 tokens (the host-bound shapes), kernel level (ms, GPU-busy ms, peak)
and case level (compiled loss + backward, inductor beside it), each variant measured in the same process.

    python -m benchmarks.ab_online --out $OUT/ab_online.json
"""

import argparse
import gc
import time

import torch

import foak_compile
from foak_compile.kernels import cross_entropy as kernel
from foak_compile.kernels import cross_entropy_online as online

from .bench_cross_entropy import _inputs, _kernel_ms_and_peak, _step, loss_fn
from .common import bench_ms, environment, write_json
from .profile_lce import profile

SHAPES = [(4096, v, h) for h in (2048, 4096) for v in (128256, 256000)]
GEMMS = {
    "public": (online._mm_fp32_public, online._addmm_fp32_public),
    "ops": (online._mm_fp32_ops, online._addmm_fp32_ops),
}
ROWS = {"budget": None, "1024": 1024}


def variants():
    for g, fns in GEMMS.items():
        for r, rows in ROWS.items():
            yield f"{g}_{r}", fns, rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    res = {"env": environment(), "cases": []}
    t0 = time.time()
    saved = online._mm_fp32, online._addmm_fp32, online.ROWS
    try:
        for n, v, hdim in SHAPES:
            h, w, y = _inputs(n, v, hdim, frozen=True)
            scale = (1.0 / (y != -100).sum()).float().reshape(1)
            case = {"tokens": n, "vocab": v, "hidden": hdim, "kept_rows": int((y != -100).sum())}
            torch._dynamo.reset()
            ind = torch.compile(loss_fn, dynamic=False)
            foak = torch.compile(
                loss_fn, backend=foak_compile.backend(patterns=["linear_cross_entropy"]), dynamic=False
            )
            foak_compile.config.configure(lce_online=True)
            for fn in (ind, foak):  # compile both before anything is timed
                _step(fn, h, w, y)
            case["inductor_case_ms"] = round(bench_ms(lambda: _step(ind, h, w, y), warmup=1, reps=7), 2)
            for name, (mm, addmm), rows in variants():
                online._mm_fp32, online._addmm_fp32, online.ROWS = mm, addmm, rows

                def call():
                    return kernel.linear_cross_entropy_forward_backward(
                        h.detach(), w, None, y, -100, 0.0, scale, True, False, False, online=True
                    )

                ms, peak = _kernel_ms_and_peak(call)
                prof = profile(call)
                case[name] = {
                    "kernel_ms": round(ms, 2),
                    "peak_gb": round(peak / 2**30, 3),
                    "gpu_busy_ms": prof["gpu_busy_ms"],
                    "wall_ms": prof["wall_ms"],
                    "case_ms": round(bench_ms(lambda: _step(foak, h, w, y), warmup=1, reps=7), 2),
                }
                h.grad = None
            print(case, flush=True)
            res["cases"].append(case)
            del h, w, y
            gc.collect()
            torch.cuda.empty_cache()
    finally:
        online._mm_fp32, online._addmm_fp32, online.ROWS = saved
        foak_compile.config.reset()
    res["total_s"] = round(time.time() - t0, 1)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
