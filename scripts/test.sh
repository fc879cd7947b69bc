#!/usr/bin/env bash
# The test suite (CPU: real Triton kernels under TRITON_INTERPRET=1).
#   bash scripts/test.sh              the fast tier: everything not marked slow (the developer loop)
#   bash scripts/test.sh --all        every tier (what CI runs)
#   bash scripts/test.sh --latest     the same against the newest dependency releases (own venv, .venv-latest)
# Each first runs `ruff check` and `ruff format --check`. Other arguments go to pytest, e.g. `-k rms_norm`, `-m gpu`.
tier=(-m "not slow")
args=()
for a in "$@"; do
    case "$a" in
        --all) tier=() ;;
        --latest) export FOAK_LATEST=1 ;;
        *) args+=("$a") ;;
    esac
done
. "$(dirname "$0")/env.sh"
"$VENV/bin/ruff" check --quiet . || { echo "ruff check failed (lint: pyproject.toml [tool.ruff])" >&2; exit 1; }
"$VENV/bin/ruff" format --check --quiet . || { echo "ruff format --check failed: run ruff format ." >&2; exit 1; }
# one worker per core, a test file's tests on one worker (module state, torchrun ports)
exec "$PY" -m pytest -q -n "${FOAK_TEST_WORKERS:-$(nproc)}" --dist loadfile tests "${tier[@]}" "${args[@]}"
