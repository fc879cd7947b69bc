#!/bin/bash
# Session 9, after the fix of the online path's device values under CUDA graph capture (session16/session9.sh
# found `t[i] = v` refused there): its capture test on CUDA, then the bf16 1B loss-only + CUDA graphs step
# with the chunked and the online linear + CE, in one call (same host).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/liger*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_cross_entropy_online.py -k "captured or live_memory" \
    > $OUT/online_capture_tests.txt 2>&1
echo "capture tests rc $?"; tail -3 $OUT/online_capture_tests.txt
timeout 420 python3 -m benchmarks.train_step --all --variants foak_loss_cg,foak_loss_lceonline_cg \
    --quants none --steps 10 --out $OUT/ts_lce_online.json 2>&1 | grep '^{"variant' | cut -c1-330
