#!/bin/bash
# Device call 1 of session 3: where foak's compile time goes (cProfile of the first step, with and
# without the TTIR access-analysis cache), the GPTQ train-step smoke, CUDA tests.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD GPTQMODEL_DISABLE_PACK_EXT=1
timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_cuda_inductor.py 2>&1 | tail -5 > $OUT/gpu_tests.txt
tail -3 $OUT/gpu_tests.txt
for v in inductor foak; do
  timeout 200 python3 -m benchmarks.compile_profile --variant $v --layers 4 --out $OUT 2>&1 | tail -2
done
FOAK_TTIR_CACHE=0 timeout 200 python3 -m benchmarks.compile_profile --variant foak --layers 4 --out $OUT/nocache 2>&1 | tail -2
timeout 300 python3 -m benchmarks.train_step --all --variants foak,inductor --quants gptq --layers 2 --steps 3 \
    --out $OUT/ts_gptq_smoke.json 2>&1 | grep '^{"variant' | cut -c1-900
