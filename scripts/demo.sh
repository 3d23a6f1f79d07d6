#!/usr/bin/env bash
# The main job, outside Docker: ingest month_000 (as of 2024-01-31) then month_001
# (as of 2024-02-29) into PostgreSQL and print the verification counts.
# Database: DATABASE_URL, or POSTGRES_HOST with the other POSTGRES_*, when set (e.g. in
# .env), else an embedded PostgreSQL kept in .pgdata/ (python -m streamflow.embedded stop).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh services/prefect/requirements.txt requirements/embedded.txt
PY=.venv/bin/python
if [ ! -f data/seeds/month_001/labels.csv ]; then
  $PY -m streamflow.seeds --users 7043 --months 2 --seed 42 --out data/seeds
fi
SEED_DIR=data/seeds/month_000 AS_OF=2024-01-31 $PY services/prefect/ingest_flow.py
SEED_DIR=data/seeds/month_001 AS_OF=2024-02-29 $PY services/prefect/ingest_flow.py
$PY -m streamflow.verify
