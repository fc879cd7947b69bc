"""Markdown tables from benchmarks/results/<benchmark>/<device>.json: `python -m benchmarks.render` prints
them all, `--readme` rewrites README.md's results block from the train-step runs."""

import json
import os
import sys

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def rms_norm(d):
    env = d["env"]
    out = [
        f"RMSNorm, bf16, {env['gpu']}, torch {env['torch']}, triton {env['triton']}; "
        f"measured copy bandwidth {d['copy_bandwidth_gbs']:.0f} GB/s. GPU time of CUDA-graph replays (ms); "
        "% = achieved fwd+bwd bandwidth over that copy bandwidth.",
        "",
        "| shape | norm weight | eager fwd / fwd+bwd | inductor fwd / fwd+bwd | foak fwd / fwd+bwd | foak % of copy BW (fwd, fwd+bwd) | foak vs inductor (fwd+bwd) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in d["cases"].items():
        for wt in ("weight_frozen", "weight_trained"):
            r = c[wt]
            cell = lambda v: f"{r[v]['fwd_ms']:.4f} / {r[v]['fwd_bwd_ms']:.4f}"
            out.append(
                f"| {name} | {wt.split('_')[1]} | {cell('eager')} | {cell('inductor')} | {cell('foak')} | "
                f"{r['foak']['fwd_pct_of_copy_bw']:.0f}%, {r['foak']['fwd_bwd_pct_of_copy_bw']:.0f}% | "
                f"{r['foak_speedup_vs_inductor']['fwd_bwd_ms']:.2f}× |"
            )
    return "\n".join(out)


def rope(d):
    env = d["env"]
    out = [
        f"Rotary embedding (q and k), bf16, {env['gpu']}, torch {env['torch']}, triton {env['triton']}; "
        f"GPU time of CUDA-graph replays (ms), % of the measured {d['copy_bandwidth_gbs']:.0f} GB/s copy bandwidth; "
        "wall = do_bench time with launch overhead.",
        "",
        "| shape | method | fwd | bwd | fwd % BW | bwd % BW | wall fwd+bwd | max diff vs eager |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in d["cases"].items():
        for m, r in c["methods"].items():
            diff = r["max_abs_diff_vs_eager"]
            diff = max(diff) if isinstance(diff, list) else diff
            out.append(
                f"| {name} | {m} | {r['fwd_ms']:.4f} | {r['bwd_ms']:.4f} | {r['fwd_pct_of_copy_bw']:.0f}% | "
                f"{r['bwd_pct_of_copy_bw']:.0f}% | {r['wall_fwd_bwd_ms']:.3f} | {diff:g} |"
            )
    return "\n".join(out)


def cross_entropy(d):
    env = d["env"]
    forced = any(isinstance(c.get("foak_online"), dict) for c in d["cases"])
    out = [
        f"Linear + cross-entropy loss and backward, {d['dtype']}, {env['gpu']}, torch {env['torch']}; "
        f"{int(100 * d['ignored_label_share'])}% of labels ignored; ms / peak GB above the inputs. "
        "Targets: time ≤ inductor, peak ≤ Liger"
        + ("; foak_online: the online path forced (frozen lm_head)" if forced else "")
        + ".",
        "",
        "| tokens × vocab × hidden | lm_head | eager | inductor | Liger | foak | foak time ÷ inductor | foak peak ÷ Liger |"
        + (" foak_online |" if forced else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if forced else ""),
    ]
    for c in d["cases"]:
        cell = lambda m: f"{c[m]['ms']:.1f} / {c[m]['peak_gb']:.3f}" if m in c and "ms" in c[m] else "—"
        mark = lambda ok: " ✓" if ok else ""
        t, m = c["foak_vs_inductor"]["time_ratio"], c["foak_vs_liger"]["peak_ratio"]
        row = (
            f"| {c['tokens']}×{c['vocab']}×{c['hidden']} | {'trained' if c['weight_grad'] else 'frozen'} | "
            f"{cell('eager')} | {cell('inductor')} | {cell('liger')} | {cell('foak')} | "
            f"{t:.2f}{mark(c['targets_met']['time_le_inductor'])} | {m:.2f}{mark(c['targets_met']['memory_le_liger'])} |"
        )
        if forced:
            met = c.get("foak_online_targets_met") or {}
            row += f" {cell('foak_online')}{' ✓✓' if met and all(met.values()) else ''} |"
        out.append(row)
    return "\n".join(out)


def lora(d):
    env = d["env"]
    out = [
        f"One LoRA layer (r={d['rank']}, α={d['alpha']}, {d['tokens']} tokens, {d['dtype']}), {env['gpu']}, torch "
        f"{env['torch']}; fwd+bwd ms / peak MB above the inputs; NF4: {d['nf4']}.",
        "",
        "| shape | base | eager peft | inductor | foak op | foak backend | foak op error vs eager (y, dx, dA, dB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in d["cases"].items():
        for base, r in c.items():
            if "dequant" in base:
                continue
            cell = lambda v: (
                f"{r[v]['fwd_bwd_ms']:.3f} / {r[v]['peak_mb']:.0f}" if "fwd_bwd_ms" in r.get(v, {}) else "—"
            )
            err = r.get("rel_err_foak_op_vs_eager")
            err = ", ".join(f"{v:g}" for v in err.values()) if isinstance(err, dict) else "—"
            out.append(
                f"| {name} | {base.split(',')[0]} | {cell('eager_peft')} | {cell('inductor')} | "
                f"{cell('foak_op')} | {cell('foak_backend')} | {err} |"
            )
    deq = [
        (n, c["nf4 dequant only"])
        for n, c in d["cases"].items()
        if "ms" in c.get("nf4 dequant only", {}).get("foak", {})
    ]
    if deq:
        out += ["", "| shape | NF4 dequant: foak ms (GB/s) | bitsandbytes ms (GB/s) | bit-exact |", "|---|---|---|---|"]
        for n, q in deq:
            out.append(
                f"| {n} | {q['foak']['ms']:.4f} ({q['foak']['gbs']:.0f}) | {q['bitsandbytes']['ms']:.4f} "
                f"({q['bitsandbytes']['gbs']:.0f}) | {q['bit_exact_vs_bitsandbytes']} |"
            )
    return "\n".join(out)


LABELS = {
    "eager": "HF eager",
    "inductor": "inductor (`torch.compile(model)`)",
    "inductor_cg": 'inductor, `mode="reduce-overhead"`',
    "liger": "Liger kernels, eager",
    "foak": '**foak** (`torch.compile(model, backend="foak")`)',
    "foak_loss": "foak, loss-only compile",
    "foak_loss_cg": "foak, loss-only + `reduce-overhead`",
    "trainer_inductor": "Trainer, `torch_compile=True`",
    "trainer_foak": "**Trainer + `compile_for_trainer(loss_only=True)`**",
    "trainer_foak_cg": 'Trainer + `compile_for_trainer(loss_only=True, mode="reduce-overhead")`',
    "trainer_foak_noclip": "Trainer + `compile_for_trainer(loss_only=True)`, `max_grad_norm=0`",
    "trainer_inductor_noclip": "Trainer, `torch_compile=True`, `max_grad_norm=0`",
}
SHAPES = {
    "1b": "Llama-3.2-1B shape: 16 layers, hidden 2048, ffn 8192, tied lm_head",
    "8b": "Llama-3.1-8B shape: 32 layers, hidden 4096, ffn 14336, untied lm_head",
}
BASES = {"none": "bf16", "nf4": "NF4 (double quant)", "gptq": "GPTQ 4-bit g128"}


def _shape(r):
    return f"{r.get('layers')}×{r.get('hidden', 2048)}"


def _shape_name(r):
    """The benchmark's shape name ("1b", "8b"); rows from before it was recorded by layers × hidden."""
    known = {(16, 2048): "1b", (32, 4096): "8b"}
    return r.get("shape") or known.get((r.get("layers"), r.get("hidden", 2048)), _shape(r))


def _step_cells(r, vs_liger=None):
    """tokens/s | ratio | MFU | peak GiB | ratio [| peak over Liger's] | first step s | ratio, ratios
    against the run's inductor row."""
    v = r.get("vs_inductor", {})
    ratio = lambda k: f"{v[k]:.2f}×" if v.get(k) else "—"
    liger = f" | {vs_liger}" if vs_liger is not None else ""
    mfu = f"{r['mfu_pct']}%" if "mfu_pct" in r else "—"
    return (
        f"{r['tokens_per_s']:,} | {ratio('tokens_per_s')} | {mfu} | {r.get('mem_gib', r.get('peak_gib')):.2f} | "
        f"{ratio('peak_mem')}{liger} | {r['first_step_s']:.0f} | {ratio('first_step')}"
    )


def _error_line(r):
    lines = r["error"].strip().splitlines() or ["?"]
    return next((ln for ln in reversed(lines) if "Error:" in ln or "timed out" in ln), lines[-1]).strip()[:120]


def train_step(d):
    env = d["env"]
    out = [
        f"LoRA train step, {env['gpu']}, torch {env['torch']}, triton {env['triton']}, transformers "
        f"{env.get('transformers', '?')}; measured bf16 matmul ceiling {d['matmul_tflops']} TFLOP/s. "
        "Ratios against the same run's inductor row; memory = peak allocated (CUDA-graph pool included).",
        "",
        "| run | base | layers×hidden | variant | tokens/s | vs inductor | MFU | peak GiB | vs inductor | first step s "
        "| vs inductor | loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        run = r.get("run", "").removesuffix(".json")
        if "error" in r:
            err = _error_line(r)
            out.append(
                f"| {run} | {BASES.get(r['quant'], r['quant'])} | | {LABELS.get(r['variant'], r['variant'])} | "
                f"error: {err[:90]}{' (' + r['note'] + ')' if 'note' in r else ''} | | | | | | | |"
            )
            continue
        out.append(
            f"| {run} | {BASES.get(r['quant'], r['quant'])} | {_shape(r)} | {LABELS.get(r['variant'], r['variant'])} | "
            f"{_step_cells(r)} | {r['loss']} |"
        )
    return "\n".join(out)


def train_step_chart(d, path):
    """Bars of tokens/s and peak memory per variant, one group per base: the README's PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in d["rows"] if "error" not in r]
    groups = list(dict.fromkeys((r["quant"], _shape(r)) for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    width = 0.8 / len(variants)
    for ax, key, title in (
        (axes[0], "tokens_per_s", "tokens/s (higher is better)"),
        (axes[1], "mem_gib", "peak memory GiB (lower is better)"),
    ):
        for i, var in enumerate(variants):
            xs, ys = [], []
            for g, (quant, shape) in enumerate(groups):
                r = next((r for r in rows if (r["quant"], _shape(r)) == (quant, shape) and r["variant"] == var), None)
                if r:
                    xs.append(g + i * width)
                    ys.append(r.get(key, r.get("peak_gib")))
            ax.bar(xs, ys, width, label=var)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
        ax.set_xticklabels([f"{BASES.get(q, q)}\n{s}" for q, s in groups])
        ax.set_title(title)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(len(variants), 5), fontsize=8)
    fig.suptitle(f"LoRA train step (bs {rows[0]['bs']} × {rows[0]['seq']}), {d['env']['gpu']}")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)


RENDER = {"rms_norm": rms_norm, "rope": rope, "cross_entropy": cross_entropy, "lora": lora}
# the README's results block: the train-step runs of the path users take, one JSON per device
TRAIN_STEP = ("train_step", "train_step_8b")
README = os.path.join(os.path.dirname(RESULTS), "..", "README.md")
MARKERS = ("<!-- results:begin -->", "<!-- results:end -->")


def results(benchmark):
    """benchmarks/results/<benchmark>/*.json, as paths relative to the repository root."""
    folder = os.path.join(RESULTS, benchmark)
    if not os.path.isdir(folder):
        return []
    return [f"benchmarks/results/{benchmark}/{f}" for f in sorted(os.listdir(folder)) if f.endswith(".json")]


def _path(rel):
    return os.path.join(os.path.dirname(RESULTS), "..", rel)


def _vs_liger(r, rows):
    """Peak memory over the Liger row of the same base and shape."""
    lig = next(
        (
            i
            for i in rows
            if i["variant"] == "liger"
            and "error" not in i
            and i["quant"] == r["quant"]
            and _shape_name(i) == _shape_name(r)
        ),
        None,
    )
    return f"{r['mem_gib'] / lig['mem_gib']:.2f}×" if lig and r is not lig else "—"


def _extra_warnings(r):
    n = sum((r.get("extra_warnings") or {}).values())
    return str(n) if "extra_warnings" in r else "—"


def default_path(d, rel):
    """The README's tables: one train-step call of the path users take, one table per model shape;
    ratios against the inductor row of the same base and shape (Trainer rows: the Trainer's own)."""
    env, rows = d["env"], [r for r in d["rows"] if "error" not in r]
    first = rows[0]
    out = [
        f"LoRA r16 on all seven projections, bs {first['bs']} × {first['seq']}, AdamW, random weights (NF4: "
        f"quantised on the GPU). Model called with labels, logits returned, no `mode`, unless the row says "
        f"otherwise; Trainer rows: HF `Trainer` over an in-memory dataset, ratios against the Trainer with "
        f"`torch_compile=True`. {env['gpu']}, torch {env['torch']}, triton {env['triton']}, transformers "
        f"{env.get('transformers', '?')}; MFU against the measured bf16 matmul ceiling ({d['matmul_tflops']} "
        f"TFLOP/s); peak = most allocated after the model is built (first step included); extra warnings = "
        f"warning lines inductor alone does not print. `{rel}`."
    ]
    for shape in dict.fromkeys(_shape_name(r) for r in rows):
        out += [
            "",
            f"{SHAPES.get(shape, shape)}:",
            "",
            "| base | compiled with | tokens/s | vs inductor | MFU | peak GiB | vs inductor | vs Liger "
            "| first step s | vs inductor | extra warnings |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if _shape_name(r) == shape):
            out.append(
                f"| {BASES.get(r['quant'], r['quant'])} | {LABELS.get(r['variant'], r['variant'])} | "
                f"{_step_cells(r, _vs_liger(r, rows))} | {_extra_warnings(r)} |"
            )
    runs = [r["run"] for r in d.get("runs", [])]
    if len(runs) > 1:
        out += [
            "",
            f"{len(runs)} device calls, one after another on the same machine ({', '.join(runs)}); "
            "time ratios only within a call (— where a call has no inductor row), memory across calls.",
        ]
    failed = [
        f"{BASES.get(r['quant'], r['quant'])} {r['variant']}: {_error_line(r)}" for r in d["rows"] if "error" in r
    ]
    notes = [f"{BASES.get(r['quant'], r['quant'])} {r['variant']}: {r['note']}" for r in d["rows"] if "note" in r]
    return "\n".join(
        out
        + ([""] + [f"Did not finish: {n}." for n in failed] if failed else [])
        + ([""] + [f"Note: {n}." for n in notes] if notes else [])
    )


def readme(chart=True):
    """Rewrite README.md's results block from the latest train-step JSON per device."""
    parts = []
    for rel in (rel for bench in TRAIN_STEP for rel in results(bench)):
        d = json.load(open(_path(rel)))
        parts.append(default_path(d, rel))
        png = rel.removesuffix(".json") + ".png"
        if chart:
            train_step_chart(d, _path(png))
        if os.path.exists(_path(png)):
            parts.append(f"![tokens/s and peak memory]({png})")
    text = open(README).read()
    head, rest = text.split(MARKERS[0], 1)
    tail = rest.split(MARKERS[1], 1)[1]
    new = head + MARKERS[0] + "\n" + "\n\n".join(parts) + "\n" + MARKERS[1] + tail
    with open(README, "w") as f:
        f.write(new)
    return new


def main(paths=None):
    """Print every benchmark's tables (all devices), or those of the JSON files named: a train-step call's
    or a linear + cross-entropy call's JSON prints as its table."""
    for path in paths or ():
        d = json.load(open(path))
        cases = d.get("cases")
        is_ce = isinstance(cases, list) and cases and "weight_grad" in cases[0]
        print(cross_entropy(d) if is_ce else train_step(d))
        print()
    if paths:
        return
    for bench, fn in RENDER.items():
        for rel in results(bench):
            print(fn(json.load(open(_path(rel)))))
            print()
    for rel in (rel for bench in TRAIN_STEP for rel in results(bench)):
        print(default_path(json.load(open(_path(rel))), rel))
        print()


if __name__ == "__main__":
    if sys.argv[1:] == ["--readme"]:
        readme()
    else:
        main(sys.argv[1:])
