#!/bin/bash
# Prepared in session 6: GPTQ siblings (one stacked [in, Σout] weight) in the GPTQ 1B step, against the
# per-layer ops (foak_nosib) and inductor, cold caches. Needs the gptqmodel wheels in .whl (scripts/install_gptq.sh).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD GPTQMODEL_DISABLE_PACK_EXT=1
timeout 585 python3 -m benchmarks.train_step --all --variants inductor,foak_nosib,foak \
    --quants gptq --steps 10 --out $OUT/ts_gptq_siblings.json 2>&1 | grep '^{"variant' | cut -c1-300
