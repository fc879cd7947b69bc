# Sourced by scripts/demo.sh and scripts/test.sh: a virtual environment with foak-compile installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${FOAK_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch 2.13.0 first (on a CPU machine the CPU wheel), then the project with its test extras.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[test]"
# optional GPTQ extra: gptqmodel without its torch-2.14/CUDA dependency tree (tests/test_gptq_*.py)
bash scripts/install_gptq.sh "$VENV/bin/python"
# No GPU: run the Triton kernels on CPU tensors through the interpreter.
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export TRITON_INTERPRET=1
fi
PY="$VENV/bin/python"
