#!/bin/bash
# After session9b.sh: NF4 loss-only + CUDA graphs, inlined against opaque (tagged) dequant.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
timeout 585 python3 -m benchmarks.train_step --all --variants inductor,foak_loss_cg,foak_loss_opq_cg \
    --quants nf4 --steps 10 --out $OUT/ts_nf4_opq_cg.json 2>&1 | grep '^{"variant' | cut -c1-300
