#!/bin/bash
# Prepared in session 6 (no device lent) for the next device session, before session6.sh / session5.sh /
# session5b.sh:
#   1. CUDA run of the frozen-lm_head online cross-entropy tests, the logit-epilogue tests and the 4-bit
#      dequant's bit-exactness (its table is now written into the kernel)
#   2. the online path beside the chunked one at 4096 tokens (the cells where the memory target failed):
#      rows × columns sweep at kernel level, then eager / inductor / Liger / foak / foak_online, frozen lm_head
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD GPTQMODEL_DISABLE_PACK_EXT=1
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cross_entropy_online.py \
    tests/test_cross_entropy_kernel.py tests/test_lora_kernel.py tests/test_cuda_inductor.py \
    -k "online or epilogue or tanh or dequant" \
    > $OUT/cuda_tests_ce_online.txt 2>&1; tail -5 $OUT/cuda_tests_ce_online.txt
timeout 330 python3 -m benchmarks.bench_cross_entropy --modes frozen --online-sweep --tokens 4096 \
    --out $OUT/cross_entropy_online.json 2>&1 | tail -6
# Run in session 6 (results/session6/). Next: session7b.sh (the new default tiles at case level).
