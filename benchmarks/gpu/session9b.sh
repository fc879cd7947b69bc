#!/bin/bash
# After session 6: the tagged opaque dequant (ops/dequant.py) like for like with session 8 (NF4, cold caches:
# inductor / foak / foak_opq), then with CUDA graphs in session9c.sh.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
timeout 585 python3 -m benchmarks.train_step --all --variants inductor,foak,foak_opq \
    --quants nf4 --steps 10 --out $OUT/ts_nf4_opq_tagged.json 2>&1 | grep '^{"variant' | cut -c1-300
