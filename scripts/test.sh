#!/usr/bin/env bash
# Sets up a virtual environment (CPU torch from the local wheel, the pack with its dev extra) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet torch==2.13.0
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
exec "$VENV/bin/python" -m pytest -q "$@"
