#!/bin/bash
# Session 4, device call 4: the CUDA tests (4-bit siblings after the row-offset fix) and where the
# NF4 first step's compile time goes (torch's compile_times phases + cProfile, 4 layers, cold caches).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD GPTQMODEL_DISABLE_PACK_EXT=1
timeout 230 python3 -m pytest -q -p no:cacheprovider -x tests/test_cuda_inductor.py > $OUT/cuda_tests.txt 2>&1
tail -15 $OUT/cuda_tests.txt
for spec in "foak nf4" "foak none" "inductor nf4"; do
  set -- $spec
  timeout 110 python3 -m benchmarks.compile_profile --variant $1 --quant $2 --layers 4 --out $OUT 2>&1 | tail -1
done
