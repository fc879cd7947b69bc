#!/bin/bash
# Session 8, second call: the online path's host time per piece (benchmarks/host_overhead.py), the
# 4096-token profile again with balanced blocks and the slices made once, then every CUDA test.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 120 python3 -m benchmarks.host_overhead --out $OUT/host_overhead.json > $OUT/host_overhead.log 2>&1
echo "host rc $?"; head -c 3000 $OUT/host_overhead.log
timeout 150 python3 -m benchmarks.profile_lce --out $OUT/lce_profile.json > $OUT/lce_profile.log 2>&1
echo "profile rc $?"
timeout 280 python3 -m pytest -v -p no:cacheprovider --durations=15 tests/test_cuda_inductor.py > $OUT/cuda_tests.txt 2>&1
echo "tests rc $?"; grep -E "passed|failed|PASS|FAIL|ERROR" $OUT/cuda_tests.txt | tail -40
