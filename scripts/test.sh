#!/usr/bin/env bash
# The test suite: ruff (lint, then format check), then pytest on a throwaway real
# PostgreSQL that the run starts.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh requirements/test.txt
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
