#!/usr/bin/env bash
# Creates (once) the notebook Python environment the tests use: a virtualenv with the pinned
# marimo, pysail and pyspark-client of runtime/python-requirements.txt.
#   scripts/setup-python.sh [VENV_DIR]     (default: ./.venv)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv}
req=$root/runtime/python-requirements.txt
python=${PYTHON:-python3}
stamp=$venv/.marina-requirements
if [ -f "$stamp" ] && cmp -s "$stamp" "$req"; then
  echo "python environment ready: $venv"
  exit 0
fi
command -v "$python" >/dev/null || { echo "error: $python not found; install Python 3.10+" >&2; exit 1; }
echo "creating the notebook python environment in $venv (marimo, pysail, pyspark-client; about 800 MB)"
"$python" -m venv "$venv"
"$venv/bin/pip" install --disable-pip-version-check --progress-bar off -r "$req"
cp "$req" "$stamp"
echo "python environment ready: $venv"
