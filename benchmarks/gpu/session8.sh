#!/bin/bash
# Prepared in session 6 (no device lent), after session7.sh: the NF4 first-step compile time with the
# 4-bit dequant as an opaque op (FOAK_OPAQUE_DEQUANT; traced launches were where NF4's compile went,
# notes §7) against the inlined launches and inductor, cold caches; the in-kernel NF4 table is in both.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
timeout 585 python3 -m benchmarks.train_step --all --variants inductor,foak,foak_opq \
    --quants nf4 --steps 10 --out $OUT/ts_nf4_opq.json 2>&1 | grep '^{"variant' | cut -c1-300
