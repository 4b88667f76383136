#!/usr/bin/env bash
# Early warning for dependency drift: the CPU test suite against the NEWEST releases of torch, transformers and
# every other dependency (ignoring constraints/ and pyproject's upper bounds), in ./.venv-latest.
# Run it before raising a pin (scripts/lock.sh) and whenever torch or transformers publish a release; CI does not
# run it. It ends with the resolved versions and, if anything failed, the failing tests with their first error line.
# Extra arguments go to pytest. Note: the newest torch on PyPI brings CUDA wheels (several GB the first time).
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=.venv-latest
report=$venv/report.txt
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade)
"${pip[@]}" torch transformers || { echo "test_latest: could not install the newest torch/transformers" >&2; exit 2; }
"${pip[@]}" --no-deps -e . || exit 2
# the package's other dependencies, newest, without pyproject's bounds
deps=$("$venv/bin/python" - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]
names = [re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0] for d in deps["dependencies"] + deps["optional-dependencies"]["dev"]]
print(" ".join(n for n in names if n not in ("torch", "transformers")))
PY
)
"${pip[@]}" $deps || exit 2
versions=$("$venv/bin/python" -c "import torch, transformers, tokenizers, safetensors, numpy
print(f'torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, '
      f'safetensors {safetensors.__version__}, numpy {numpy.__version__}')")
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$venv/bin/python" -m pytest -q -p no:cacheprovider -rf --tb=line \
    --ignore=tests/xla "$@" | tee "$report"
status=${PIPESTATUS[0]}
echo
echo "== newest releases: $versions"
if [ "$status" = 0 ]; then
    echo "== everything passed: the pins in constraints/ can move to these versions (bash scripts/lock.sh)."
else
    echo "== BROKEN on the newest releases (pytest exit $status). Failing tests:"
    grep -E '^FAILED|^ERROR' "$report" || true
fi
exit "$status"
