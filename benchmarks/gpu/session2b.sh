#!/bin/bash
# Device call 2 of session 2: inline granularity and CUDA graphs, bf16 base.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
FOAK_INLINE=lora timeout 200 python3 -m benchmarks.train_step --all --variants foak --quants none \
    --steps 10 --out $OUT/ts_inline_lora.json 2>&1 | grep '^{"variant' | cut -c1-500
timeout 380 python3 -m benchmarks.train_step --all --variants foak_cg,inductor_cg --quants none \
    --steps 10 --out $OUT/ts_cg.json 2>&1 | grep '^{"variant' | cut -c1-900
