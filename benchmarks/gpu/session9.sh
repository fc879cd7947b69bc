#!/bin/bash
# Prepared in session 6, after session8.sh: the bf16 1B step with the frozen-lm_head online linear + CE
# (FOAK_LCE_ONLINE) against the chunked one, loss-only + CUDA graphs, and the NF4 opaque dequant there too.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
timeout 330 python3 -m benchmarks.train_step --all --variants inductor,foak_loss_cg,foak_loss_lceonline_cg \
    --quants none --steps 10 --out $OUT/ts_lce_online.json 2>&1 | grep '^{"variant' | cut -c1-300
timeout 250 python3 -m benchmarks.train_step --all --variants foak_loss_cg,foak_loss_opq_cg \
    --quants nf4 --steps 10 --out $OUT/ts_nf4_opq_cg.json 2>&1 | grep '^{"variant' | cut -c1-300
