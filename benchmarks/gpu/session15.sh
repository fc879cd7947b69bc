#!/bin/bash
# Session 8, closing call: the online path's CUDA tests (memory test warmed up), then the frozen 4096-token
# cases with the size rule of session 8 (foak = rule, foak_chunked / foak_online forced).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/liger*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_cross_entropy_online.py > $OUT/online_tests.txt 2>&1
echo "online tests rc $?"; tail -3 $OUT/online_tests.txt
timeout 120 python3 -m benchmarks.bench_cross_entropy --modes frozen --tokens 4096 --out $OUT/cross_entropy_frozen_4k.json \
    > $OUT/cases.log 2>&1
echo "cases rc $?"
