#!/bin/bash
# Device call 5 of session 3: Liger's NF4 row, the 8B-shaped stack (4 layers of hidden 4096),
# and where the NF4 foak compile's extra time goes (cold caches).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD GPTQMODEL_DISABLE_PACK_EXT=1
timeout 90 python3 -m benchmarks.train_step --all --variants liger --quants nf4 --steps 10 \
    --out $OUT/ts_nf4_liger.json 2>&1 | grep '^{"variant' | cut -c1-300
timeout 330 python3 -m benchmarks.train_step --all --variants inductor,foak,foak_loss_cg --quants none \
    --layers 4 --hidden 4096 --ffn 14336 --steps 10 --timeout 150 --out $OUT/ts_8b.json 2>&1 | grep '^{"variant' | cut -c1-300
for v in foak inductor; do
  timeout 75 python3 -m benchmarks.compile_profile --variant $v --quant nf4 --layers 4 --out $OUT 2>&1 | tail -1
done
