#!/bin/bash
# After session 6: the bf16 1B step with the frozen-lm_head online linear + CE (FOAK_LCE_ONLINE) against the
# chunked one, loss-only + CUDA graphs; and lora_swiglu with loss-only + CUDA graphs (cut in session 6).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
timeout 570 python3 -m benchmarks.train_step --all --variants inductor,foak_loss_cg,foak_loss_lceonline_cg,foak_loss_swiglu_cg \
    --quants none --steps 10 --out $OUT/ts_lce_online.json 2>&1 | grep '^{"variant' | cut -c1-300
