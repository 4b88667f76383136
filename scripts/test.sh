#!/usr/bin/env bash
# The project's test command (what CI runs). First ruff (pyproject.toml's [tool.ruff]) over the repository; then
# the tiers, which are pytest markers (pyproject.toml), not file lists:
#   1. the CPU suite, `-m "not xla"`, in ./.venv (created if needed; torch 2.13); extra arguments go to its pytest
#      (e.g. `bash scripts/test.sh -k decoding`);
#   2. the XLA tier, `-m "xla or core"`, in ./.venv-xla (created if needed; torch 2.9 + torch-xla 2.9 on
#      PJRT_DEVICE=CPU, see docs/xla.md): the tests that need torch-xla, and the model-core tests again on that trn1
#      stack (torch 2.9, transformers 4.57). Skip it only explicitly: `--skip-xla` or BMOJO_SKIP_XLA=1.
set -euo pipefail
cd "$(dirname "$0")/.."
skip_xla=${BMOJO_SKIP_XLA:-0}
args=()
for arg in "$@"; do
    if [ "$arg" = "--skip-xla" ]; then skip_xla=1; else args+=("$arg"); fi
done
bash scripts/bootstrap.sh
.venv/bin/ruff check --quiet .  # the lint rules in pyproject.toml ([tool.ruff])
.venv/bin/python -m pytest -q -p no:cacheprovider -m "not xla" ${args[@]+"${args[@]}"}
if [ "$skip_xla" = 1 ]; then
    echo "XLA tier skipped (--skip-xla or BMOJO_SKIP_XLA=1)." >&2
    exit 0
fi
bash scripts/setup_xla.sh
# BMOJO_REQUIRE_XLA=1: a torch_xla that does not import is an error here, not a skip.
PJRT_DEVICE=CPU BMOJO_REQUIRE_XLA=1 .venv-xla/bin/python -m pytest -q -p no:cacheprovider -m "xla or core"
