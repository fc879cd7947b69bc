#!/bin/bash
# Session 10, last call: the GEMM bound at the one 16k-token cell that misses Liger's memory (trained lm_head,
# 16384 x 256000 x 2048: foak's 512-row chunks against Liger's 256).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 200 python3 -m benchmarks.gemm_bound --shapes 16384x256000x2048 --out $OUT/gemm_bound_16k.json 2>&1 | grep "^{" | cut -c1-400
