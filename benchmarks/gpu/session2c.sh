#!/bin/bash
# Device call 3 of session 2: CUDA tests (inlined 4-bit op, CUDA Linear4bit trace), then NF4 rows
# and the loss-only CUDA-graph row.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_inductor.py -k "4bit" 2>&1 | tail -15 > $OUT/gpu_tests_4bit.txt
tail -4 $OUT/gpu_tests_4bit.txt
timeout 420 python3 -m benchmarks.train_step --all --variants foak,inductor,foak_loss_cg --quants nf4 \
    --steps 10 --out $OUT/ts_nf4.json 2>&1 | grep '^{"variant' | cut -c1-700
