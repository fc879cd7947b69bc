#!/bin/bash
# Device call 6 of session 3: cold-cache cProfile of the first step (4 layers): NF4 and GPTQ foak
# (their compile is 1.5-1.8x inductor's), bf16 foak with and without the TTIR access cache.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD GPTQMODEL_DISABLE_PACK_EXT=1
for q in nf4 gptq; do
  timeout 200 python3 -m benchmarks.compile_profile --variant foak --quant $q --layers 4 --out $OUT 2>&1 | tail -1
done
timeout 120 python3 -m benchmarks.compile_profile --variant foak --quant none --layers 4 --out $OUT 2>&1 | tail -1
FOAK_TTIR_CACHE=0 timeout 120 python3 -m benchmarks.compile_profile --variant foak --quant none --layers 4 --out $OUT/nocache 2>&1 | tail -1
timeout 100 python3 -m benchmarks.compile_profile --variant inductor --quant nf4 --layers 4 --out $OUT 2>&1 | tail -1
