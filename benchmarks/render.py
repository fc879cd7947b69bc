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


def rope(d):
    env = d["env"]
    out = [f"Rotary embedding (q and k), bf16, {env['gpu']}, torch {env['torch']}, triton {env['triton']}; "
           f"GPU time of CUDA-graph replays (ms), % of the measured {d['copy_bandwidth_gbs']:.0f} GB/s copy bandwidth; "
           "wall = do_bench time with launch overhead.", "",
           "| shape | method | fwd | bwd | fwd % BW | bwd % BW | wall fwd+bwd | max diff vs eager |",
           "|---|---|---|---|---|---|---|---|"]
    for name, c in d["cases"].items():
        for m, r in c["methods"].items():
            diff = r["max_abs_diff_vs_eager"]
            diff = max(diff) if isinstance(diff, list) else diff
            out.append(f"| {name} | {m} | {r['fwd_ms']:.4f} | {r['bwd_ms']:.4f} | {r['fwd_pct_of_copy_bw']:.0f}% | "
                       f"{r['bwd_pct_of_copy_bw']:.0f}% | {r['wall_fwd_bwd_ms']:.3f} | {diff:g} |")
    return "\n".join(out)


def cross_entropy(d):
    env = d["env"]
    out = [f"Linear + cross-entropy loss and backward, {d['dtype']}, {env['gpu']}, torch {env['torch']}; "
           f"{int(100 * d['ignored_label_share'])}% of labels ignored; ms / peak GB above the inputs. "
           "Targets: time ≤ inductor, peak ≤ Liger.", "",
           "| tokens × vocab × hidden | lm_head | eager | inductor | Liger | foak | foak time ÷ inductor | foak peak ÷ Liger |",
           "|---|---|---|---|---|---|---|---|"]
    for c in d["cases"]:
        cell = lambda m: f"{c[m]['ms']:.1f} / {c[m]['peak_gb']:.2f}" if m in c and "ms" in c[m] else "—"
        mark = lambda ok: " ✓" if ok else ""
        t, m = c["foak_vs_inductor"]["time_ratio"], c["foak_vs_liger"]["peak_ratio"]
        out.append(f"| {c['tokens']}×{c['vocab']}×{c['hidden']} | {'trained' if c['weight_grad'] else 'frozen'} | "
                   f"{cell('eager')} | {cell('inductor')} | {cell('liger')} | {cell('foak')} | "
                   f"{t:.2f}{mark(c['targets_met']['time_le_inductor'])} | {m:.2f}{mark(c['targets_met']['memory_le_liger'])} |")
    return "\n".join(out)


RENDER = {"rms_norm.json": rms_norm, "rope.json": rope, "cross_entropy.json": cross_entropy}


def main(names=None):
    for name, fn in RENDER.items():
        path = os.path.join(RESULTS, name)
        if os.path.exists(path) and (not names or name in names):
            print(fn(json.load(open(path))))
            print()


if __name__ == "__main__":
    main(sys.argv[1:])
