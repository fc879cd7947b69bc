"""Loss parity of multi-process LoRA training (DDP, FSDP2 `fully_shard`) with one process, the model
compiled with backend foak, on a dense or a bitsandbytes NF4 base.

    # everything, one command: the single-process reference, then torchrun DDP and FSDP2, compared
    python scripts/distributed_parity.py --all --nproc 2 --bases bf16,nf4 --out parity.json
    # one run (what --all launches), e.g.
    torchrun --nproc_per_node 2 scripts/distributed_parity.py --mode fsdp2 --base nf4 --out /tmp/fsdp2_nf4.json
    python scripts/distributed_parity.py --mode single --base nf4 --out /tmp/single_nf4.json

Every run builds the same Llama from a config (seeded, random weights), the same peft LoRA on all seven
projections (lora_B started random) and the same fixed batches. The global batch is split across ranks,
so one process on the whole batch and N processes on 1/N each see the same loss and, after the gradient
average, take the same step. Each run writes {"losses", "grad_norms", "lora_abs_sum", "counts",
"counts_per_rank", "peak_gib", "median_step_s", ...}; --all adds, per distributed run, the largest
relative difference of the loss curve and of the gradient norms against the single process, and "ok"
(loss within --rtol, gradient norms within --grad-rtol, the same foak matches).

On CUDA: NCCL, the base in bf16 (or NF4 with bf16 compute). On CPU: gloo, fp32 (--base fp32; NF4 works
there too through bitsandbytes' CPU path), the Triton kernels under TRITON_INTERPRET=1 (set below).

DDP: model.compile(backend=foak) then DDP(model), as Trainer does (--ddp-compile outer, or "ddp_outer" in
--modes: torch.compile(DDP(model))). FSDP2: fully_shard on every decoder layer and the root, then
model.compile(backend=foak). An NF4 base weight is a bitsandbytes Params4bit (packed uint8 data, its
quant_state on the Python object); --nf4-fsdp "replicate" (default) passes those weights to
fully_shard(ignored_params=...): they stay whole on every rank (4 bits a weight) while adapters, norms and
embeddings are sharded. "shard" shards them too: training is still right, but Dynamo cannot trace
bitsandbytes re-wrapping the gathered weight (graph break "Failed to mutate tensor data attribute" in
Params4bit.__new__), so the graph falls apart and the 4-bit LoRA layers are not fused.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

# Without a GPU the kernels run in the Triton interpreter, which triton.jit picks when foak_compile
# (imported later, inside run()) first imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a file from anywhere: import foak_compile from this checkout
    sys.path.insert(0, ROOT)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRESETS = {
    # CPU CI: odd, tiny sizes
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=131,
    ),
    # GPU parity: small enough to build quickly, big enough for real kernels and several FSDP units
    "small": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=32000,
    ),
    # Llama-3.2-1B shape (use --layers to cut depth)
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["single", "ddp", "fsdp2"], default="single")
    p.add_argument("--base", default=None, help="fp32 | bf16 | nf4 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", default="foak", choices=["foak", "none"])
    p.add_argument("--inner", default=None, help="foak's inner compiler (default: inductor on CUDA, aot_eager on CPU)")
    p.add_argument("--preset", default=None, choices=list(PRESETS), help="default: small on CUDA, tiny on CPU")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="default: 20 on CUDA, 4 on CPU")
    p.add_argument("--batch", type=int, default=None, help="global batch (rows), split across ranks")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--nf4-fsdp", choices=["replicate", "shard"], default="replicate")
    p.add_argument(
        "--ddp-compile",
        choices=["inner", "outer"],
        default="inner",
        help="inner: model.compile() then DDP(model) (what Trainer does); outer: torch.compile(DDP(model)), "
        "Dynamo's DDPOptimizer then splits the graph at gradient-bucket boundaries",
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="non-reentrant, every layer")
    p.add_argument("--out", required=True, help="JSON written by rank 0")
    # driver
    p.add_argument("--all", action="store_true", help="single, then torchrun ddp and fsdp2 for each base, compared")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--bases", default=None, help="--all: comma list (default: bf16,nf4 on CUDA, fp32 on CPU)")
    p.add_argument(
        "--modes",
        default="ddp,fsdp2",
        help="--all: distributed runs to compare: ddp, ddp_outer (torch.compile(DDP(model))), fsdp2",
    )
    p.add_argument("--rtol", type=float, default=None, help="--all, loss curve: default 1e-4 fp32, 1e-2 bf16/nf4")
    p.add_argument(
        "--grad-rtol", type=float, default=None, help="--all, gradient norms: default 1e-3 fp32, 5e-2 bf16/nf4"
    )
    p.add_argument("--timeout", type=int, default=1200, help="--all: seconds per launched run")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    a.base = a.base or ("bf16" if cuda else "fp32")
    a.inner = a.inner or ("inductor" if cuda else "aot_eager")
    a.preset = a.preset or ("small" if cuda else "tiny")
    a.steps = a.steps or (20 if cuda else 4)
    a.batch = a.batch or (8 if cuda else 4)
    a.seq = a.seq or (512 if cuda else 16)
    return a


# --- model ---------------------------------------------------------------------------------------


def to_nf4(model, compute_dtype, device):
    """Every nn.Linear except lm_head → bitsandbytes Linear4bit (NF4, double quant), quantised on `device`."""
    import bitsandbytes as bnb

    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute_dtype,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data.to(compute_dtype),
                    requires_grad=False,
                    quant_type="nf4",
                    compress_statistics=True,
                    module=q,
                )
                setattr(mod, name, q.to(device))  # .to() quantises, identically on every rank
    model.is_loaded_in_4bit = True  # peft then wraps the 4-bit layers with lora.bnb.Linear4bit
    return model


def build(a, device):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(PRESETS[a.preset], max_position_embeddings=max(256, a.seq))
    if a.layers:
        cfg["num_hidden_layers"] = a.layers
    config = LlamaConfig(**cfg)
    config._attn_implementation = "sdpa" if device.type == "cuda" else "eager"
    config.use_cache = False
    torch.manual_seed(0)  # the same weights on every rank and in the single run
    model = LlamaForCausalLM(config)
    dense = {"fp32": torch.float32, "bf16": torch.bfloat16, "nf4": None}[a.base]
    if a.base == "nf4":
        compute = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = to_nf4(model.to(compute), compute, device)
        model.to(device)
    else:
        model.to(device, dense)
    lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    torch.manual_seed(1)  # peft zeroes lora_B: start it random so adapters matter from step 0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    if a.gradient_checkpointing:
        from foak_compile.integrations import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    model.train()
    return model


def batches(a, vocab, device, rank, world):
    """--steps global batches of a learnable corpus (each row counts up from a random start), this rank's rows."""
    g = torch.Generator().manual_seed(2)
    rows = a.batch // world
    for _ in range(a.steps):
        start = torch.randint(0, vocab, (a.batch, 1), generator=g)
        ids = (start + torch.arange(a.seq)) % vocab
        yield ids[rank * rows : (rank + 1) * rows].to(device)


# --- one run -------------------------------------------------------------------------------------


def run(a):
    import torch.distributed as dist
    import foak_compile

    distributed = a.mode != "single"
    cuda = torch.cuda.is_available()
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
    else:
        rank, world, local = 0, 1, 0
    if a.batch % world:
        raise SystemExit(f"--batch {a.batch} is not divisible by {world} processes")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = build(a, device)
    be = foak_compile.backend(inner=a.inner) if a.compile == "foak" else None
    wrapped = model
    if a.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        if be is not None and a.ddp_compile == "inner":
            model.compile(backend=be)  # in place, inside DDP: what Trainer does with compile_for_trainer
        wrapped = DDP(model, device_ids=[local] if cuda else None)
        if be is not None and a.ddp_compile == "outer":
            wrapped = torch.compile(wrapped, backend=be)
    elif a.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        ignored = None
        if a.base == "nf4" and a.nf4_fsdp == "replicate":
            ignored = {p for p in model.parameters() if hasattr(p, "quant_state")}
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, ignored_params=ignored)
        fully_shard(model, ignored_params=ignored)
        if be is not None:
            model.compile(backend=be)
    elif be is not None:
        model.compile(backend=be)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr)
    losses, norms, step_s, t0 = [], [], [], time.time()
    peak_from = min(2, a.steps - 1)  # steady-state peak: after the compiling / warm-up steps
    for step, ids in enumerate(batches(a, model.config.vocab_size, device, rank, world)):
        if cuda and step == peak_from:
            torch.cuda.synchronize()
            total_peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        ts = time.perf_counter()
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        # the gradient's norm catches a wrong reduction (sum for mean) that Adam's scale invariance would hide
        norms.append(torch.nn.utils.clip_grad_norm_(params, float("inf")).float().item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen = loss.detach().float().clone()
        if distributed:  # every rank's share has as many tokens: the global loss is the mean of the ranks'
            dist.all_reduce(seen)
            seen /= world
        losses.append(seen.item())  # .item() synchronises: the step time below is complete
        step_s.append(time.perf_counter() - ts)
    abs_sum = 0.0
    for n, p in model.named_parameters():
        if "lora_" in n:
            t = p.detach()
            t = t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 shards are DTensors
            abs_sum += t.float().abs().sum().item()
    result = {
        "mode": a.mode,
        "world": world,
        "base": a.base,
        "compile": a.compile,
        "inner": a.inner,
        "preset": a.preset,
        "layers": model.config.num_hidden_layers,
        "steps": a.steps,
        "batch": a.batch,
        "seq": a.seq,
        "gradient_checkpointing": a.gradient_checkpointing,
        "ddp_compile": a.ddp_compile if a.mode == "ddp" else None,
        "nf4_fsdp": a.nf4_fsdp if a.base == "nf4" else None,
        "losses": losses,
        "grad_norms": norms,
        "lora_abs_sum": abs_sum,
        "counts": foak_compile.total_counts(),
        "graphs": len(foak_compile.reports()),
        "seconds": round(time.time() - t0, 2),
        "step_s": [round(x, 4) for x in step_s],
        "median_step_s": round(sorted(step_s[peak_from:])[len(step_s[peak_from:]) // 2], 4),
        # rank 0's peak allocated memory: over every step, and over the steps after warm-up
        "peak_gib": round(max(total_peak, torch.cuda.max_memory_allocated()) / 2**30, 3) if cuda else None,
        "steady_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }
    if distributed:  # the same patterns must have matched on every rank
        counts = [None] * world
        dist.all_gather_object(counts, result["counts"])
        result["counts_per_rank"] = counts
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps({k: result[k] for k in ("mode", "base", "losses", "counts")}), flush=True)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
        if a.base == "nf4" and not cuda:
            # CPU gloo + bitsandbytes: the process hangs in interpreter teardown after everything is done
            # (seen with torch 2.13 / bitsandbytes 0.50.2); all results are written, so leave at once.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


# --- driver --------------------------------------------------------------------------------------


def rel_diff(xs, ys):
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(xs, ys))


def drive(a, argv):
    """The single-process reference, then each distributed mode under torchrun, per base; compared."""
    cuda = torch.cuda.is_available()
    bases = (a.bases or ("bf16,nf4" if cuda else "fp32")).split(",")
    keep = []  # pass-through options of a single run
    skip = {
        "--all",
        "--nproc",
        "--bases",
        "--modes",
        "--rtol",
        "--grad-rtol",
        "--out",
        "--timeout",
        "--base",
        "--mode",
        "--ddp-compile",
    }
    it = iter(argv)
    for tok in it:
        name = tok.split("=")[0]
        if name in skip:
            if "=" not in tok and name not in ("--all",):
                next(it, None)
            continue
        keep.append(tok)
    out_dir = os.path.splitext(os.path.abspath(a.out))[0] + "_runs"
    os.makedirs(out_dir, exist_ok=True)
    script = os.path.abspath(__file__)
    summary = {"nproc": a.nproc, "runs": {}, "ok": True}
    for base in bases:
        rtol = a.rtol if a.rtol is not None else (1e-4 if base == "fp32" else 1e-2)
        grad_rtol = a.grad_rtol if a.grad_rtol is not None else (1e-3 if base == "fp32" else 5e-2)
        runs = {"single": [sys.executable, script, "--mode", "single"]}
        for mode in a.modes.split(","):
            extra = ["--mode", "ddp", "--ddp-compile", "outer"] if mode == "ddp_outer" else ["--mode", mode]
            runs[mode] = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(a.nproc),
                "--master_port",
                str(_free_port()),
                script,
            ] + extra
        results = {}
        for mode, cmd in runs.items():
            path = os.path.join(out_dir, f"{mode}_{base}.json")
            if os.path.exists(path):
                os.remove(path)
            cmd = cmd + ["--base", base, "--out", path] + keep
            print("+", " ".join(cmd), flush=True)
            t = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            entry = {"command": " ".join(cmd), "returncode": proc.returncode, "wall_s": round(time.time() - t, 1)}
            if proc.returncode == 0 and os.path.exists(path):
                with open(path) as f:
                    entry.update(json.load(f))
            else:
                entry["error"] = _last_error(proc.stdout + proc.stderr)
                summary["ok"] = False
                print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n", flush=True)
            results[mode] = entry
        ref = results["single"].get("losses")
        for mode, entry in results.items():
            if mode == "single" or not ref or "losses" not in entry:
                continue
            entry["max_rel_loss_diff"] = rel_diff(entry["losses"], ref)
            entry["max_rel_grad_norm_diff"] = rel_diff(entry["grad_norms"], results["single"]["grad_norms"])
            entry["lora_abs_sum_rel_diff"] = (
                abs(entry["lora_abs_sum"] - results["single"]["lora_abs_sum"]) / results["single"]["lora_abs_sum"]
            )
            entry["rtol"], entry["grad_rtol"] = rtol, grad_rtol
            entry["ok"] = (
                entry["max_rel_loss_diff"] <= rtol
                and entry["max_rel_grad_norm_diff"] <= grad_rtol
                and entry["counts"] == results["single"]["counts"]
            )
            summary["ok"] &= entry["ok"]
        summary["runs"][base] = results
    with open(a.out, "w") as f:
        json.dump(summary, f, indent=1)
    for base, results in summary["runs"].items():
        for mode, e in results.items():
            print(
                f"{base:5s} {mode:7s} rc={e['returncode']} losses={[round(x, 5) for x in e.get('losses', [])]} "
                f"diff={e.get('max_rel_loss_diff')} grad-norm diff={e.get('max_rel_grad_norm_diff')} "
                f"counts={e.get('counts')} {e.get('error', '')}"
            )
    print("ok" if summary["ok"] else "MISMATCH OR FAILURE", "->", a.out)
    return 0 if summary["ok"] else 1


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_error(text):
    lines = [ln for ln in text.splitlines() if "Error" in ln or "error:" in ln]
    return lines[-1].strip() if lines else text.strip().splitlines()[-1:] and text.strip().splitlines()[-1]


if __name__ == "__main__":
    args = parse()
    sys.exit(drive(args, sys.argv[1:]) if args.all else run(args))
