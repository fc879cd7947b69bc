#!/usr/bin/env bash
# The optional GPTQ extra: what tests/test_gptq_*.py and benchmarks/bench_lora_gptq.py need to
# run real gptqmodel layers (quantised by its GPTQ, packed by its packer, LoRA'd by peft).
#
#   bash scripts/install_gptq.sh [PYTHON]        install into PYTHON's environment (default: $PY,
#                                                else .venv/bin/python); ~15 MB, well under a minute
#   bash scripts/install_gptq.sh --wheels DIR [PYTHON]
#                                                build the same set as wheels into DIR, for a machine
#                                                without a package index (PYTHON: one of its version)
#
# Why not `pip install gptqmodel`: gptqmodel 7.7.0's metadata asks for torch>=2.14.1 (with its
# CUDA libraries, several GB), datasets, pyarrow, torchao, maturin, ...; none of them is imported
# on the path of its torch kernel (TorchLinear), its packer and its GPTQ algorithm. So gptqmodel
# goes in without dependencies, followed by the small packages that path does import, and
# optimum, without which peft refuses gptqmodel layers (peft >= 0.18 wants optimum >= 1.24).
# torch, triton, transformers and peft are pinned to what is installed: nothing here changes them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

GPTQMODEL=gptqmodel==7.7.0
# imported by gptqmodel's package init / TorchLinear / GPTQ (pypcre builds a small C extension
# against the system's libpcre2-8), then optimum for peft's GPTQ dispatch and GPTQ quantizer
DEPS=(pypcre==0.6.4 logbar==0.4.15 tokenicer==0.0.14 device-smi==0.5.7 defuser==0.0.28 threadpoolctl pillow
      requests optimum==2.3.0)

if [ "${1:-}" = "--wheels" ]; then
    DIR=${2:?usage: install_gptq.sh --wheels DIR [PYTHON]}
    PYTHON=${3:-${PY:-.venv/bin/python}}
    # pillow, requests and threadpoolctl are already on the lent GPU image; the rest is built here
    "$PYTHON" -m pip wheel -q --no-deps -w "$DIR" "$GPTQMODEL" pypcre==0.6.4 logbar==0.4.15 tokenicer==0.0.14 \
        device-smi==0.5.7 defuser==0.0.28 optimum==2.3.0
    ls -l "$DIR"
    exit 0
fi

PYTHON=${1:-${PY:-.venv/bin/python}}
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
"$PYTHON" -m pip freeze | grep -iE '^(torch|triton|transformers|peft|accelerate|numpy|huggingface[-_]hub|tokenizers|safetensors)==' \
    > "$pins" || true
"$PYTHON" -m pip install -q -c "$pins" "${DEPS[@]}"
"$PYTHON" -m pip install -q --no-deps "$GPTQMODEL"
# what the tests rely on: the kernel class imports and peft will dispatch LoRA onto it
"$PYTHON" - <<'EOF' >/dev/null 2>&1 || { echo "install_gptq.sh: gptqmodel does not import" >&2; exit 1; }
from gptqmodel.nn_modules.qlinear.torch import TorchLinear  # noqa: F401
from optimum.gptq import GPTQQuantizer  # noqa: F401
from peft.import_utils import is_gptqmodel_available
assert is_gptqmodel_available()
EOF
