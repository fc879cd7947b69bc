#!/bin/bash
# Prepared for the next device session (not run yet): gradient checkpointing's memory with foak on one GPU
# (issue 8; the 2-GPU rows need nvidia-h200-x2, see README "Multi-GPU").
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
timeout 280 python3 scripts/gc_memory.py --bases bf16 --out $OUT/gc_memory_bf16.json 2>&1 | tail -8
timeout 280 python3 scripts/gc_memory.py --bases nf4 --out $OUT/gc_memory_nf4.json 2>&1 | tail -8
