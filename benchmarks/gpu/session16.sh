#!/bin/bash
# Session 9, first call: the CUDA test session 8's call cut (lora siblings, bf16), then Gemma 2's softcapped
# lm_head + loss at vocab 256000 (speed: eager, inductor, Liger softcap=30, foak), then the frozen 4096-token
# linear + CE cases again (the host-bound cell, 4096 x 128256 x 2048, on another lent host).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/liger*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_inductor.py -k siblings > $OUT/cuda_siblings.txt 2>&1
echo "siblings rc $?"; tail -3 $OUT/cuda_siblings.txt
timeout 300 python3 -m benchmarks.bench_cross_entropy --softcap 30 --vocabs 256000 --hiddens 2048 3584 \
    --out $OUT/cross_entropy_softcap.json > $OUT/softcap.log 2>&1
echo "softcap rc $?"; tail -4 $OUT/softcap.log
timeout 140 python3 -m benchmarks.bench_cross_entropy --modes frozen --tokens 4096 --out $OUT/cross_entropy_frozen_4k.json \
    > $OUT/frozen4k.log 2>&1
echo "frozen rc $?"; tail -3 $OUT/frozen4k.log
