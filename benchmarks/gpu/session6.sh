#!/bin/bash
# Prepared for the next device session (not run yet; session 5 had no device time):
#   1. the kernel tests on CUDA, incl. the logit-epilogue (scale/softcap) cross-entropy tests
#   2. Gemma 2's softcapped lm_head + loss at vocab 256000: eager, inductor, Liger (softcap=30), foak
# Then benchmarks/gpu/session5.sh (lora_swiglu) and session5b.sh (checkpointing memory), still unrun.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD GPTQMODEL_DISABLE_PACK_EXT=1
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cross_entropy_kernel.py tests/test_cross_entropy_pattern.py \
    -k "epilogue or tanh or softcap or scale" > $OUT/cuda_tests_ce.txt 2>&1; tail -5 $OUT/cuda_tests_ce.txt
timeout 330 python3 -m benchmarks.bench_cross_entropy --softcap 30 --vocabs 256000 --hiddens 2048 3584 \
    --out $OUT/cross_entropy_softcap.json 2>&1 | tail -9
