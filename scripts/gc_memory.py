"""Peak GPU memory and step time of LoRA training with and without gradient checkpointing, eager and
backend foak, on a Llama-3.2-1B-shaped model cut to a few layers (bf16 and NF4 bases). Each variant
runs in its own process (scripts/distributed_parity.py), so every peak is that variant's alone.

    # one GPU
    python scripts/gc_memory.py --bases bf16 --out benchmarks/results/gc_memory_bf16.json
    python scripts/gc_memory.py --bases nf4 --out benchmarks/results/gc_memory_nf4.json
    # two GPUs, FSDP2 (torchrun --nproc_per_node 2 per variant; --mode ddp for DDP)
    python scripts/gc_memory.py --nproc 2 --mode fsdp2 --bases bf16,nf4 --out benchmarks/results/gc_memory_fsdp2.json

Writes {"rows": [{base, compile, gradient_checkpointing, peak_gib, steady_peak_gib, median_step_s,
tokens_per_s, losses, counts, ...}], "table": "<markdown>"} and prints the table. Losses of the four
variants of one base agree (the same model and batches): checkpointing changes memory, not the math.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PARITY = os.path.join(HERE, "distributed_parity.py")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bases", default="bf16,nf4")
    p.add_argument("--compiles", default="none,foak")
    p.add_argument("--preset", default="1b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="global batch (rows); split across --nproc")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--mode", default="fsdp2", choices=["ddp", "fsdp2"], help="with --nproc > 1")
    p.add_argument("--inner", default=None)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    runs_dir = os.path.splitext(os.path.abspath(a.out))[0] + "_runs"
    os.makedirs(runs_dir, exist_ok=True)
    rows = []
    for base in a.bases.split(","):
        for comp in a.compiles.split(","):
            for gc in (False, True):
                name = f"{base}_{comp}_{'gc' if gc else 'nogc'}"
                path = os.path.join(runs_dir, name + ".json")
                if a.nproc > 1:
                    cmd = [
                        sys.executable,
                        "-m",
                        "torch.distributed.run",
                        "--nproc_per_node",
                        str(a.nproc),
                        PARITY,
                        "--mode",
                        a.mode,
                    ]
                else:
                    cmd = [sys.executable, PARITY, "--mode", "single"]
                cmd += [
                    "--base",
                    base,
                    "--compile",
                    comp,
                    "--preset",
                    a.preset,
                    "--layers",
                    str(a.layers),
                    "--batch",
                    str(a.batch),
                    "--seq",
                    str(a.seq),
                    "--steps",
                    str(a.steps),
                    "--out",
                    path,
                ]
                cmd += ["--gradient-checkpointing"] if gc else []
                cmd += ["--inner", a.inner] if a.inner else []
                print("+", " ".join(cmd), flush=True)
                t = time.time()
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
                row = {
                    "base": base,
                    "compile": comp,
                    "gradient_checkpointing": gc,
                    "returncode": proc.returncode,
                    "wall_s": round(time.time() - t, 1),
                    "command": " ".join(cmd),
                }
                if proc.returncode == 0 and os.path.exists(path):
                    with open(path) as f:
                        r = json.load(f)
                    row.update(
                        {
                            k: r[k]
                            for k in (
                                "peak_gib",
                                "steady_peak_gib",
                                "median_step_s",
                                "losses",
                                "counts",
                                "world",
                                "mode",
                                "device",
                                "torch",
                                "layers",
                            )
                        }
                    )
                    row["tokens_per_s"] = round(a.batch * a.seq / r["median_step_s"], 1)
                else:
                    tail = (proc.stdout + proc.stderr).strip().splitlines()
                    row["error"] = next((ln for ln in reversed(tail) if "Error" in ln), tail[-1] if tail else "")
                    print(proc.stderr[-4000:], flush=True)
                rows.append(row)
                with open(a.out, "w") as f:  # after every variant: a later failure keeps what was measured
                    json.dump({"rows": rows, "table": table(rows)}, f, indent=1)
    print(table(rows))
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


def table(rows):
    out = [
        "| base | compile | checkpointing | peak GiB | steady peak GiB | step s | tokens/s | first/last loss "
        "| matches |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(
                f"| {r['base']} | {r['compile']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                f"failed: {r['error']} | | | | | |"
            )
            continue
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r["counts"].items())) or "—"
        out.append(
            f"| {r['base']} | {r['compile']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
            f"{r['peak_gib']} | {r['steady_peak_gib']} | {r['median_step_s']} | {r['tokens_per_s']} | "
            f"{r['losses'][0]:.4f} / {r['losses'][-1]:.4f} | {counts} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
