"""How fast can a linear + cross-entropy with a trained lm_head be, by its GEMMs alone? (CUDA only)

Issue 4's targets for the trained lm_head at 4096 tokens are inductor's time and Liger's peak
memory (its 128-row chunk of logits beside dW and dh). Any exact design is bounded below by the
GEMMs it must run, so this times only those, on the same host as inductor's whole loss+backward:

    inductor       inductor's compiled loss + backward (all rows; its logits are materialised)
    gemm3_all      the three GEMMs over all rows: logits h·Wᵀ, dh = G·W, dW = Gᵀ·h
    gemm3_kept     the same over the kept rows only (25 % ignored: what row-dropping saves)
    gemm3_chunk_R  the three GEMMs in R-row chunks of the kept rows, dW accumulated in place
                   (beta = 1): the token-chunked design at R rows (R = 128: Liger's memory)
    gemm4_kept     four GEMMs over the kept rows: logits twice (once for the lse, once for G),
                   dh, dW: a design that holds no whole-vocabulary chunk (vocabulary tiles, or
                   a fused GEMM + loss kernel) can do no fewer at cuBLAS speed

No softmax is computed: G is just a bf16 buffer, so every row is a lower bound on its design.

    python -m benchmarks.gemm_bound --out $OUT/gemm_bound.json [--shapes 16384x256000x2048 ...]
"""

import argparse

import torch

from . import bench_cross_entropy as ce
from .common import bench_ms, environment, write_json

SHAPES = [(4096, 128256, 2048), (4096, 256000, 2048), (4096, 128256, 4096), (4096, 256000, 4096)]
CHUNKS = (128, 256, 512)


def gemm_rows(n, v, hdim, kept):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(v, hdim, device="cuda", generator=g) / hdim**0.5).to(torch.bfloat16)
    h = torch.randn(n, hdim, device="cuda", generator=g, dtype=torch.bfloat16)
    hk = h[:kept]
    dw = torch.empty_like(w)
    out = {}

    def three(x):
        logits = x @ w.t()
        x_grad = logits @ w
        torch.mm(logits.t(), x, out=dw)
        return x_grad

    def chunked(r):
        def fn():
            buf = torch.empty(r, v, dtype=torch.bfloat16, device="cuda")
            dh = torch.empty_like(hk)
            for s in range(0, kept, r):
                e = min(kept, s + r)
                piece = buf[: e - s]
                torch.mm(hk[s:e], w.t(), out=piece)
                torch.mm(piece, w, out=dh[s:e])
                if s == 0:
                    torch.mm(piece.t(), hk[s:e], out=dw)
                else:
                    dw.addmm_(piece.t(), hk[s:e])
            return dh

        return fn

    def four():
        (hk @ w.t()).amax()  # the lse's pass (its reduction stands in for the loss)
        return three(hk)

    out["gemm3_all"] = bench_ms(lambda: three(h), warmup=2, reps=10)
    out["gemm3_kept"] = bench_ms(lambda: three(hk), warmup=2, reps=10)
    for r in CHUNKS:
        out[f"gemm3_chunk_{r}"] = bench_ms(chunked(r), warmup=2, reps=10)
    out["gemm4_kept"] = bench_ms(four, warmup=2, reps=10)
    return {k: round(t, 2) for k, t in out.items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/gemm_bound.json")
    p.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        metavar="TOKENSxVOCABxHIDDEN",
        help="instead of SHAPES, e.g. 16384x256000x2048",
    )
    args = p.parse_args()
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    rows = []
    for n, v, hdim in shapes:
        h, w, y = ce._inputs(n, v, hdim, frozen=False)
        kept = int((y != -100).sum())
        inductor = ce._methods()[0]["inductor"]()
        res, _ = ce.measure(inductor, h, w, y, None)
        del h, w, y
        torch.cuda.empty_cache()
        row = {
            "tokens": n,
            "vocab": v,
            "hidden": hdim,
            "kept": kept,
            "inductor": res["ms"],
            **gemm_rows(n, v, hdim, kept),
        }
        rows.append(row)
        print(row, flush=True)
        write_json(args.out, {"env": environment(), "rows": rows})


if __name__ == "__main__":
    main()
