#!/bin/bash
# Prepared for the next device session (not run yet): what the session-3 changes buy.
#   1. the fixed TTIR access-analysis cache on torch 2.11: NF4 foak first step, cache on vs off
#   2. the opt-in lora_siblings pattern: foak_sib / foak_loss_sib_cg vs foak / foak_loss_cg (bf16)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD GPTQMODEL_DISABLE_PACK_EXT=1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_inductor.py 2>&1 | tail -3
timeout 260 python3 -m benchmarks.train_step --all --variants inductor,foak --quants nf4 --steps 5 \
    --out $OUT/ts_nf4_cache_on.json 2>&1 | grep '^{"variant' | cut -c1-300
FOAK_TTIR_CACHE=0 timeout 160 python3 -m benchmarks.train_step --all --variants foak --quants nf4 --steps 5 \
    --out $OUT/ts_nf4_cache_off.json 2>&1 | grep '^{"variant' | cut -c1-300
