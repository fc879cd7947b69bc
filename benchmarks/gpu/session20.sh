#!/bin/bash
# Session 10: the 8B-shaped stack (4 layers, hidden 4096, ffn 14336, vocab 128256, bf16 LoRA, 4096 tokens), whose
# loss-only step the size rule sends to the online linear + CE (hidden 4096): online vs chunked forced, then inductor.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 400 python3 -m benchmarks.train_step --all --variants foak_loss,foak_loss_lcechunked,inductor \
    --quants none --layers 4 --hidden 4096 --ffn 14336 --steps 10 --out $OUT/ts_8b_stack_lce.json 2>&1 \
    | grep '^{"variant' | cut -c1-330
