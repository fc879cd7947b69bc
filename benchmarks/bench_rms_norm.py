"""RMSNorm forward+backward on a GPU: foak's kernel vs eager (HF LlamaRMSNorm) vs inductor's own
generated kernel. `python -m benchmarks.bench_rms_norm --out benchmarks/results/rms_norm.json`"""

import argparse

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import foak_compile  # noqa: F401
from foak_compile.kernels import rms_norm as kernel

from .common import bench_ms, copy_bandwidth_gbs, environment, graph_ms, write_json

SHAPES = {"8192x4096": (8192, 4096), "1B 4096x2048": (4096, 2048)}


class FoakNorm(torch.nn.Module):
    def __init__(self, ref):
        super().__init__()
        self.weight, self.eps = ref.weight, ref.variance_epsilon

    def forward(self, x):
        return torch.ops.foak.rms_norm(x, self.weight, self.eps, x.dtype, x.dtype)


def measure(module, x, dy, train_weight):
    """(fwd, fwd+bwd) GPU ms from CUDA-graph replays, plus fwd+bwd wall ms with launch overhead."""
    module.weight.requires_grad_(train_weight)

    def fwd():
        with torch.no_grad():
            module(x)

    def fwd_bwd():
        x.grad = None
        module.weight.grad = None
        module(x).backward(dy)

    return graph_ms(fwd), graph_ms(fwd_bwd), bench_ms(fwd_bwd)


def run(rows, hidden, dtype, peak_gbs):
    torch.manual_seed(0)
    ref = LlamaRMSNorm(hidden, eps=1e-6).to("cuda", dtype)
    with torch.no_grad():
        ref.weight.normal_()
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(rows, hidden, device="cuda", dtype=dtype)
    variants = {"eager": ref, "inductor": torch.compile(ref), "foak": FoakNorm(ref)}
    # correctness on the spot: foak vs eager in fp32 math terms
    with torch.no_grad():
        err = (variants["foak"](x).float() - ref(x).float()).abs().max().item()
    elem = x.element_size()
    fwd_bytes, fb_bytes = 2 * rows * hidden * elem, 5 * rows * hidden * elem  # fwd: x,y; bwd adds x,dy,dx
    out = {"rows": rows, "hidden": hidden, "dtype": str(dtype).split(".")[-1], "max_abs_diff_vs_eager": err}
    # frozen weight = the LoRA case (dx only); trained weight adds the dW reduction
    for train_weight in (False, True):
        case = out["weight_trained" if train_weight else "weight_frozen"] = {}
        for name, mod in variants.items():
            f, fb, wall = measure(mod, x, dy, train_weight)
            case[name] = {
                "fwd_ms": round(f, 4),
                "fwd_bwd_ms": round(fb, 4),
                "fwd_bwd_wall_ms": round(wall, 4),
                "fwd_gbs": round(fwd_bytes / f / 1e6, 1),
                "fwd_bwd_gbs": round(fb_bytes / fb / 1e6, 1),
                "fwd_pct_of_copy_bw": round(100 * fwd_bytes / f / 1e6 / peak_gbs, 1),
                "fwd_bwd_pct_of_copy_bw": round(100 * fb_bytes / fb / 1e6 / peak_gbs, 1),
            }
        for base in ("eager", "inductor"):
            case[f"foak_speedup_vs_{base}"] = {
                k: round(case[base][k] / case["foak"][k], 3) for k in ("fwd_ms", "fwd_bwd_ms")
            }
    return out


def sweep(rows, hidden, dtype):
    """Tile choices around the heuristic, to keep `_tile` and PER_SM honest (GPU ms per call)."""
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype)
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    dy = torch.randn_like(x)
    defaults = kernel._tile, kernel._dw_tile, kernel._dw_schedule
    bh = kernel._tile(hidden)[1]
    res = {
        "heuristic (tile, dw tile, dw per-SM/stages)": [
            kernel._tile(hidden),
            kernel._dw_tile(hidden),
            kernel._dw_schedule(hidden),
        ]
    }
    for br in (1, 2, 4, 8, 16, 32):
        for nw in (2, 4, 8, 16):
            if br * bh > 16384 or br * bh < 32 * nw:
                continue
            kernel._tile = kernel._dw_tile = lambda n, br=br, nw=nw: (br, bh, nw)
            try:
                row = [
                    graph_ms(lambda: kernel.rms_norm_forward(x, w, 1e-6, dtype, dtype)),
                    graph_ms(lambda: kernel.rms_norm_backward(dy, x, w, 1e-6, dtype, True, False)),
                ]
                for stages in (1, 2, 3):
                    for per_sm in (1, 2, 4):
                        kernel._dw_schedule = lambda n, s=(per_sm, stages): s
                        row.append(graph_ms(lambda: kernel.rms_norm_backward(dy, x, w, 1e-6, dtype, True, True)))
                res[f"R{br}_w{nw}: fwd, bwd, bwd+dw@(stages 1,2,3)x(1,2,4 per SM)"] = [round(t, 4) for t in row]
            finally:
                kernel._tile, kernel._dw_tile, kernel._dw_schedule = defaults
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/rms_norm.json")
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args()
    peak = copy_bandwidth_gbs()
    res = {"env": environment(), "copy_bandwidth_gbs": round(peak, 1), "cases": {}}
    for name, (rows, hidden) in SHAPES.items():
        res["cases"][name] = run(rows, hidden, torch.bfloat16, peak)
        if args.sweep:
            res["cases"][name]["tile_sweep"] = sweep(rows, hidden, torch.bfloat16)
    res["cases"]["qwen3 q_norm 4096*32x128"] = run(4096 * 32, 128, torch.bfloat16, peak)
    if args.sweep:
        res["cases"]["qwen3 q_norm 4096*32x128"]["tile_sweep"] = sweep(4096 * 32, 128, torch.bfloat16)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
