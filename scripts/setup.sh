#!/usr/bin/env bash
# Creates .venv with lopa and its test dependencies. Uses a torch that is already installed
# (system site-packages), else installs torch==2.13.0 (a CPU wheel on this project's machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c 'import torch' >/dev/null 2>&1; then
    echo "setup: using the torch already installed for $PY"
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
if ! .venv/bin/python -c 'import torch' >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0"
  .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -e '.[dev,eval,lmeval,serve]'
touch .venv/.lopa-setup
