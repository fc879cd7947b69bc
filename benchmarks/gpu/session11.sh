#!/bin/bash
# Session 8: where the 4096-token linear + CE time goes (kernel vs case level, per kernel; online tiles,
# chunk sizes: benchmarks/profile_lce.py), then every CUDA test (the opaque-dequant one corrected in session 7).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 330 python3 -m benchmarks.profile_lce --out $OUT/lce_profile.json > $OUT/lce_profile.log 2>&1
echo "profile rc $?"; tail -c 1500 $OUT/lce_profile.log
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_inductor.py 2>&1 | tee $OUT/cuda_tests.txt | tail -25
