#!/bin/bash
# Session 7, after session9c.sh: the default path (opaque dequant only under CUDA graphs) — the CUDA test
# of the opaque dequant, then foak loss-only + CUDA graphs on the NF4 1B step with no override.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_inductor.py -k opaque 2>&1 | grep -E "^E |passed|failed" | head -20
timeout 230 python3 -m benchmarks.train_step --all --variants foak_loss_cg \
    --quants nf4 --steps 10 --out $OUT/ts_nf4_default_cg.json 2>&1 | grep '^{"variant' | cut -c1-300
