"""Rotary embedding forward+backward on a GPU, bf16, HF layout ([B, H, S, D] views of [B, S, H, D]):

    eager          transformers' apply_rotary_pos_emb(q, k, cos, sin)
    inductor       torch.compile of the same function
    foak_op        torch.ops.foak.rope(q, k, cos, sin, 1): one launch forward, one backward
    foak_compiled  the same function through foak's backend (rope pattern, then inductor)

Per method: GPU time of CUDA-graph replays (`fwd_ms`, `fwd_bwd_ms`, `bwd_ms` = their difference;
what the kernels cost without launch gaps) and wall time from triton's do_bench (`wall_*`,
launch and Python overhead included). bwd goes through autograd with q, k as leaves and
contiguous [B, H, S, D] upstream grads (eager attention's), so it includes any copy AccumulateGrad
makes to give q.grad q's layout (foak writes dq in that layout); `kernel` times the foak kernels
alone next to a copy of as many bytes, and `profile` lists each method's fwd+bwd kernels. GB/s counts the bytes an ideal kernel must move: fwd reads q, k, cos, sin and
writes q_embed, k_embed; bwd reads their two grads and cos, sin and writes dq, dk; % is of the
measured device-to-device copy bandwidth.

    python -m benchmarks.bench_rope --out $OUT/rope.json [--sweep]
"""

import argparse

import torch
import triton

from .common import copy_bandwidth_gbs, environment, graph_ms, write_json

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


def _steps(fn, q, k, cos, sin, gq, gk):
    def fwd():
        fn(q, k, cos, sin)

    def fwd_bwd():
        q.grad = k.grad = None
        qe, ke = fn(q, k, cos, sin)
        torch.autograd.backward((qe, ke), (gq, gk))

    return fwd, fwd_bwd


def time_method(fn, q, k, cos, sin, gq, gk):
    """(fwd, fwd+bwd) GPU ms of graph replays and (fwd, fwd+bwd) wall ms from do_bench."""
    from triton.testing import do_bench

    fwd, fwd_bwd = _steps(fn, q, k, cos, sin, gq, gk)
    fwd_bwd()  # compile and warm up outside the timed region
    torch.cuda.synchronize()
    # the better of two interleaved medians: a burst of outside load on the GPU skews one, rarely both
    g = [graph_ms(fwd), graph_ms(fwd_bwd)]
    g = min(g[0], graph_ms(fwd)), min(g[1], graph_ms(fwd_bwd))
    w = (
        do_bench(fwd, grad_to_none=[q, k], return_mode="median"),
        do_bench(fwd_bwd, grad_to_none=[q, k], return_mode="median"),
    )
    return g, w


def profile(fn, q, k, cos, sin, gq, gk, iters=5):
    """GPU kernels of one fwd+bwd: [name, µs per iteration], in launch order of first appearance."""
    from torch.profiler import ProfilerActivity, profile as prof

    _, fwd_bwd = _steps(fn, q, k, cos, sin, gq, gk)
    fwd_bwd()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(iters):
            fwd_bwd()
        torch.cuda.synchronize()
    out = {}
    try:
        for e in p.events():
            if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
                out[e.name[:90]] = out.get(e.name[:90], 0.0) + e.device_time / iters
    except Exception as err:  # the profiler's event API moves between torch versions
        return [[f"profile failed: {err!r}"[:200], 0.0]]
    return [[n, round(us, 1)] for n, us in out.items()]


def results_of(fn, q, k, cos, sin, gq, gk):
    q.grad = k.grad = None
    qe, ke = fn(q, k, cos, sin)
    torch.autograd.backward((qe, ke), (gq, gk))
    out = [t.detach().clone() for t in (qe, ke, q.grad, k.grad)]
    q.grad = k.grad = None
    return out


def gbs(nbytes, ms):
    return round(nbytes / ms / 1e6, 1)


def pct(nbytes, ms, peak):
    return round(100 * nbytes / ms / 1e6 / peak, 1)


def kernel_times(shape, peak):
    """The foak kernels alone (no autograd): fwd on HF's q/k; bwd, writing dq, dk in q's and k's
    layout as the op does, from contiguous [B, H, S, D] grads (as the autograd run gets; eager
    attention's) and from grads in q's own layout (what SDPA's backward hands back). `copy` is a
    device-to-device copy moving the same bytes: the ceiling at this size, launch and tail included."""
    from foak_compile.kernels import rope as kernel

    batch, seq, hq, hk, d = shape
    q, k, cos, sin, gq, gk = make_inputs(*shape)
    q, k = q.detach(), k.detach()
    gq_s, gk_s = (torch.randn_like(q), torch.randn_like(k))  # randn_like keeps q's strides
    st = (q.stride(), k.stride())
    nbytes = io_bytes(*shape)[0]
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    runs = {
        "fwd": lambda: kernel.rope(q, k, cos, sin, 1, DTYPE, DTYPE),
        "bwd_contiguous_grads": lambda: kernel.rope(gq, gk, cos, sin, 1, DTYPE, DTYPE, True, st),
        "bwd_grads_in_q_layout": lambda: kernel.rope(gq_s, gk_s, cos, sin, 1, DTYPE, DTYPE, True, st),
        "copy_same_bytes": lambda: dst.copy_(src),
    }
    out = {}
    for name, f in runs.items():
        ms = graph_ms(f)
        out[name] = {"ms": round(ms, 4), "gbs": gbs(nbytes, ms), "pct_of_copy_bw": pct(nbytes, ms, peak)}
    return out


def run_case(shape, peak):
    batch, seq, hq, hk, d = shape
    q, k, cos, sin, gq, gk = make_inputs(*shape)
    fwd_bytes, bwd_bytes = io_bytes(*shape, elem=q.element_size(), cos_elem=cos.element_size())
    ms = methods()
    ref = results_of(ms["eager"][0], q, k, cos, sin, gq, gk)
    case = {
        "shape": dict(zip(("batch", "seq", "q_heads", "kv_heads", "head_dim"), shape)),
        "dtype": str(DTYPE).split(".")[-1],
        "fwd_bytes": fwd_bytes,
        "bwd_bytes": bwd_bytes,
        "methods": {},
    }
    for name, (fn, be) in ms.items():
        got = results_of(fn, q, k, cos, sin, gq, gk)
        (f, fb), (wf, wfb) = time_method(fn, q, k, cos, sin, gq, gk)
        b = max(fb - f, 1e-6)
        m = case["methods"][name] = {
            "fwd_ms": round(f, 4),
            "bwd_ms": round(b, 4),
            "fwd_bwd_ms": round(fb, 4),
            "fwd_gbs": gbs(fwd_bytes, f),
            "bwd_gbs": gbs(bwd_bytes, b),
            "fwd_bwd_gbs": gbs(fwd_bytes + bwd_bytes, fb),
            "fwd_pct_of_copy_bw": pct(fwd_bytes, f, peak),
            "bwd_pct_of_copy_bw": pct(bwd_bytes, b, peak),
            "fwd_bwd_pct_of_copy_bw": pct(fwd_bytes + bwd_bytes, fb, peak),
            "wall_fwd_ms": round(wf, 4),
            "wall_bwd_ms": round(max(wfb - wf, 1e-6), 4),
            "wall_fwd_bwd_ms": round(wfb, 4),
            # bf16 eager rounds each product; foak reproduces that, so 0 is expected: q_embed, k_embed, dq, dk
            "max_abs_diff_vs_eager": [(a.float() - r.float()).abs().max().item() for a, r in zip(got, ref)],
        }
        if be is not None:
            m["rope_matches"] = sum(r.counts().get("rope", 0) for r in be.reports)
        if name in ("inductor", "foak_op"):
            m["profile_fwd_bwd_us"] = profile(fn, q, k, cos, sin, gq, gk)
    for base in ("eager", "inductor"):
        case[f"foak_op_speedup_vs_{base}"] = {
            key: round(case["methods"][base][key] / case["methods"]["foak_op"][key], 3)
            for key in ("fwd_ms", "bwd_ms", "fwd_bwd_ms", "wall_fwd_ms", "wall_fwd_bwd_ms")
        }
    case["kernel"] = kernel_times(shape, peak)
    return case


def sweep_configs(half):
    """Tiles around the heuristic: 1, 2 or 4 16-byte vectors per thread and half-row."""
    return [
        (bt, bh, nw)
        for bt in (1, 2, 4, 8, 16, 32)
        for bh in (2, 4, 8, 16)
        for nw in (2, 4, 8)
        if bt * bh * half // (32 * nw) in (8, 16, 32)
    ]


def sweep(shape):
    """GPU ms of the kernel alone for each tile (fwd on HF's q/k, bwd from contiguous grads),
    each output checked bit for bit against the heuristic tile's."""
    from foak_compile.kernels import rope as kernel

    batch, seq, hq, hk, d = shape
    q, k, cos, sin, gq, gk = make_inputs(*shape)
    q, k = q.detach(), k.detach()
    half, default = d // 2, kernel._tile
    fwd = lambda: kernel.rope(q, k, cos, sin, 1, DTYPE, DTYPE)  # noqa: E731
    st = (q.stride(), k.stride())
    bwd = lambda: kernel.rope(gq, gk, cos, sin, 1, DTYPE, DTYPE, True, st)  # noqa: E731
    want = fwd(), bwd()
    res = {
        "heuristic": list(default(half, hq, hk)),
        "heuristic_ms": [round(graph_ms(fwd), 4), round(graph_ms(bwd), 4)],
        "tiles (fwd, bwd ms)": {},
    }
    for bt, bh, nw in sweep_configs(half):
        kernel._tile = lambda *a, c=(bt, bh, triton.next_power_of_2(half), nw): c
        try:
            got = fwd(), bwd()
            ok = all(torch.equal(x, y) for g, w in zip(got, want) for x, y in zip(g, w))
            row = [round(graph_ms(fwd), 4), round(graph_ms(bwd), 4)] + ([] if ok else ["MISMATCH"])
        finally:
            kernel._tile = default
        res["tiles (fwd, bwd ms)"][f"T{bt}_H{bh}_w{nw}"] = row
    tiles = res["tiles (fwd, bwd ms)"]
    for i, which in enumerate(("fwd", "bwd")):
        best = sorted(tiles, key=lambda n: tiles[n][i])[:5]
        res[f"best_{which}"] = [[n, tiles[n][i]] for n in best]
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/rope.json")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--sweep", action="store_true", help="also time the kernel over a range of tiles")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_rope needs a CUDA GPU")
    peak = copy_bandwidth_gbs()
    res = {"env": environment(), "copy_bandwidth_gbs": round(peak, 1), "cases": {}}
    for name in args.shapes:
        res["cases"][name] = run_case(SHAPES[name], peak)
        write_json(args.out, res)  # partial results survive a later failure
    if args.sweep:
        for name in args.shapes:
            res["cases"][name]["tile_sweep"] = sweep(SHAPES[name])
            write_json(args.out, res)


if __name__ == "__main__":
    main()
