#!/usr/bin/env bash
# Docker-only init script (run once by the postgres image's entrypoint, on an
# empty data directory, before 001_schema.sql): creates the login role that
# owns the Prefect server's metadata and the separate database `prefect`.
#
# Inputs (environment of the postgres container, see docker-compose.yml):
#   PREFECT_DB_USER, PREFECT_DB_PASSWORD  - the Prefect metadata role
#   POSTGRES_USER, POSTGRES_DB            - set by the image (superuser, app DB)
#   POSTGRES_PASSWORD, INGEST_DB_PASSWORD - only checked here (not placeholders)
# Names and passwords reach SQL only as psql variables, quoted by
# format('%I' / '%L'), never by string pasting in the shell. Passwords are read
# by psql from the environment (\getenv, psql 15+), not passed in its arguments,
# which every local user can read (/proc/<pid>/cmdline, ps).
set -euo pipefail

: "${PREFECT_DB_USER:?PREFECT_DB_USER must be set}"
: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD must be set}"
: "${POSTGRES_USER:?POSTGRES_USER must be set}"
: "${POSTGRES_DB:=$POSTGRES_USER}"

# .env.example's placeholders (change-me-...) are public: a stack started from an
# unedited copy would have passwords anyone can read. Checked first: initdb has made
# the cluster and POSTGRES_DB, but no role or database of the stack exists yet, and
# the postgres healthcheck (db/healthcheck.sql) keeps such a cluster unhealthy.
for var in POSTGRES_PASSWORD PREFECT_DB_PASSWORD INGEST_DB_PASSWORD; do
    if [[ "${!var:-}" == change-me* ]]; then
        echo "000_prefect_db.sh: $var starts with change-me, like .env.example's placeholders; set a password of your own in .env (e.g. openssl rand -hex 24), then docker compose down -v (this deletes the database volume) and up again" >&2
        exit 1
    fi
done
if [[ "$POSTGRES_DB" == "prefect" ]]; then
    echo "000_prefect_db.sh: POSTGRES_DB must not be \"prefect\", the Prefect server's own database" >&2
    exit 1
fi
if [[ "$PREFECT_DB_USER" == "$POSTGRES_USER" ]]; then
    echo "000_prefect_db.sh: PREFECT_DB_USER must differ from POSTGRES_USER (the superuser)" >&2
    exit 1
fi
# 001_schema.sql makes these group roles; under one of their names, Prefect's login
# would hold the pipeline's privileges, and every member of the group its database.
if [[ "$PREFECT_DB_USER" == "streamflow_ingest" || "$PREFECT_DB_USER" == "streamflow_reader" ]]; then
    echo "000_prefect_db.sh: PREFECT_DB_USER must differ from the group roles streamflow_ingest and streamflow_reader" >&2
    exit 1
fi

# The heredoc is quoted ('SQL'): the shell expands nothing inside it; psql
# substitutes :'name' with a correctly quoted literal.
psql --no-psqlrc -v ON_ERROR_STOP=1 \
    --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set=prefect_user="$PREFECT_DB_USER" <<'SQL'
\getenv prefect_password PREFECT_DB_PASSWORD
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION',
              :'prefect_user', :'prefect_password')
WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = :'prefect_user')
\gexec

SELECT format('CREATE DATABASE prefect OWNER %I', :'prefect_user')
WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_database WHERE datname = 'prefect')
\gexec

-- Only the owner (and superusers) may connect to the Prefect metadata database.
REVOKE ALL ON DATABASE prefect FROM PUBLIC;
SQL

echo "000_prefect_db.sh: role \"$PREFECT_DB_USER\" and database \"prefect\" ready"
