"""Markdown tables for README.md from benchmarks/results/*.json: `python -m benchmarks.render`."""
import json
import os
import sys

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def rms_norm(d):
    env = d["env"]
    out = [f"RMSNorm, bf16, {env['gpu']}, torch {env['torch']}, triton {env['triton']}; "
           f"measured copy bandwidth {d['copy_bandwidth_gbs']:.0f} GB/s. GPU time of CUDA-graph replays (ms); "
           "% = achieved fwd+bwd bandwidth over that copy bandwidth.", "",
           "| shape | norm weight | eager fwd / fwd+bwd | inductor fwd / fwd+bwd | foak fwd / fwd+bwd | foak % of copy BW (fwd, fwd+bwd) | foak vs inductor (fwd+bwd) |",
           "|---|---|---|---|---|---|---|"]
    for name, c in d["cases"].items():
        for wt in ("weight_frozen", "weight_trained"):
            r = c[wt]
            cell = lambda v: f"{r[v]['fwd_ms']:.4f} / {r[v]['fwd_bwd_ms']:.4f}"
            out.append(f"| {name} | {wt.split('_')[1]} | {cell('eager')} | {cell('inductor')} | {cell('foak')} | "
                       f"{r['foak']['fwd_pct_of_copy_bw']:.0f}%, {r['foak']['fwd_bwd_pct_of_copy_bw']:.0f}% | "
                       f"{r['foak_speedup_vs_inductor']['fwd_bwd_ms']:.2f}× |")
    return "\n".join(out)


RENDER = {"rms_norm.json": rms_norm}


def main(names=None):
    for name, fn in RENDER.items():
        path = os.path.join(RESULTS, name)
        if os.path.exists(path) and (not names or name in names):
            print(fn(json.load(open(path))))
            print()


if __name__ == "__main__":
    main(sys.argv[1:])
