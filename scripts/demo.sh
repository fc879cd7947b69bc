#!/usr/bin/env bash
# The main job: a small real Llama + LoRA compiled with backend="foak", a few training steps, the match report.
. "$(dirname "$0")/env.sh"
exec "$PY" -m foak_compile.demo "$@"
