#!/bin/bash
# Prepared for the next device session: lora_siblings against the per-layer ops, bf16 1B step.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
timeout 585 python3 -m benchmarks.train_step --all --variants inductor,foak,foak_sib,foak_loss_cg,foak_loss_sib_cg \
    --quants none --steps 10 --out $OUT/ts_siblings.json 2>&1 | grep '^{"variant' | cut -c1-300
