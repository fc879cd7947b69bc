#!/bin/bash
# Session 10, first call. Issue 4's cells left: (1) the trained lm_head at 4096 tokens, where the GEMMs alone
# bound any exact design (benchmarks/gemm_bound.py: inductor's whole step beside 3 GEMMs over all / kept rows,
# in 128/256/512-row chunks, and 4 over kept rows); (2) the frozen 4096 x 128256 x 2048 cell, host-bound on the
# online path: its sweep with the budget's rows and wider pieces (fewer pieces, fewer launches), then the case.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/liger*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
timeout 300 python3 -m benchmarks.gemm_bound --out $OUT/gemm_bound.json > $OUT/gemm_bound.log 2>&1
echo "gemm_bound rc $?"; grep "^{" $OUT/gemm_bound.log | cut -c1-400
timeout 200 python3 -m benchmarks.bench_cross_entropy --online-sweep --modes frozen --tokens 4096 --vocabs 128256 \
    --hiddens 2048 --out $OUT/cross_entropy_online_wide.json > $OUT/online_wide.log 2>&1
echo "online sweep rc $?"; grep "budget\|chunked" $OUT/online_wide.log | cut -c1-200; tail -2 $OUT/online_wide.log
