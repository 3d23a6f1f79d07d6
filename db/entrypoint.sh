#!/usr/bin/env bash
# The postgres service's entrypoint (docker-compose.yml): refuses .env.example's public
# placeholder passwords (change-me-...) on every start, before the image's entrypoint
# runs initdb with them, then hands over to it. (db/init/000_prefect_db.sh checks the
# same, for an init run some other way.)
set -euo pipefail

for var in POSTGRES_PASSWORD PREFECT_DB_PASSWORD INGEST_DB_PASSWORD; do
    if [[ "${!var:-}" == change-me* ]]; then
        echo "postgres: $var starts with change-me, like .env.example's placeholders; set a password of your own in .env (e.g. openssl rand -hex 24), then docker compose up again" >&2
        exit 1
    fi
done
exec docker-entrypoint.sh "$@"
