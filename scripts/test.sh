#!/usr/bin/env bash
# The test suite: ruff (lint, then format check), mypy (the type hints, pyproject.toml's
# [tool.mypy]), then pytest on a throwaway real PostgreSQL that the run starts.
# Test modules run in parallel, one module per worker (its module-scoped servers and
# months are built once), one worker per core up to 4: on 2 cores the suite is CPU
# bound (595 tests: 15.1 min of pytest in the fresh-clone CI of 2026-12-08, 04:19;
# tests/gx_forkserver.py saves ~3 min of GX imports).
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow", or -n 0 for one
# process).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh requirements/test.txt
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# A folder of this run's own for the test servers and months: pytest keeps only the
# last three runs' folders under /tmp/pytest-of-$USER, so a run started alongside
# (another checkout's CI, a developer's) deleted the servers of this one mid-run.
# Kept when the run fails, for its servers' logs.
basetemp="$(mktemp -d "${TMPDIR:-/tmp}/streamflow-tests.XXXXXX")"
status=0
.venv/bin/python -m pytest -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder \
  --basetemp "$basetemp" "$@" \
  || status=$?
if [ "$status" -eq 0 ]; then
  rm -rf "$basetemp"
else
  echo "test files kept in $basetemp" >&2
fi
exit "$status"
