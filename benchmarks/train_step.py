"""One LoRA training step of a Llama-3.2-1B-shaped model (random weights), each variant in its own
process, same inputs: eager, inductor, Liger (eager / inductor), foak.

    python -m benchmarks.train_step --all --out benchmarks/results/train_step.json   # driver
    python -m benchmarks.train_step --variant foak --quant nf4                       # one variant

Measured as the reference figures were (../shared/reference/anchor_train_step.py): bs 2 × seq 2048,
peft LoRA r=16 alpha=32 on all seven projections, AdamW, 2 warm-up steps after the first, then the
median of --steps CUDA-event-timed steps; peak allocated memory over the timed steps.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ["eager", "inductor", "liger", "liger_inductor", "foak", "foak_loss", "inductor_cg", "foak_cg",
            "foak_loss_cg", "foak_sib", "foak_loss_sib_cg", "foak_nosib", "foak_loss_nosib_cg", "foak_swiglu",
            "foak_loss_swiglu_cg", "foak_opq", "foak_loss_opq_cg", "foak_loss_inl_cg", "foak_loss_lceonline_cg",
            "foak_loss_lcechunked", "foak_loss_lcechunked_cg"]
# *_cg: mode="reduce-overhead" (CUDA graphs), for inductor as for foak; foak_loss*: the loss alone
# is compiled (the logits are dead, so linear + cross-entropy fuse). Pattern sets: foak* = the
# default (lora_siblings in it since session 4; *_sib* name it explicitly, as earlier runs did);
# *_nosib*: without lora_siblings (every LoRA layer its own op); *_swiglu*: plus opt-in lora_swiglu;
# *_opq* / *_inl*: the 4-bit dequant always / never an opaque op (FOAK_OPAQUE_DEQUANT=1 / 0; by default
# it is opaque only in the *_cg variants); *_lceonline*: the frozen-lm_head vocabulary-tiled linear + CE
# forced on (cross_entropy_online.ENABLED = True; by default it is chosen by size); *_lcechunked*: forced off
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192, tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    if args.quant == "nf4":
        from transformers import BitsAndBytesConfig
        path = f"/tmp/llama_{args.layers}_{args.hidden}"
        if not os.path.exists(path):
            LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=True)
        model = LlamaForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    elif args.quant == "gptq":
        # every decoder projection → a gptqmodel TorchLinear (4-bit, group 128, symmetric) packed by
        # gptqmodel's own packer from the random weights; lm_head/embeddings stay bf16 (tied)
        from .bench_lora_gptq import quantize_linears
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        quantize_linears(model.model)
    else:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=args.dropout, task_type="CAUSAL_LM", target_modules=TARGETS)
    return get_peft_model(model, lcfg)


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
    the frozen base (projections and the tied lm_head) costs forward + input gradient (4 flops per
    weight per token), the adapters also their weight gradient (6); causal attention 4·seq·hidden
    per token per layer, ×3 with backward."""
    kv = hidden // heads * kv_heads
    projections = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
                   (hidden, ffn), (hidden, ffn), (ffn, hidden)]
    base = layers * sum(i * o for i, o in projections) + hidden * vocab
    lora = layers * sum(rank * (i + o) for i, o in projections)
    attn = 3 * 4 * seq * hidden * layers / 2
    return tokens * (4 * base + 6 * lora + attn)


def run_one(args):
    import torch
    if args.variant.startswith("liger"):
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    model = build(args)
    model.train()
    ids = torch.randint(0, 128256, (args.bs, args.seq), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(1))
    fwd = model
    be = None
    cudagraphs = args.variant.endswith("_cg")
    if args.variant in ("inductor", "liger_inductor", "inductor_cg"):
        fwd = torch.compile(model, mode="reduce-overhead" if cudagraphs else None)
    elif args.variant.startswith("foak"):
        import foak_compile
        from foak_compile.patterns import DEFAULT
        patterns = list(DEFAULT)
        if "_nosib" in args.variant:
            patterns.remove("lora_siblings")
        elif "_sib" in args.variant:
            patterns.append("lora_siblings")  # already a default: the backend takes it once
        if "_swiglu" in args.variant:
            patterns.append("lora_swiglu")
        if "_opq" in args.variant or "_inl" in args.variant:
            from foak_compile.ops import dequant
            dequant.OPAQUE = "_opq" in args.variant
        if "_lceonline" in args.variant or "_lcechunked" in args.variant:
            from foak_compile.kernels import cross_entropy_online
            cross_entropy_online.ENABLED = "_lceonline" in args.variant
        be = foak_compile.backend(patterns=patterns, mode="reduce-overhead" if cudagraphs else None)
        # foak_loss compiles the loss alone, so the logits are dead and linear+CE can fuse
        loss_only = args.variant.startswith("foak_loss")
        fwd = torch.compile((lambda **kw: model(**kw).loss) if loss_only else model, backend=be)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

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

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    warmup_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        loss = step()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    med = statistics.median(times)
    tokens = args.bs * args.seq
    res = dict(variant=args.variant, quant=args.quant, layers=args.layers, hidden=args.hidden, ffn=args.ffn,
               bs=args.bs, seq=args.seq,
               step_ms=round(med, 2), min_ms=round(min(times), 2), tokens_per_s=round(tokens / med * 1000),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), first_step_s=round(first, 1),
               # CUDA graphs allocate their pool while recording (warm-up) and replay without
               # allocating, so for *_cg the warm-up peak is the honest figure
               warmup_peak_gib=round(warmup_peak / 2**30, 2),
               mem_gib=round(max(warmup_peak, torch.cuda.max_memory_allocated()) / 2**30 if cudagraphs
                             else torch.cuda.max_memory_allocated() / 2**30, 2),
               loss=round(float(loss), 4),
               model_tflops_per_step=round(model_flops_per_step(tokens, args.seq, args.layers, args.hidden, args.ffn) / 1e12, 2))
    if be is not None:
        import foak_compile
        res["foak_matches"] = foak_compile.total_counts(be.reports)
        res["foak_inline"] = os.environ.get("FOAK_INLINE", "default")
        res["foak_graphs"] = len(be.reports)
    if args.profile:
        res["profile"] = profile(step, args.profile, f"{args.variant}_{args.quant}")
    print("RESULT " + json.dumps(res), flush=True)


def profile(step, out_dir, name, steps=3):
    """torch.profiler over a few steps: the top kernels and ops as text, and how much of the step the
    GPU is busy (kernel time / wall time: what is left is host overhead and synchronisation)."""
    import torch
    from torch.profiler import ProfilerActivity, profile as prof
    os.makedirs(out_dir, exist_ok=True)
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / steps * 1000
    ka = p.key_averages()
    with open(os.path.join(out_dir, f"{name}.txt"), "w") as f:
        f.write(f"# {name}: {steps} steps, wall {wall:.1f} ms/step\n\n## by device time\n")
        f.write(ka.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=70))
        f.write("\n\n## by host time\n")
        f.write(ka.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70))
    kernel_us = sum(e.time_range.elapsed_us() for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    busy = kernel_us / steps / 1000
    return {"wall_ms": round(wall, 2), "gpu_busy_ms": round(busy, 2), "gpu_busy_pct": round(100 * busy / wall, 1)}


def drive(args):
    import torch
    ceiling = matmul_tflops()
    torch.cuda.empty_cache()
    rows = []
    for quant in args.quants.split(","):
        for variant in args.variants.split(","):
            cmd = [sys.executable, "-m", "benchmarks.train_step", "--variant", variant, "--quant", quant,
                   "--layers", str(args.layers), "--hidden", str(args.hidden), "--ffn", str(args.ffn),
                   "--dropout", str(args.dropout), "--steps", str(args.steps), "--bs", str(args.bs), "--seq", str(args.seq)]
            cmd += ["--profile", args.profile] if args.profile else []
            # a cold compile cache for each variant: no one reuses kernels another variant compiled
            cache = tempfile.mkdtemp(prefix=f"foak_bench_{variant}_{quant}_")
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                       TRITON_CACHE_DIR=os.path.join(cache, "triton"))
            t = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not line:
                rows.append(dict(variant=variant, quant=quant, error=(p.stderr or p.stdout)[-1500:]))
            else:
                r = json.loads(line[-1][len("RESULT "):])
                r["mfu_pct"] = round(100 * r["model_tflops_per_step"] / (r["step_ms"] / 1000) / ceiling, 1)
                rows.append(r)
            rows[-1]["wall_s"] = round(time.perf_counter() - t, 1)
            print(json.dumps(rows[-1])[:400], flush=True)
            _write(args.out, ceiling, rows)  # after every row: a cut-short run keeps what it measured
    _write(args.out, ceiling, rows)


def _write(path, ceiling, rows):
    from .common import environment, write_json
    for quant in {r.get("quant") for r in rows}:
        ind = next((r for r in rows if r.get("quant") == quant and r["variant"] == "inductor" and "error" not in r), None)
        for r in rows:
            if ind and r.get("quant") == quant and "error" not in r:
                r["vs_inductor"] = {"tokens_per_s": round(r["tokens_per_s"] / ind["tokens_per_s"], 3),
                                    "peak_mem": round(r["mem_gib"] / ind["mem_gib"], 3),
                                    "first_step": round(r["first_step_s"] / max(ind["first_step_s"], 1e-9), 3)}
    write_json(path, {"env": environment(), "matmul_tflops": round(ceiling, 1), "rows": rows})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", choices=VARIANTS)
    p.add_argument("--all", action="store_true", help="run --variants × --quants, each in its own process")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--quants", default="none,nf4")
    p.add_argument("--quant", default="none", choices=["none", "nf4", "gptq"])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--bs", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--out", default="benchmarks/results/train_step.json")
    p.add_argument("--profile", default="", help="directory: also profile 3 steps, write <variant>_<quant>.txt")
    args = p.parse_args()
    drive(args) if args.all else run_one(args)


if __name__ == "__main__":
    main()
