"""Host time of the online linear + CE path's per-piece work (CUDA only): what bounds it where the GPU
waits (benchmarks/results/session8/lce_profile.json: GPU busy 5.6 of 9.5 ms at 4096 × 128256 × 2048).

1. Each call of a piece on tiny tensors (the GPU's work negligible, so host µs per call): the logits
   GEMM, the `_piece` launch, the fp32-accumulating GEMM, and a whole piece as forward_backward runs it.
2. The profiler's CPU table (self time per op) of the compiled loss + backward at 4096 × 128256 × 2048.

    python -m benchmarks.host_overhead --out $OUT/host_overhead.json
"""

import argparse
import time

import torch

import foak_compile
from foak_compile.kernels import cross_entropy as kernel
from foak_compile.kernels import cross_entropy_online as online

from .bench_cross_entropy import _inputs, _step, loss_fn
from .common import environment, write_json


def host_us(fn, n=400):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = time.perf_counter() - t0
    torch.cuda.synchronize()
    return round(t / n * 1e6, 1)


def per_op():
    r, hdim, width = 16, 64, 256
    dt = torch.bfloat16
    h = torch.randn(r, hdim, device="cuda", dtype=dt)
    w = torch.randn(16 * width, hdim, device="cuda", dtype=dt)
    wp, wpt = w[:width], w[:width].t()
    piece = torch.empty(r, width, device="cuda", dtype=dt)
    acc = torch.zeros(r, hdim, device="cuda")
    y = torch.randint(0, width, (r,), device="cuda")
    state = torch.zeros(r, 5, device="cuda")
    epi_vals = torch.ones(5, device="cuda")
    args = dict(EPI=0, TAU=20.0, BLOCK=256, BLOCK_H=64, num_warps=4)
    out = {
        "mm_out": host_us(lambda: torch.mm(h, wpt, out=piece)),
        "mm_out_slicing_each_call": host_us(lambda: torch.mm(h, w[0:width].t(), out=piece)),
        "piece_kernel": host_us(
            lambda: online._piece[(r,)](piece, y, state, acc, epi_vals, width, 0, hdim, -100, **args)
        ),
        "addmm_dtype_out": host_us(lambda: online._addmm_fp32_ops(acc, piece, wp)),
        "mm_dtype_out": host_us(lambda: online._mm_fp32_ops(piece, wp, acc)),
        "addmm_out_dtype_public": host_us(lambda: online._addmm_fp32_public(acc, piece, wp)),
        "mm_out_dtype_public": host_us(lambda: online._mm_fp32_public(piece, wp, acc)),
        "accumulate": host_us(lambda: online._accumulate(acc, piece, wp, first=False)),
        "empty_kernel_baseline_fill": host_us(lambda: acc.fill_(0.0)),
    }
    scale = torch.ones(1, device="cuda")
    yy = torch.randint(0, 16 * width, (r,), device="cuda")
    hh = h.clone()
    for pieces in (16, 64):
        ww = torch.randn(pieces * width, hdim, device="cuda", dtype=dt)
        us = host_us(lambda: online.forward_backward(hh, ww, None, yy, -100, scale, None, cols=width), n=50)
        out[f"forward_backward_{pieces}_pieces_us_per_piece"] = round(us / pieces, 1)
    return out


def cpu_table():
    n, v, hdim = 4096, 128256, 2048
    h, w, y = _inputs(n, v, hdim, frozen=True)
    torch._dynamo.reset()
    fn = torch.compile(loss_fn, backend=foak_compile.backend(patterns=["linear_cross_entropy"]), dynamic=False)
    foak_compile.config.configure(lce_online=True)
    try:
        for _ in range(3):
            _step(fn, h, w, y)
        torch.cuda.synchronize()
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            for _ in range(3):
                _step(fn, h, w, y)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
        t0 = time.perf_counter()
        for _ in range(5):
            _step(fn, h, w, y)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 5 * 1e3
        kernel_wall = []
        scale = (1.0 / (y != -100).sum()).float().reshape(1)
        for _ in range(6):
            t0 = time.perf_counter()
            kernel.linear_cross_entropy_forward_backward(
                h.detach(), w, None, y, -100, 0.0, scale, True, False, False, online=True
            )
            torch.cuda.synchronize()
            kernel_wall.append((time.perf_counter() - t0) * 1e3)
    finally:
        foak_compile.config.reset()
    return {"case_wall_ms": round(wall, 2), "kernel_wall_ms": [round(t, 2) for t in kernel_wall[1:]], "table": table}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    res = {"env": environment(), "per_op_host_us": per_op()}
    print(res, flush=True)
    res["cpu_profile"] = cpu_table()
    print(res["cpu_profile"]["table"], flush=True)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
