"""Shared GPU timing helpers for the benchmarks (CUDA only)."""

import json
import os
import platform
import re
import statistics

import torch


def bench_ms(fn, warmup=5, reps=30):
    """Median milliseconds of fn() measured with CUDA events, L2 flushed between reps."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def graph_ms(fn, reps=50):
    """Median milliseconds of one replay of a CUDA graph of fn(): GPU time without launch gaps,
    so memory-bound kernels are compared on what they move, not on Python overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return bench_ms(g.replay, warmup=3, reps=reps)


def copy_bandwidth_gbs(nbytes=2 * 2**30):
    """Measured DRAM bandwidth: a device-to-device copy, bytes read + written."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a), warmup=3, reps=10)
    return 2 * a.numel() / ms / 1e6


def environment():
    import triton
    import transformers
    import peft

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def device_slug(gpu=None):
    """A short file name for a device ("NVIDIA H100 80GB HBM3" -> "h100"): results are kept per device."""
    gpu = (gpu or environment()["gpu"]).lower()
    for known in ("h200", "h100", "a100", "gb200", "b200", "l40s", "l4", "a10g", "mi300x"):
        if known in gpu:
            return known
    return re.sub(r"[^a-z0-9]+", "_", gpu.removeprefix("nvidia ")).strip("_") or "cpu"


def write_json(path, data, echo=True):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    if echo:
        print(json.dumps(data, indent=1))
