#!/bin/bash
# Session 8, last call: A/B of the online path's host-side choices at 4096 tokens (benchmarks/ab_online.py),
# its host time per op, and its CUDA memory test with the budget rule.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/liger*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 60 python3 -m benchmarks.host_overhead --out $OUT/host_overhead.json > $OUT/host_overhead.log 2>&1
echo "host rc $?"; head -c 900 $OUT/host_overhead.log
timeout 150 python3 -m benchmarks.ab_online --out $OUT/ab_online.json > $OUT/ab_online.log 2>&1
echo "ab rc $?"; grep "^{'tokens'" $OUT/ab_online.log | cut -c1-900
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_cross_entropy_online.py -k live_memory 2>&1 | tail -2
