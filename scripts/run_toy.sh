#!/usr/bin/env bash
# Sets up a virtual environment (CPU torch from the local wheel + the pack) and runs the embedded toy-world job:
# teach a tiny MLLM, train queries + connector + a tiny decoder, instruction-tune, export models/, score.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet torch==2.13.0
"$VENV/bin/python" -m pip install --quiet -e .
exec "$VENV/bin/python" -m training.run "$@"
