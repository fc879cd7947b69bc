#!/bin/bash
# Device calls 2-4 of session 3: the train-step table, one call per base (its own inductor row),
# each variant in its own process with a cold compile cache.  usage: session3b.sh none|nf4|gptq|8b
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD GPTQMODEL_DISABLE_PACK_EXT=1
case $1 in
  none) V=inductor,foak,foak_loss_cg,foak_loss,eager,liger,liger_inductor; A="--quants none" ;;
  nf4)  V=inductor,foak,foak_loss_cg,foak_loss,eager,liger; A="--quants nf4" ;;
  gptq) V=inductor,foak,foak_loss_cg,foak_loss,eager; A="--quants gptq" ;;
  8b)   V=inductor,foak,foak_loss_cg,eager; A="--quants none --layers 4 --hidden 4096 --ffn 14336" ;;
esac
[ "$1" = gptq ] && [ -n "$2" ] && { V=inductor,foak,foak_loss_cg,eager; A="--quants gptq"; }
timeout 585 python3 -m benchmarks.train_step --all --variants $V $A --steps 10 --timeout 240 \
    --out $OUT/ts_$1.json 2>&1 | grep '^{"variant' | cut -c1-420
