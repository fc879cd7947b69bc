"""Every benchmark behind one entry point, by preset; results land in benchmarks/results/<benchmark>/<device>.json
(the latest per benchmark and device: git history keeps the older ones).

    python -m benchmarks.suite --list
    python -m benchmarks.suite train-step                  # 1B shape, bf16 + NF4, inductor/foak/Liger/Trainer rows
    python -m benchmarks.suite train-step --quant nf4      # one base only
    python -m benchmarks.suite train-step-8b
    python -m benchmarks.suite rms-norm -- --sweep         # after `--`: the benchmark's own arguments

Each preset runs `python -m benchmarks.<module>` with its arguments; `python -m benchmarks.render` prints the
tables, `python -m benchmarks.render --readme` rewrites the README's results block from results/train_step/.
All of them need a CUDA GPU except `train-step --device cpu` (a smoke test of the harness).
"""

import argparse
import os
import subprocess
import sys
from typing import NamedTuple

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TRAIN_STEP_VARIANTS = "inductor,foak,liger,trainer_inductor,trainer_foak"


class Preset(NamedTuple):
    module: str  # benchmarks.<module>
    results: str  # results/<results>/<device>.json (or a folder of text reports)
    args: tuple  # the preset's arguments, before the user's
    about: str
    quant_flag: str = ""  # how --quant reaches the module, if it takes one


PRESETS = {
    "train-step": Preset(
        "train_step",
        "train_step",
        (
            "--all",
            "--variants",
            TRAIN_STEP_VARIANTS,
            "--quants",
            "none,nf4",
            "--steps",
            "20",
            "--profile",
            os.path.join(RESULTS, "train_step", "profiles"),
        ),
        "LoRA train step, Llama-3.2-1B shape: the default path, Trainer route, Liger",
        "--quants",
    ),
    "train-step-8b": Preset(
        "train_step",
        "train_step_8b",
        (
            "--all",
            "--shape",
            "8b",
            "--variants",
            "eager,inductor,liger,foak,foak_loss",
            "--quants",
            "nf4",
            "--steps",
            "10",
            "--profile",
            os.path.join(RESULTS, "train_step_8b", "profiles"),
        ),
        "QLoRA train step, Llama-3.1-8B shape at full depth",
        "--quants",
    ),
    "compile-profile": Preset(
        "compile_profile", "compile_profile", ("--layers", "4"), "cProfile of the first (compiling) step", "--quant"
    ),
    "rms-norm": Preset("bench_rms_norm", "rms_norm", (), "RMSNorm fwd+bwd: eager, inductor, foak"),
    "rope": Preset("bench_rope", "rope", (), "rotary embedding fwd+bwd: eager, inductor, Liger, foak"),
    "cross-entropy": Preset(
        "bench_cross_entropy", "cross_entropy", (), "lm_head + cross-entropy: eager, inductor, Liger, foak"
    ),
    "lora": Preset("bench_lora", "lora", (), "one LoRA layer, dense and NF4 bases"),
    "lora-gptq": Preset("bench_lora_gptq", "lora_gptq", (), "one LoRA layer over a GPTQ base (gptqmodel)"),
    "lce-ab-online": Preset("ab_online", "lce_ab_online", (), "online linear + CE: host-side variants A/B"),
    "lce-gemm-bound": Preset("gemm_bound", "lce_gemm_bound", (), "linear + CE lower bound by its GEMMs"),
    "lce-host-overhead": Preset("host_overhead", "lce_host_overhead", (), "online linear + CE host time per piece"),
    "lce-profile": Preset("profile_lce", "lce_profile", (), "linear + CE per-kernel profile and tilings"),
}


def result_path(preset: Preset, device: str) -> str:
    if preset.module == "compile_profile":
        return os.path.join(RESULTS, preset.results)
    return os.path.join(RESULTS, preset.results, f"{device}.json")


def command(name: str, quant: str = "", extra: tuple = (), out: str = "", device: str = "") -> list:
    """The command line a preset runs (its output path included)."""
    preset = PRESETS[name]
    if not device:
        from .common import device_slug

        device = device_slug()
    cmd = [sys.executable, "-m", f"benchmarks.{preset.module}", *preset.args]
    if quant:
        if not preset.quant_flag:
            raise SystemExit(f"preset {name!r} takes no --quant")
        cmd += [preset.quant_flag, quant]  # the later flag wins in argparse
    return cmd + ["--out", out or result_path(preset, device), *extra]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", nargs="?", choices=list(PRESETS))
    p.add_argument("--list", action="store_true", help="the presets and what they measure")
    p.add_argument("--quant", default="", help="train-step: none, nf4, gptq or a comma list")
    p.add_argument(
        "--out", default="", help="where the results go (default benchmarks/results/<benchmark>/<device>.json)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the command only")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.list or not args.preset:
        for name, preset in PRESETS.items():
            print(f"{name:18} {preset.about}  (benchmarks/{preset.module}.py)")
        return 0
    cmd = command(args.preset, args.quant, tuple(extra), args.out)
    print(" ".join(cmd[1:]), flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
