#!/usr/bin/env bash
# Re-resolve both pinned environments from scratch and rewrite constraints/cpu.txt and constraints/xla.txt.
# Run it to move the project to newer releases on purpose: afterwards run `bash scripts/test.sh` (which rebuilds
# ./.venv and ./.venv-xla from the new files), widen the version bounds in pyproject.toml to what it tested, and
# commit. The XLA environment downloads torch 2.9 with its CUDA wheels (about 7 GB the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

freeze() {  # freeze VENV OUT TITLE SETUP
    {
        echo "# Exact versions of the $3 environment that CI tests ($4). Written by scripts/lock.sh on $(date -u +%F);"
        echo "# the setup scripts install under these constraints (pip -c), so every fresh install resolves the same set."
        echo "# Regenerate with: bash scripts/lock.sh   (then run bash scripts/test.sh and commit both files)"
        "$1/bin/pip" freeze --exclude-editable --disable-pip-version-check | sed -E 's/^(torch==[0-9.]+)\+cpu$/\1/'
    } >"$2"
}

pip_quiet=(install --quiet --disable-pip-version-check)
"$python" -m venv "$work/cpu"
"$work/cpu/bin/pip" "${pip_quiet[@]}" "torch==2.13.0"  # the local CPU build (an unpinned torch brings CUDA wheels)
"$work/cpu/bin/pip" "${pip_quiet[@]}" -e ".[dev]"
freeze "$work/cpu" constraints/cpu.txt CPU "./.venv, scripts/bootstrap.sh"

"$python" -m venv "$work/xla"
"$work/xla/bin/pip" "${pip_quiet[@]}" "torch==2.9.0"
"$work/xla/bin/pip" "${pip_quiet[@]}" "torch==2.9.0" "torch-xla==2.9.0" "transformers>=4.57,<4.58" -e ".[dev]"
freeze "$work/xla" constraints/xla.txt XLA "./.venv-xla, scripts/setup_xla.sh"
grep -hE '^(torch|torch-xla|transformers|tokenizers|safetensors)==' constraints/cpu.txt constraints/xla.txt
