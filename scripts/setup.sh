#!/usr/bin/env bash
# Install radq and its dependencies into the current Python (a venv if one is active).
# torch is installed first and pinned: the local CPU wheel; a range would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install --quiet torch==2.13.0
if [ "${1:-}" = "--dev" ]; then
  "$PY" -m pip install --quiet -e '.[dev]'
  # dcmtk's storescu lets the C-STORE tests use a sender radq did not write; best effort.
  if ! dpkg -s dcmtk >/dev/null 2>&1 && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dcmtk >/dev/null) || echo "dcmtk not installed: its test will skip"
  fi
else
  "$PY" -m pip install --quiet -e .
fi
