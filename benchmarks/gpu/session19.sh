#!/bin/bash
# Session 10, second call: the online path's pieces of 16384 columns (the budget's rows) against the default 8192,
# which session18.sh found faster at kernel level at 4096 x 128256 x 2048 (5.96 vs 6.14 ms): the sweep at the
# other 4096-token frozen shapes, then all eight frozen cases with each width, in one call (same host).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/liger*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
timeout 120 python3 -m benchmarks.bench_cross_entropy --online-sweep --modes --tokens 4096 \
    --out $OUT/online_sweep_4k.json > $OUT/online_sweep_4k.log 2>&1
echo "sweep rc $?"; grep "budget\|chunked" $OUT/online_sweep_4k.log | cut -c1-200
for cols in 8192 16384; do
  timeout 200 python3 -m benchmarks.bench_cross_entropy --modes frozen --online-cols $cols \
      --out $OUT/frozen_cols$cols.json > $OUT/frozen_cols$cols.log 2>&1
  echo "frozen cols $cols rc $?"; grep "frozen  |" $OUT/frozen_cols$cols.log | cut -c1-200
done
