#!/bin/bash
# Prepared for the next device session (not run yet):
#   1. the CUDA tests, incl. lora_swiglu's two (inlined op under inductor, saved-activation count)
#   2. lora_swiglu's benefit in the bf16 1B step, beside the default (lora_siblings on) and per-layer ops
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD GPTQMODEL_DISABLE_PACK_EXT=1
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_lora_swiglu.py tests/test_cuda_inductor.py -k "cuda" \
    --durations=5 > $OUT/cuda_tests.txt 2>&1; tail -8 $OUT/cuda_tests.txt
timeout 380 python3 -m benchmarks.train_step --all --variants inductor,foak,foak_swiglu,foak_loss_swiglu_cg \
    --quants none --steps 10 --out $OUT/ts_swiglu.json 2>&1 | grep '^{"variant' | cut -c1-300
