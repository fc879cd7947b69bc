# Sourced by scripts/demo.sh and scripts/test.sh: a virtual environment with foak-compile installed.
#   FOAK_VENV=DIR    the environment's folder (default .venv; .venv-latest with FOAK_LATEST=1)
#   FOAK_LATEST=1    the newest releases of transformers, peft, bitsandbytes, trl, accelerate and datasets
#                    instead of the versions in constraints.txt (torch stays at 2.13.0)
# A pinned environment is installed once and again only when pyproject.toml, constraints.txt or these
# scripts change; a latest one is upgraded on every call, which is its point.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LATEST=${FOAK_LATEST:-0}
if [ "$LATEST" = 1 ]; then VENV=${FOAK_VENV:-.venv-latest}; else VENV=${FOAK_VENV:-.venv}; fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
stamp="$VENV/.foak-installed"
want=$(cat pyproject.toml constraints.txt scripts/env.sh scripts/install_gptq.sh | sha256sum | cut -d' ' -f1)
if [ "$LATEST" = 1 ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    rm -f "$stamp"
    "$PY" -m pip install -q --upgrade pip
    # torch 2.13.0 first (on a CPU machine the CPU wheel), then the project with its test extras
    "$PY" -m pip install -q "torch==2.13.0"
    if [ "$LATEST" = 1 ]; then
        torch_pin=$(mktemp)
        echo "torch==2.13.0" > "$torch_pin"
        "$PY" -m pip install -q -c "$torch_pin" -e ".[test]"
        "$PY" -m pip install -q -c "$torch_pin" --upgrade transformers peft bitsandbytes trl accelerate datasets
        rm -f "$torch_pin"
    else
        "$PY" -m pip install -q -c constraints.txt -e ".[test]"
    fi
    # optional GPTQ extra: gptqmodel without its torch-2.14/CUDA dependency tree (tests/test_gptq_*.py)
    bash scripts/install_gptq.sh "$PY"
    [ "$LATEST" = 1 ] || echo "$want" > "$stamp"
fi
# No GPU: run the Triton kernels on CPU tensors through the interpreter.
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export TRITON_INTERPRET=1
fi
