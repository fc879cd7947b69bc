#!/bin/bash
# One device call: GPU tests of the inlined ops, then the train step with opaque vs inlined ops.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_inductor.py tests/test_lora_kernel.py \
    tests/test_rms_norm_kernel.py tests/test_rope_kernel.py 2>&1 | tail -25 > $OUT/gpu_tests.txt
tail -8 $OUT/gpu_tests.txt
FOAK_INLINE=1 timeout 300 python3 -m benchmarks.train_step --all --variants foak,foak_loss --quants none \
    --steps 10 --profile $OUT/prof_inline --out $OUT/ts_inline.json 2>&1 | grep '^{"variant' | cut -c1-600
FOAK_INLINE=1 timeout 300 python3 -m benchmarks.train_step --all --variants inductor,foak --quants nf4 \
    --steps 10 --out $OUT/ts_nf4.json 2>&1 | grep '^{"variant' | cut -c1-600
