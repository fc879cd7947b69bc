#!/bin/bash
# Prepared for the next device session: lora_siblings over NF4 bases (stacked dequantised weight).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
timeout 585 python3 -m benchmarks.train_step --all --variants inductor,foak,foak_sib,foak_loss_sib_cg \
    --quants nf4 --steps 10 --out $OUT/ts_siblings_nf4.json 2>&1 | grep '^{"variant' | cut -c1-300
