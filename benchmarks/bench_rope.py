"""Rotary embedding forward+backward on a GPU, bf16, HF layout ([B, H, S, D] views of [B, S, H, D]):

    eager          transformers' apply_rotary_pos_emb(q, k, cos, sin)
    inductor       torch.compile of the same function
    foak_op        torch.ops.foak.rope(q, k, cos, sin, 1): one launch forward, one backward
    foak_compiled  the same function through foak's backend (rope pattern, then inductor)

Times are medians of triton.testing.do_bench (L2 cleared between reps, grads reset); bwd is
fwd+bwd minus fwd. GB/s counts the bytes an ideal kernel must move: fwd reads q, k, cos, sin
and writes q_embed, k_embed; bwd reads their two grads and cos, sin and writes dq, dk.

    python -m benchmarks.bench_rope --out $OUT/rope.json
"""
import argparse
import json
import os
import platform

import torch

SHAPES = {  # name: (batch, seq, q heads, kv heads, head_dim)
    "llama-3.2-1B": (2, 2048, 32, 8, 64),
    "llama-3.1-8B": (2, 2048, 32, 8, 128),
}
DTYPE = torch.bfloat16


def io_bytes(batch, seq, hq, hk, d, elem=2, cos_elem=None):
    """(fwd, bwd) bytes: q/k (or their grads) read and written once, cos/sin read once."""
    cos_elem = elem if cos_elem is None else cos_elem
    qk = batch * seq * (hq + hk) * d * elem
    cs = 2 * batch * seq * d * cos_elem
    return 2 * qk + cs, 2 * qk + cs


def make_inputs(batch, seq, hq, hk, d, device="cuda", dtype=DTYPE):
    """q, k as HF makes them (transposed views of the projections) and per-token cos/sin."""
    torch.manual_seed(0)
    q = torch.randn(batch, seq, hq, d, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(batch, seq, hk, d, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    pos = torch.arange(seq, device=device).expand(batch, seq)
    inv = 1.0 / 500000.0 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    f = pos[..., None].float() * inv
    emb = torch.cat((f, f), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    gq = torch.randn(batch, hq, seq, d, device=device, dtype=dtype)
    gk = torch.randn(batch, hk, seq, d, device=device, dtype=dtype)
    return q, k, cos, sin, gq, gk


def methods():
    """name → (callable(q, k, cos, sin) -> (q_embed, k_embed), foak backend or None)."""
    import foak_compile
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    be = foak_compile.backend(patterns=["rope"], inner="inductor")
    return {
        "eager": (apply_rotary_pos_emb, None),
        "inductor": (torch.compile(apply_rotary_pos_emb, dynamic=False), None),
        "foak_op": (lambda q, k, cos, sin: torch.ops.foak.rope(q, k, cos, sin, 1), None),
        "foak_compiled": (torch.compile(apply_rotary_pos_emb, backend=be, dynamic=False), be),
    }


def time_method(fn, q, k, cos, sin, gq, gk):
    """(fwd ms, fwd+bwd ms), medians."""
    from triton.testing import do_bench

    def fwd():
        fn(q, k, cos, sin)

    def fwd_bwd():
        qe, ke = fn(q, k, cos, sin)
        torch.autograd.backward((qe, ke), (gq, gk))

    fwd_bwd()  # compile and warm up outside the timed region
    torch.cuda.synchronize()
    f = do_bench(fwd, grad_to_none=[q, k], return_mode="median")
    fb = do_bench(fwd_bwd, grad_to_none=[q, k], return_mode="median")
    return f, fb


def results_of(fn, q, k, cos, sin, gq, gk):
    q.grad = k.grad = None
    qe, ke = fn(q, k, cos, sin)
    torch.autograd.backward((qe, ke), (gq, gk))
    out = [t.detach().clone() for t in (qe, ke, q.grad, k.grad)]
    q.grad = k.grad = None
    return out


def gbs(nbytes, ms):
    return round(nbytes / ms / 1e6, 1)


def run_case(shape):
    batch, seq, hq, hk, d = shape
    q, k, cos, sin, gq, gk = make_inputs(*shape)
    fwd_bytes, bwd_bytes = io_bytes(*shape, elem=q.element_size(), cos_elem=cos.element_size())
    ms = methods()
    ref = results_of(ms["eager"][0], q, k, cos, sin, gq, gk)
    case = {"shape": dict(zip(("batch", "seq", "q_heads", "kv_heads", "head_dim"), shape)),
            "dtype": str(DTYPE).split(".")[-1], "fwd_bytes": fwd_bytes, "bwd_bytes": bwd_bytes, "methods": {}}
    for name, (fn, be) in ms.items():
        got = results_of(fn, q, k, cos, sin, gq, gk)
        f, fb = time_method(fn, q, k, cos, sin, gq, gk)
        b = max(fb - f, 1e-6)
        m = case["methods"][name] = {
            "fwd_ms": round(f, 4), "bwd_ms": round(b, 4), "fwd_bwd_ms": round(fb, 4),
            "fwd_gbs": gbs(fwd_bytes, f), "bwd_gbs": gbs(bwd_bytes, b), "fwd_bwd_gbs": gbs(fwd_bytes + bwd_bytes, fb),
            # bf16 eager rounds each product; foak reproduces that, so 0 is expected
            "max_abs_diff_vs_eager": max((a.float() - r.float()).abs().max().item() for a, r in zip(got, ref)),
        }
        if be is not None:
            m["rope_matches"] = sum(r.counts().get("rope", 0) for r in be.reports)
    for base in ("eager", "inductor"):
        case[f"foak_op_speedup_vs_{base}"] = {
            key: round(case["methods"][base][key] / case["methods"]["foak_op"][key], 3)
            for key in ("fwd_ms", "bwd_ms", "fwd_bwd_ms")}
    return case


def environment():
    import triton
    import transformers
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/rope.json")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_rope needs a CUDA GPU")
    res = {"env": environment(), "cases": {name: run_case(SHAPES[name]) for name in args.shapes}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
