#!/usr/bin/env bash
# Sourced by test.sh and run_toy.sh: create $VENV (default .venv) with $PYTHON (default python3, >= 3.10) and
# install torch 2.13.0 into it, from $TORCH_INDEX when set (e.g. https://download.pytorch.org/whl/cpu for the
# CPU-only build; pip's default is the CUDA build on Linux, several GB), then the pack with the extras in $1.
# Re-runs do no pip work (so they need no network): after both installs succeed, $VENV/.installed records a checksum
# of what they depend on (pyproject.toml, the torch pin and index, this checkout) and the extras installed; a
# matching record, with torch and the pack still importable, skips them. Extras only add packages, so "" (run_toy.sh)
# is satisfied by any installed extras, e.g. test.sh's "[dev]"; other extras must match exactly. An install that
# fails or is interrupted leaves no record, so the next run redoes it.
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH=torch==2.13.0
stamp=$(printf '%s\n' "$TORCH" "${TORCH_INDEX:-}" "$PWD" | cat - pyproject.toml | cksum | tr ' ' -)
installed=$(cat "$VENV/.installed" 2>/dev/null || true)
importable='import importlib.util as u, importlib.metadata as m
assert u.find_spec("metaqueries_core") and m.version("torch").split("+")[0] == "2.13.0"'
if { [ "$installed" = "$stamp $1" ] || { [ -z "$1" ] && [ "${installed%% *}" = "$stamp" ]; }; } &&
    "$VENV/bin/python" -I -c "$importable" 2>/dev/null; then
    :  # complete and up to date
else
    rm -f "$VENV/.installed"
    "$VENV/bin/python" -c 'import pip' 2>/dev/null || "$PYTHON" -m venv "$VENV"  # missing, or stopped before pip
    # chained, so a failed install never writes the record, whether or not the caller runs under `set -e`
    "$VENV/bin/python" -m pip install --quiet ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH" &&
        "$VENV/bin/python" -m pip install --quiet -e ".$1" &&
        echo "$stamp $1" > "$VENV/.installed"
fi
