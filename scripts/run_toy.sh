#!/usr/bin/env bash
# Sets up a virtual environment (torch 2.13.0 + the pack; see venv.sh) and runs the embedded toy-world job:
# teach a tiny MLLM, train queries + connector + a tiny decoder, instruction-tune, export models/, score.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh ""
exec "$VENV/bin/python" -m training.run "$@"
