#!/usr/bin/env bash
# The test suite (CPU: real Triton kernels under TRITON_INTERPRET=1).
. "$(dirname "$0")/env.sh"
exec "$PY" -m pytest -q tests "$@"
