#!/usr/bin/env bash
# The test command: lint and types, then the whole suite against real Redis, PostgreSQL and SQLite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check .
python3 -m mypy radq api db workers scp
python3 -m pytest -q "$@"
