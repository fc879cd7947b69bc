"""The main job: compile a small real Llama with LoRA using backend="foak", train a few steps,
print the losses and what the backend rewrote.

    python -m foak_compile.demo [--steps 5] [--inner inductor|aot_eager] [--dump-dir DIR]

On a CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by scripts/demo.sh);
on a GPU they run natively in bf16.
"""

import argparse
import time

import torch

import foak_compile


def build(device, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=192,
        intermediate_size=520,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device, dtype)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    return get_peft_model(model, lora)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    p.add_argument("--dump-dir", default=None)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build(device, dtype)
    model.print_trainable_parameters()
    compiled = torch.compile(model, backend=foak_compile.backend(inner=args.inner, dump_dir=args.dump_dir))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=2e-3)
    g = torch.Generator().manual_seed(1)
    # a learnable corpus: each row counts upwards from a random start
    ids = ((torch.arange(64)[None, :] + torch.randint(0, 1000, (4, 1), generator=g)) % 1000).to(device)
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"step {step}: loss {loss.item():.4f}  ({time.perf_counter() - t0:.1f}s)", flush=True)
    print()
    for r in foak_compile.reports():
        print(r.to_text())
    print("total matches:", foak_compile.total_counts())


if __name__ == "__main__":
    main()
