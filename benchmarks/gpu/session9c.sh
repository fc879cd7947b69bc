#!/bin/bash
# Session 7, after session9b.sh: NF4 loss-only + CUDA graphs (the replay hides the opaque op's host cost),
# inlined against opaque dequant; first the opaque dequant's CUDA test, with its failure lines.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_inductor.py -k opaque -x 2>&1 | grep -E "^E |Error|passed|failed" | head -30
timeout 480 python3 -m benchmarks.train_step --all --variants inductor,foak_loss_inl_cg,foak_loss_opq_cg \
    --quants nf4 --steps 10 --out $OUT/ts_nf4_opq_cg.json 2>&1 | grep '^{"variant' | cut -c1-300
