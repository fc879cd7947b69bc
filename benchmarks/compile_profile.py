"""Where the first (compiling) step's time goes: cProfile over it, for one train_step variant.

    python -m benchmarks.compile_profile --variant foak --layers 2 --out DIR

Writes DIR/<variant>_<quant>_<layers>l.txt: the first-step wall time and the top functions by
cumulative and by own time (the compile is host work, so cProfile sees all of it)."""

import argparse
import cProfile
import io
import os
import pstats
import time

from . import train_step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="foak", choices=["inductor", "foak", "foak_loss"])
    p.add_argument("--quant", default="none", choices=["none", "nf4", "gptq"])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/compile_profile")
    a = p.parse_args()
    import torch

    args = argparse.Namespace(**dict(train_step.SHAPES["1b"], layers=a.layers), dropout=0.0, quant=a.quant)
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):  # a cold cache: what a first compile costs
        import tempfile

        cache = tempfile.mkdtemp(prefix="foak_compile_profile_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache, "inductor")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
    model = train_step.build(args)
    model.train()
    ids = torch.randint(0, 128256, (2, 2048), device="cuda")
    if a.variant == "inductor":
        fwd = torch.compile(model)
    else:
        import foak_compile

        fwd = torch.compile(
            (lambda **kw: model(**kw).loss) if a.variant == "foak_loss" else model, backend=foak_compile.backend()
        )
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    t = time.perf_counter()
    prof.enable()
    out = fwd(input_ids=ids, labels=ids)
    (out if isinstance(out, torch.Tensor) else out.loss).backward()
    torch.cuda.synchronize()
    prof.disable()
    wall = time.perf_counter() - t
    os.makedirs(a.out, exist_ok=True)
    buf = io.StringIO()
    buf.write(f"# first step of {a.variant} ({a.quant}, {a.layers} layers): {wall:.1f} s\n")
    # torch's own per-phase timers (dynamo, AOTAutograd, inductor lowering/codegen, async compile)
    from torch._dynamo.utils import compile_times

    buf.write("\n## torch compile phases (torch._dynamo.utils.compile_times)\n" + compile_times(aggregate=True) + "\n")
    st = pstats.Stats(prof, stream=buf)
    buf.write("\n## compile phases (cumulative)\n")
    st.sort_stats("cumulative").print_stats(
        r"identify_accessed_tensors|generate_ttir|_compile_fx_inner|fx_codegen_and_compile|aot_dispatch|"
        r"min_cut_rematerialization|_update_scheduler|codegen_with_cpp_wrapper|wait_for|get_result|"
        r"_compile_inner|__call__.*backend|lower|run_node|precompile|benchmark_gpu"
    )
    st.sort_stats("cumulative").print_stats(60)
    st.sort_stats("tottime").print_stats(30)
    path = os.path.join(a.out, f"{a.variant}_{a.quant}_{a.layers}l.txt")
    with open(path, "w") as f:
        f.write(buf.getvalue())
    print(f"{a.variant} {a.quant} {a.layers} layers: first step {wall:.1f} s -> {path}")


if __name__ == "__main__":
    main()
