#!/usr/bin/env bash
# Create ./.venv-xla for the XLA test tier (tests/xla, docs/xla.md): torch 2.9.0 + torch-xla 2.9.0 (the trn1
# stack, Neuron SDK 2.28) with transformers 4.57, plus the package (editable) and pytest, at the exact versions of
# constraints/xla.txt. A no-op when already up to date.
# Run the tier with: PJRT_DEVICE=CPU .venv-xla/bin/python -m pytest tests/xla -q
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=.venv-xla
constraints=constraints/xla.txt
stamp=$venv/.bmojo-xla-installed
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$0" -nt "$stamp" ] || [ "$constraints" -nt "$stamp" ]; then
    pip=("$venv/bin/pip" install --quiet --disable-pip-version-check -c "$constraints")
    # torch first, on its own: the PyPI build of 2.9.0 brings its CUDA wheels (several GB, about 2 minutes).
    # torch-xla needs exactly this torch, so the CPU-only index (and torch 2.13) are not options.
    "${pip[@]}" "torch==2.9.0"
    "${pip[@]}" "torch-xla==2.9.0" -e ".[dev]"
    PJRT_DEVICE=CPU "$venv/bin/python" -c "
import torch, torch_xla, transformers
assert torch.__version__.startswith('2.9.0') and transformers.__version__.startswith('4.57'), (
    torch.__version__, transformers.__version__)"
    touch "$stamp"
fi
