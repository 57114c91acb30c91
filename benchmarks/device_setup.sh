#!/usr/bin/env bash
# Install, offline, what `lopa serve` and benchmarks/serve_load.py need on the GPU machine (no registry there),
# from wheels carried in .whl/ (gitignored; `carry: [".whl"]`). pip installs only what the interpreter lacks (or
# holds at a version that does not fit): torch and everything else already there stay as they are; a run that
# would change torch stops with an error.
#
# The wheels (Python 3.12, x86_64 Linux), downloaded on a machine with a registry, from the repository root:
#   python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl "fastapi>=0.120,<0.121" "starlette>=0.49,<0.50" uvicorn prometheus-client httptools uvloop httpx typer \
#     rich pip
# (fastapi 0.120 / starlette 0.49 need no opentelemetry; pip itself rides along for an interpreter without it.)
#
# Usage, from the repository root:  bash benchmarks/device_setup.sh [WHEEL_DIR]   (PYTHON=... to pick python3)
set -euo pipefail

WHL=${1:-.whl}
PY=${PYTHON:-python3}
NEED=(fastapi starlette uvicorn pydantic prometheus-client httptools uvloop httpx typer rich)  # the serve extra, the CLI,
# the clients
MODULES="fastapi starlette uvicorn pydantic prometheus_client httptools uvloop httpx typer rich"

[ -d "$WHL" ] || { echo "device_setup: no wheel folder $WHL (carry it: carry [\".whl\"])" >&2; exit 2; }
torch_version() { "$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo absent; }
before=$(torch_version)

if "$PY" -m pip --version >/dev/null 2>&1; then
  PIP=("$PY" -m pip)
else  # no pip in this interpreter: run pip from its wheel (a wheel is a zip Python can run from)
  pip_whl=$(ls "$WHL"/pip-*.whl 2>/dev/null | head -n 1)
  [ -n "$pip_whl" ] || { echo "device_setup: $PY has no pip and $WHL holds no pip wheel" >&2; exit 2; }
  PIP=("$PY" "$pip_whl/pip")
fi

echo "device_setup: $("$PY" --version) at $(command -v "$PY"); torch $before; installing from $WHL"
log=$(mktemp)
if ! PIP_ROOT_USER_ACTION=ignore "${PIP[@]}" install --no-index --find-links "$WHL" --no-cache-dir \
    --disable-pip-version-check "${NEED[@]}" >"$log" 2>&1; then
  cat "$log" >&2; echo "device_setup: pip install failed" >&2; exit 1
fi
grep -E '^(Successfully installed|Installing collected)' "$log" || echo "device_setup: nothing to install"

after=$(torch_version)
[ "$after" = "$before" ] || { echo "device_setup: torch changed ($before -> $after)" >&2; exit 1; }
"$PY" - "$MODULES" <<'EOF'
import importlib, importlib.metadata as md, sys
names = sys.argv[1].split()
for name in names:
    importlib.import_module(name)  # each imports, or this fails naming it
dists = {"prometheus_client": "prometheus-client"}
print("device_setup: ready:", ", ".join(f"{n} {md.version(dists.get(n, n))}" for n in names))
EOF
