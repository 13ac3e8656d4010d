#!/usr/bin/env bash
# Sourced by test.sh and run_toy.sh: create $VENV (default .venv) with $PYTHON (default python3, >= 3.10) and
# install torch 2.13.0 into it, from $TORCH_INDEX when set (e.g. https://download.pytorch.org/whl/cpu for the
# CPU-only build; pip's default is the CUDA build on Linux, several GB), then the pack with the extras in $1.
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} torch==2.13.0
"$VENV/bin/python" -m pip install --quiet -e ".$1"
