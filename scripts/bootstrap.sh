#!/usr/bin/env bash
# Create .venv (if missing) and install FLAD with its pinned dependencies and test tools.
# Idempotent: re-running only installs what changed. Uses the python3 on PATH (3.10+).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned to 2.13.0 in pyproject.toml: a CPU wheel where one is provided locally.
.venv/bin/python -m pip install --quiet --progress-bar off -e '.[test]'
# Byte-compile FLAD's sources (editable, so pip did not): where PYTHONDONTWRITEBYTECODE is set (CI), every
# process -- hundreds of worker processes in the tests -- would otherwise compile each module it imports again.
.venv/bin/python -m compileall -q -j 0 src >/dev/null
.venv/bin/python -c "import torch, zmq, rosbags; print(f'bootstrap: torch {torch.__version__}, pyzmq {zmq.pyzmq_version()}, ready')"
