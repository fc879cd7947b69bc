"""A LoRA training step of a Llama-shaped model (random weights), each variant in its own process
with cold compile caches, the same inputs for all.

    python -m benchmarks.train_step --all --variants inductor,foak --quants none,nf4 --out FILE   # driver
    python -m benchmarks.train_step --variant foak --quant nf4                                    # one variant
    python -m benchmarks.train_step --all --shape 8b --quants nf4 --variants eager,inductor,liger,foak

Measured as the reference figures were (../shared/reference/anchor_train_step.py): bs 2 × seq 2048,
peft LoRA r=16 alpha=32 on all seven projections, AdamW, the first step, 2 warm-up steps, then the
median of --steps CUDA-event-timed steps. Peak memory: the most allocated at any point after the
model is built (first step, CUDA-graph recording and timed steps alike). Each row also keeps torch's
compile phase timers and the warnings its process printed, so a row that warns where inductor does
not shows it (`extra_warnings`).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

SHAPES = {
    "1b": dict(layers=16, hidden=2048, ffn=8192, tied=True, vocab=128256),  # Llama-3.2-1B
    "8b": dict(layers=32, hidden=4096, ffn=14336, tied=False, vocab=128256),  # Llama-3.1-8B
    "tiny": dict(layers=2, hidden=64, ffn=96, tied=True, vocab=1000),
}  # smoke tests (CPU)
VARIANTS = {
    "eager": "HF eager",
    "inductor": "torch.compile(model)",
    "inductor_cg": "torch.compile(model, mode='reduce-overhead')",
    "liger": "Liger kernels (RMSNorm, RoPE, SwiGLU, fused linear + CE), eager",
    "foak": "torch.compile(model, backend='foak')",
    "foak_loss": "torch.compile(loss function, backend='foak'): the logits are dead, linear + CE fuse",
    "foak_loss_cg": "as foak_loss, mode='reduce-overhead'",
    "trainer_inductor": "HF Trainer, TrainingArguments(torch_compile=True)",
    "trainer_foak": "HF Trainer after compile_for_trainer(model, loss_only=True)",
    "trainer_foak_cg": "as trainer_foak, mode='reduce-overhead' (CUDA graphs)",
    "trainer_foak_noclip": "as trainer_foak, max_grad_norm=0 (no gradient clipping)",
    "trainer_inductor_noclip": "as trainer_inductor, max_grad_norm=0 (no gradient clipping)",
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Clock:
    """Time stamps on the device's stream (CUDA events), or the host clock on a CPU run."""

    def __init__(self, device):
        import torch

        self.cuda, self.torch, self.stamps = device == "cuda", torch, []

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def mark(self):
        if self.cuda:
            self.stamps.append(self.torch.cuda.Event(enable_timing=True))
            self.stamps[-1].record()
        else:
            self.stamps.append(time.perf_counter())

    def ms(self, i, j):
        a, b = self.stamps[i], self.stamps[j]
        return a.elapsed_time(b) if self.cuda else (b - a) * 1000


def build(args):
    """The peft model on args.device: bf16, or its decoder projections quantised there (NF4 with
    double quant through bitsandbytes, GPTQ 4-bit g128 through gptqmodel's packer)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=args.vocab,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=args.tied,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if args.quant == "nf4":
        quantize_nf4(model.model)
        model.is_loaded_in_4bit = True  # peft then wraps the layers with its bitsandbytes LoRA
    elif args.quant == "gptq":
        from .bench_lora_gptq import quantize_linears

        quantize_linears(model.model)
    lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=args.dropout, task_type="CAUSAL_LM", target_modules=TARGETS)
    return get_peft_model(model, lcfg)


def quantize_nf4(module):
    """Every nn.Linear under `module` → a bitsandbytes NF4 Linear4bit (double quant, bf16 compute),
    quantised where it lies (no save and reload), one layer at a time."""
    import bitsandbytes as bnb
    import torch

    for mod in list(module.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True, module=q
                ).to(child.weight.device)
                setattr(mod, name, q)
                del child
    torch.cuda.empty_cache()


def matmul_tflops():
    """Measured bf16 matmul ceiling (8192³), the denominator of MFU."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - t) / 1e12


def model_flops_per_step(tokens, seq, layers, hidden, ffn, vocab=128256, heads=32, kv_heads=8, rank=16):
    """From the shapes, so a packed 4-bit base counts as the matmuls it stands for. A LoRA step:
    the frozen base (projections and the lm_head) costs forward + input gradient (4 flops per
    weight per token), the adapters also their weight gradient (6); causal attention 4·seq·hidden
    per token per layer, ×3 with backward."""
    kv = hidden // heads * kv_heads
    projections = [
        (hidden, hidden),
        (hidden, kv),
        (hidden, kv),
        (hidden, hidden),
        (hidden, ffn),
        (hidden, ffn),
        (ffn, hidden),
    ]
    base = layers * sum(i * o for i, o in projections) + hidden * vocab
    lora = layers * sum(rank * (i + o) for i, o in projections)
    attn = 3 * 4 * seq * hidden * layers / 2
    return tokens * (4 * base + 6 * lora + attn)


def compile_phases():
    """torch's compile phase timers (Dynamo, AOTAutograd, inductor), seconds summed over graphs; ≥ 0.5 s."""
    from torch._dynamo.utils import compilation_time_metrics

    sums = {k: sum(v) for k, v in compilation_time_metrics.items()}
    return {k: round(v, 1) for k, v in sorted(sums.items(), key=lambda kv: -kv[1]) if v >= 0.5}


def _model_step(args, model, ids):
    """The plain training loop: (step function, the foak reports' owner or None)."""
    import torch

    variant = args.variant
    fwd = model
    if variant in ("inductor", "inductor_cg"):
        fwd = torch.compile(model, mode="reduce-overhead" if variant == "inductor_cg" else None)
    elif variant == "foak":
        fwd = torch.compile(model, backend="foak")  # the registered entry point, as users write it
    elif variant.startswith("foak_loss"):
        fwd = torch.compile(
            lambda **kw: model(**kw).loss, backend="foak", mode="reduce-overhead" if variant.endswith("_cg") else None
        )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cudagraphs = variant.endswith("_cg")

    def step():
        if cudagraphs:  # a new iteration: the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        out = fwd(input_ids=ids, labels=ids)
        loss = out if isinstance(out, torch.Tensor) else out.loss
        loss.backward()
        loss = loss.detach().clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _time_loop(step, n, clock):
    """(first step s, step times ms, last loss): the first step, 2 warm-up steps, n timed steps."""
    clock.sync()
    t0 = time.perf_counter()
    step()
    clock.sync()
    first = time.perf_counter() - t0
    for _ in range(2):
        step()
    clock.mark()
    for _ in range(n):
        loss = step()
        clock.mark()
    clock.sync()
    return first, [clock.ms(i, i + 1) for i in range(n)], float(loss)


def _time_trainer(args, model, ids, clock):
    """HF Trainer over an in-memory dataset of `ids`' rows: (first step s, step times ms, loss). A step
    is timed from one optimizer step's start to the next's (data loading included)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Steps(TrainerCallback):
        first = None

        def on_train_begin(self, *a, **kw):
            clock.sync()
            self.t0 = time.perf_counter()

        def on_step_begin(self, *a, **kw):
            clock.mark()
            if len(clock.stamps) == 2:
                clock.sync()
                self.first = time.perf_counter() - self.t0

        def on_train_end(self, *a, **kw):
            clock.mark()
            clock.sync()

    steps = 3 + args.steps
    rows = ids.cpu()
    data = [{"input_ids": rows[i % len(rows)], "labels": rows[i % len(rows)]} for i in range(steps * args.bs)]
    callbacks = [Steps()]
    if args.variant.startswith("trainer_foak"):
        from foak_compile.integrations import FoakCallback, compile_for_trainer

        compile_for_trainer(model, loss_only=True, mode="reduce-overhead" if args.variant.endswith("_cg") else None)
        callbacks.append(FoakCallback(dump=False))
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="foak_bench_trainer_"),
        max_steps=steps,
        per_device_train_batch_size=args.bs,
        learning_rate=1e-4,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        use_cpu=args.device == "cpu",
        max_grad_norm=0.0 if args.variant.endswith("_noclip") else 1.0,
        torch_compile=args.variant.startswith("trainer_inductor"),
    )
    out = Trainer(model=model, args=targs, train_dataset=data, callbacks=callbacks).train()
    # stamps: each step's start, then the end of training; the first 3 steps are compile and warm-up
    return callbacks[0].first, [clock.ms(i, i + 1) for i in range(3, steps)], out.training_loss


def run_one(args):
    import torch

    if args.variant == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True
        )
    if "foak" in args.variant:
        import foak_compile

        if "foak" not in torch._dynamo.list_backends():
            sys.exit("backend 'foak' is not registered: install the package (pip install -e .)")
    model = build(args)
    model.train()
    ids = torch.randint(
        0,
        args.vocab,
        (args.bs, args.seq),
        device=args.device,
        generator=torch.Generator(device=args.device).manual_seed(1),
    )
    clock = Clock(args.device)
    clock.sync()
    cuda = args.device == "cuda"
    built = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # building (and quantising) the model is not the step
    step = None
    if args.variant.startswith("trainer"):
        first, times, loss = _time_trainer(args, model, ids, clock)
    else:
        step = _model_step(args, model, ids)
        first, times, loss = _time_loop(step, args.steps, clock)
    med = statistics.median(times)
    tokens = args.bs * args.seq
    res = dict(
        variant=args.variant,
        quant=args.quant,
        shape=args.shape,
        layers=args.layers,
        hidden=args.hidden,
        ffn=args.ffn,
        bs=args.bs,
        seq=args.seq,
        steps=len(times),
        step_ms=round(med, 2),
        min_ms=round(min(times), 2),
        tokens_per_s=round(tokens / med * 1000),
        mem_gib=round(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0, 2),
        model_gib=round(built / 2**30, 2),
        first_step_s=round(first, 1),
        loss=round(loss, 4),
        model_tflops_per_step=round(
            model_flops_per_step(tokens, args.seq, args.layers, args.hidden, args.ffn, args.vocab) / 1e12, 2
        ),
        compile_phases=compile_phases(),
    )
    if "foak" in args.variant:
        import foak_compile

        res["foak_matches"] = foak_compile.total_counts(foak_compile.reports())
        res["foak_graphs"] = len(foak_compile.reports())
    if args.profile and step is not None and cuda:
        from .common import device_slug

        res["profile"] = profile(
            step, args.profile, f"{device_slug()}_{args.variant}_{args.quant}_{args.shape}", vocab=args.vocab
        )
    print("RESULT " + json.dumps(res), flush=True)


def profile(step, out_dir, name, steps=3, rank=16, vocab=None):
    """torch.profiler over a few steps: the top kernels and ops as text, how much of the step the
    GPU is busy (kernel time / wall time: what is left is host overhead and synchronisation), and
    where the device time goes by category (`breakdown`)."""
    import torch
    from torch.profiler import ProfilerActivity, profile as prof

    os.makedirs(out_dir, exist_ok=True)
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as p:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / steps * 1000
    ka = p.key_averages()
    kernels = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us = sum(e.time_range.elapsed_us() for e in kernels)
    busy = kernel_us / steps / 1000
    split = breakdown(p.key_averages(group_by_input_shape=True), kernels, rank, vocab)
    split = {k: round(v / steps / 1000, 2) for k, v in split.items()}
    with open(os.path.join(out_dir, f"{name}.txt"), "w") as f:
        f.write(f"# {name}: {steps} steps, wall {wall:.1f} ms/step, GPU busy {busy:.1f} ms/step\n\n")
        f.write("## where the device time goes (ms/step)\n")
        f.write("".join(f"{k:>14}  {v:8.2f}\n" for k, v in split.items()))
        f.write("\n## by device time\n")
        f.write(ka.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=70))
        f.write("\n\n## by host time\n")
        f.write(ka.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70))
    return {
        "wall_ms": round(wall, 2),
        "gpu_busy_ms": round(busy, 2),
        "gpu_busy_pct": round(100 * busy / wall, 1),
        "breakdown_ms": split,
    }


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_", "aten::_scaled_mm")
GEMM_KERNELS = ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_")
KERNEL_KINDS = (  # first match wins, before GEMM_KERNELS (cuDNN's attention kernels say sm90_ too)
    ("dequant", ("dequant", "kdequant")),
    ("attention", ("attention", "flash", "fmha", "sdpa", "attn")),
    ("loss", ("_ce_", "cross_entropy", "_lce", "log_softmax", "nll_loss", "logsumexp")),
    ("optimizer", ("multi_tensor", "adam", "foreach", "fused_adam")),
)


def breakdown(shape_averages, kernels, rank=16, vocab=None) -> dict:
    """Device µs over the profiled steps by category: GEMMs split by their operands' shapes into the
    LoRA ones (an operand dimension equal to the rank), the lm_head's (one equal to the vocabulary)
    and the base projections' (the rest); other kernels by name into dequant, attention, loss,
    optimizer and the memory-bound rest (norms, rope, activations, adds, casts, copies)."""
    out = dict.fromkeys(("base_gemm", "lora_gemm", "lm_head_gemm", "dequant", "attention", "loss"), 0.0)
    out.update(optimizer=0.0, memory_bound=0.0)
    gemm_total = 0.0
    for e in shape_averages:
        if e.key not in GEMM_OPS:
            continue
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        dims = {d for shape in (e.input_shapes or []) for d in (shape or [])}
        kind = "lora_gemm" if rank in dims else "lm_head_gemm" if vocab in dims else "base_gemm"
        out[kind] += us
        gemm_total += us
    gemm_kernels = 0.0
    for k in kernels:
        name, us = k.name.lower(), k.time_range.elapsed_us()
        kind = next((c for c, keys in KERNEL_KINDS if any(key in name for key in keys)), None)
        if kind is None and any(g in name for g in GEMM_KERNELS):
            gemm_kernels += us
            continue
        out[kind or "memory_bound"] += us
    # GEMM kernels launched outside an aten GEMM op (a fused op's own cuBLAS call is still aten::mm;
    # this is what no op claimed, e.g. inside cuDNN or a Triton matmul)
    out["other_gemm"] = max(gemm_kernels - gemm_total, 0.0)
    return out


_TORCH_LOG = re.compile(r"^\s*(?:\[[^\]]*\]:)?W\d{4} [\d:.]+ \d+ ([^\]]+)\] (.*)$")  # W1205 12:00:00.1 123 file:42] msg
_PY_WARNING = re.compile(r"^\S+:\d+: (\w*Warning): (.*)$")  # file.py:42: XWarning: msg


def warnings_of(stderr):
    """The warnings a process printed, as {message: count}; numbers masked so one message repeated
    for 48 kernels counts as one message seen 48 times."""
    seen = Counter()
    for line in stderr.splitlines():
        m = _TORCH_LOG.match(line) or _PY_WARNING.match(line)
        if m:
            where, msg = m.groups()
            seen[re.sub(r"\d+", "N", f"{where.split(':')[0]}: {msg.strip()}")[:200]] += 1
    return dict(seen)


def drive(args):
    ceiling = matmul_tflops() if args.device == "cuda" else 0.0
    rows = []
    for quant in args.quants.split(","):
        for variant in args.variants.split(","):
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.train_step",
                "--variant",
                variant,
                "--quant",
                quant,
                "--shape",
                args.shape,
                "--device",
                args.device,
                "--dropout",
                str(args.dropout),
                "--steps",
                str(args.steps),
                "--bs",
                str(args.bs),
                "--seq",
                str(args.seq),
            ]
            cmd += ["--profile", args.profile] if args.profile else []
            # a cold compile cache for each variant: no one reuses kernels another variant compiled
            cache = tempfile.mkdtemp(prefix=f"foak_bench_{variant}_{quant}_")
            env = dict(
                os.environ,
                TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                TRITON_CACHE_DIR=os.path.join(cache, "triton"),
            )
            t = time.perf_counter()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
                out, err, rc = p.stdout, p.stderr, p.returncode
            except subprocess.TimeoutExpired as e:
                out, err, rc = e.stdout or "", (e.stderr or "") + f"\ntimed out after {args.timeout} s", -1
                out, err = (
                    (out.decode() if isinstance(out, bytes) else out),
                    (err.decode() if isinstance(err, bytes) else err),
                )
            line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            if rc or not line:
                rows.append(dict(variant=variant, quant=quant, shape=args.shape, error=(err or out)[-1500:]))
            else:
                r = json.loads(line[-1][len("RESULT ") :])
                if ceiling:
                    r["mfu_pct"] = round(100 * r["model_tflops_per_step"] / (r["step_ms"] / 1000) / ceiling, 1)
                r["warnings"] = warnings_of(err)
                rows.append(r)
            rows[-1]["wall_s"] = round(time.perf_counter() - t, 1)
            print(
                json.dumps({k: v for k, v in rows[-1].items() if k not in ("compile_phases", "warnings")})[:600],
                flush=True,
            )
            _write(args.out, ceiling, rows)  # after every row: a cut-short run keeps what it measured
    _write(args.out, ceiling, rows)


def compare(rows):
    """Each row against the inductor row of its base and shape (the Trainer rows against the Trainer's
    own inductor row): speed, memory and first-step ratios, and the warnings inductor did not print."""
    for r in rows:
        if "error" in r:
            continue
        ref_variant = "trainer_inductor" if r["variant"].startswith("trainer") else "inductor"
        ref = next(
            (
                i
                for i in rows
                if "error" not in i
                and i["variant"] == ref_variant
                and i.get("run") == r.get("run")
                and (i["quant"], i.get("shape")) == (r["quant"], r.get("shape"))
            ),
            None,
        )
        if ref is None:
            continue
        ratio = lambda k: round(r[k] / ref[k], 3) if ref[k] else None
        r["vs_inductor"] = {
            "tokens_per_s": ratio("tokens_per_s"),
            "peak_mem": ratio("mem_gib"),
            "first_step": ratio("first_step_s"),
        }
        if "warnings" in r and "warnings" in ref:
            r["extra_warnings"] = {m: n for m, n in r["warnings"].items() if m not in ref["warnings"]}
    return rows


def merge(paths, out):
    """One results file from several driver calls (one device call each, e.g. one per base): rows tagged
    with their call ("run": the file's name), ratios only within a call, each call's matmul ceiling kept."""
    from .common import write_json

    calls = [json.load(open(p)) for p in paths]
    rows = [dict(r, run=os.path.basename(p)) for p, c in zip(paths, calls) for r in c["rows"]]
    for r in rows:
        r.pop("vs_inductor", None)  # recomputed per call below
        r.pop("extra_warnings", None)
    write_json(
        out,
        {
            "env": calls[0]["env"],
            "matmul_tflops": calls[0]["matmul_tflops"],
            "runs": [{"run": os.path.basename(p), "matmul_tflops": c["matmul_tflops"]} for p, c in zip(paths, calls)],
            "rows": compare(rows),
        },
        echo=False,
    )


def _write(path, ceiling, rows):
    from .common import environment, write_json

    write_json(path, {"env": environment(), "matmul_tflops": round(ceiling, 1), "rows": compare(rows)}, echo=False)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=list(VARIANTS))
    p.add_argument("--all", action="store_true", help="run --variants × --quants, each in its own process")
    p.add_argument("--variants", default="inductor,foak")
    p.add_argument("--quants", default="none,nf4")
    p.add_argument("--quant", default="none", choices=["none", "nf4", "gptq"])
    p.add_argument("--shape", default="1b", choices=list(SHAPES))
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the harness (tiny shape, no timings to keep)")
    p.add_argument("--bs", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--timeout", type=int, default=400, help="seconds per variant")
    p.add_argument(
        "--out",
        default=os.path.join(tempfile.gettempdir(), "foak_train_step.json"),
        help="the JSON (python -m benchmarks.suite train-step: benchmarks/results/train_step/<device>.json)",
    )
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge these calls' files into --out and exit")
    p.add_argument(
        "--profile", default="", help="directory: also profile 3 steps, write <device>_<variant>_<quant>_<shape>.txt"
    )
    args = p.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    for k, v in SHAPES[args.shape].items():
        setattr(args, k, v)
    if args.all:
        unknown = set(args.variants.split(",")) - set(VARIANTS)
        if unknown:
            p.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
        drive(args)
    else:
        run_one(args)


if __name__ == "__main__":
    main()
