#!/usr/bin/env bash
# Create ./.venv with everything bmojo needs, at the exact versions CI tests (constraints/cpu.txt); a no-op when it is
# already up to date. BMOJO_CONSTRAINTS=none resolves freely instead (scripts/test_latest.sh uses that).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=${BMOJO_VENV:-.venv}
constraints=${BMOJO_CONSTRAINTS:-constraints/cpu.txt}
stamp=$venv/.bmojo-installed
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$0" -nt "$stamp" ] \
    || { [ "$constraints" != none ] && [ "$constraints" -nt "$stamp" ]; }; then
    pip=("$venv/bin/pip" install --quiet --disable-pip-version-check)
    if [ "$constraints" != none ]; then pip+=(-c "$constraints"); fi
    # The CPU build of torch first: an unconstrained torch would pull several GB of CUDA packages.
    "${pip[@]}" "torch==${BMOJO_TORCH:-2.13.0}"
    "${pip[@]}" -e ".[dev]"
    touch "$stamp"
fi
