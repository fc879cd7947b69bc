"""QLoRA fine-tune with the foak backend: a 4-bit NF4 base (bitsandbytes, through transformers'
BitsAndBytesConfig), peft LoRA on all seven projections, Hugging Face Trainer, non-reentrant gradient
checkpointing, the model compiled in place with backend foak.

    # GPU, one command: a Llama-3.2-1B-shaped model (random weights, no download), synthetic data, 300 steps
    python examples/qlora_finetune.py
    # your model and data (a local HF model directory; .jsonl with a "text" field, or a .txt file)
    python examples/qlora_finetune.py --model /models/Llama-3.2-1B --data train.jsonl --steps 500
    # the same run without foak, to compare
    python examples/qlora_finetune.py --compile none
    # several GPUs: Trainer runs DDP (through accelerate) under torchrun
    torchrun --nproc_per_node 2 examples/qlora_finetune.py --steps 100
    # CPU smoke test (kernels under TRITON_INTERPRET=1, set below)
    python examples/qlora_finetune.py --preset tiny --steps 3 --batch 2 --seq 32 --inner aot_eager

Writes <output-dir>/results.json (losses, tokens/s, peak memory, foak matches), the adapter in
<output-dir>/adapter and foak's graph reports in <output-dir>/foak/.
"""

import argparse
import json
import math
import os
import sys
import time

import torch

if not torch.cuda.is_available():  # before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, ROOT)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRESETS = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=300,
    ),
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
        max_position_embeddings=8192,
    ),
}


def parse(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="local Hugging Face model directory (default: --preset, random weights)")
    p.add_argument("--preset", choices=list(PRESETS), default="1b" if cuda else "tiny")
    p.add_argument("--data", help=".jsonl with a 'text' field or a .txt file (default: synthetic sequences)")
    p.add_argument("--steps", type=int, default=300 if cuda else 3)
    p.add_argument("--batch", type=int, default=4 if cuda else 2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq", type=int, default=1024 if cuda else 32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--compile", choices=["foak", "none"], default="foak")
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    p.add_argument(
        "--keep-logits",
        dest="loss_only",
        action="store_false",
        help="return the logits in training too (default: loss only, so lm_head + loss fuse)",
    )
    p.add_argument("--output-dir", default="qlora_out")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_model(a):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    cuda = torch.cuda.is_available()
    compute = torch.bfloat16 if cuda else torch.float32
    path = a.model
    if path is None:  # a real checkpoint on disk, so loading goes through the same 4-bit path as a hub model
        path = os.path.join(a.output_dir, f"base_{a.preset}")
        if not os.path.exists(os.path.join(path, "config.json")):
            torch.manual_seed(a.seed)
            tmp = f"{path}.tmp{os.getpid()}"  # under torchrun every rank may build it: first rename wins
            LlamaForCausalLM(LlamaConfig(**PRESETS[a.preset])).to(compute).save_pretrained(tmp)
            try:
                os.rename(tmp, path)
            except OSError:
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )
    device = int(os.environ.get("LOCAL_RANK", 0)) if cuda else "cpu"  # under torchrun: this rank's GPU
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quant,
        dtype=compute,
        device_map={"": device},
        attn_implementation="sdpa" if cuda else "eager",
    )
    model.config.use_cache = False
    return model


def dataset(a, model):
    """Rows of --seq token ids (labels = inputs)."""
    import datasets

    vocab = model.config.vocab_size
    if a.data is None:
        # learnable synthetic text: each row walks the vocabulary from a random start with a stride of 1..7
        g = torch.Generator().manual_seed(a.seed)
        n = a.steps * a.batch * a.grad_accum
        start = torch.randint(0, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 8, (n, 1), generator=g)
        ids = ((start + stride * torch.arange(a.seq)) % vocab).tolist()
    else:
        if a.data.endswith(".jsonl"):
            with open(a.data) as f:
                texts = [json.loads(line)["text"] for line in f if line.strip()]
        else:
            with open(a.data) as f:
                texts = [f.read()]
        if a.model is not None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(a.model)
            eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
            stream = [t for text in texts for t in tok(text)["input_ids"] + eos]
        else:  # no tokenizer with a random model: UTF-8 bytes are the tokens
            if vocab < 256:
                raise SystemExit("byte tokens need a vocabulary of at least 256")
            stream = [b for text in texts for b in text.encode()]
        ids = [stream[i : i + a.seq] for i in range(0, len(stream) - a.seq + 1, a.seq)]  # packed blocks
        if not ids:
            raise SystemExit(f"{a.data} has fewer than --seq {a.seq} tokens")
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def main(argv=None):
    a = parse(argv)
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    import foak_compile
    from foak_compile.integrations import FoakCallback, compile_for_trainer

    cuda = torch.cuda.is_available()
    os.makedirs(a.output_dir, exist_ok=True)
    model = load_model(a)
    lora = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()
    data = dataset(a, model)
    callbacks = []
    if a.compile == "foak":
        compile_for_trainer(model, inner=a.inner, loss_only=a.loss_only)
        callbacks.append(FoakCallback())
    args = TrainingArguments(
        output_dir=a.output_dir,
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=a.grad_accum,
        max_steps=a.steps,
        learning_rate=a.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, a.steps // 20),
        logging_steps=max(1, min(10, a.steps // 10)),
        save_strategy="no",
        report_to=[],
        seed=a.seed,
        bf16=cuda,
        use_cpu=not cuda,
        dataloader_num_workers=0,
        gradient_checkpointing=a.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if a.gradient_checkpointing else None,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    out = trainer.train()
    seconds = time.time() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = a.steps * a.batch * a.grad_accum * a.seq
    result = {
        "compile": a.compile,
        "inner": a.inner if a.compile == "foak" else None,
        "model": a.model or a.preset,
        "steps": a.steps,
        "batch": a.batch,
        "grad_accum": a.grad_accum,
        "seq": a.seq,
        "gradient_checkpointing": a.gradient_checkpointing,
        "losses": losses,
        "train_loss": out.training_loss,
        "seconds": round(seconds, 1),
        "tokens_per_s_incl_compile": round(tokens / seconds, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "foak_counts": foak_compile.total_counts(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    if trainer.is_world_process_zero():  # under torchrun (DDP through accelerate) rank 0 writes
        model.save_pretrained(os.path.join(a.output_dir, "adapter"))
        with open(os.path.join(a.output_dir, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps({k: result[k] for k in ("losses", "seconds", "peak_gib", "foak_counts")}))
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit("non-finite loss")
    return result


if __name__ == "__main__":
    main()
