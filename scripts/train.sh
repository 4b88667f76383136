#!/usr/bin/env bash
# The main job: sets up ./.venv if needed, then trains the embedded default (`bmojo train`) on the CPU.
# Extra arguments go to `bmojo train` (see `bmojo train --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/bmojo train "$@"
