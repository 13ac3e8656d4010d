#!/usr/bin/env bash
# Sets up a virtual environment (torch 2.13.0, the pack with its dev extra; see venv.sh) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh "[dev]"
exec "$VENV/bin/python" -m pytest -q "$@"
