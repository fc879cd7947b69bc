#!/bin/bash
# After session 6: the online linear + CE with its new default tiles (1024 × 8192) at case level, 4096 and
# 16384 tokens, frozen lm_head: eager / inductor / Liger / foak / foak_online. (When it ran, in session 7,
# `foak` was the chunked path; since then it is foak's default by size and foak_chunked forces the chunked path.)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
timeout 570 python3 -m benchmarks.bench_cross_entropy --modes frozen --tokens 4096 16384 \
    --out $OUT/cross_entropy_online_cases.json 2>&1 | tail -9
