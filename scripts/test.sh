#!/usr/bin/env bash
# The project's test command: sets up ./.venv if needed, then runs the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k decoding`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
