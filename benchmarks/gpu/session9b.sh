#!/bin/bash
# Session 7: the opaque dequant (ops/dequant.py) with its two fixes — forward and backward dequant kept
# apart (`site`), launches made directly (registry.direct_launches) — like for like with session 8 (NF4,
# cold caches: inductor / foak / foak_opq); first its CUDA test (one dequant per weight each way).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_inductor.py -k opaque 2>&1 | tail -3
timeout 480 python3 -m benchmarks.train_step --all --variants inductor,foak,foak_opq \
    --quants nf4 --steps 10 --out $OUT/ts_nf4_opq_fixed.json 2>&1 | grep '^{"variant' | cut -c1-300
