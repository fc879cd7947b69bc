#!/bin/bash
# Session 8, third call: the online path's tests on CUDA (budget blocks, packed kernel arguments, C++-bound
# fp32 GEMMs), its host time per piece again, then every linear + CE case (trained and frozen, 4096 and
# 16384 tokens) on the H200.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cross_entropy_online.py > $OUT/online_tests.txt 2>&1
echo "online tests rc $?"; tail -3 $OUT/online_tests.txt
timeout 60 python3 -m benchmarks.host_overhead --out $OUT/host_overhead.json > $OUT/host_overhead.log 2>&1
echo "host rc $?"; head -c 700 $OUT/host_overhead.log
timeout 300 python3 -m benchmarks.bench_cross_entropy --tokens 4096 16384 --out $OUT/cross_entropy_cases.json \
    > $OUT/cases.log 2>&1
echo "cases rc $?"; grep -o "'tokens': [0-9]*, 'vocab': [0-9]*, 'hidden': [0-9]*, 'weight_grad': [A-Za-z]*" $OUT/cases.log | tail -3
