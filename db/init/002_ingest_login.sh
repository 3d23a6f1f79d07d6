#!/usr/bin/env bash
# Docker-only init script (run once by the postgres image's entrypoint, on an
# empty data directory, after 001_schema.sql): creates the login role the
# ingest runner connects with, and makes it a member of the NOLOGIN group role
# `streamflow_ingest` (created by 001_schema.sql with exactly the pipeline's
# privileges). Nothing else is granted: the login cannot create roles or
# databases, and cannot DROP/ALTER objects it does not own.
#
# Inputs (environment of the postgres container, see docker-compose.yml):
#   INGEST_DB_USER, INGEST_DB_PASSWORD  - the runner's login
#   POSTGRES_USER, POSTGRES_DB          - set by the image (superuser, app DB)
# Names and passwords reach SQL only as psql variables, quoted by
# format('%I' / '%L'), never by string pasting in the shell. Passwords are read
# by psql from the environment (\getenv, psql 15+), not passed in its arguments,
# which every local user can read (/proc/<pid>/cmdline, ps).
set -euo pipefail

: "${INGEST_DB_USER:?INGEST_DB_USER must be set}"
: "${INGEST_DB_PASSWORD:?INGEST_DB_PASSWORD must be set}"
: "${POSTGRES_USER:?POSTGRES_USER must be set}"
: "${POSTGRES_DB:=$POSTGRES_USER}"

if [[ "$INGEST_DB_USER" == "$POSTGRES_USER" || "$INGEST_DB_USER" == "streamflow_ingest" || "$INGEST_DB_USER" == "streamflow_reader" ]]; then
    echo "002_ingest_login.sh: INGEST_DB_USER must differ from POSTGRES_USER and from the group roles streamflow_ingest and streamflow_reader" >&2
    exit 1
fi

psql_app=(psql --no-psqlrc -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB")

group_exists="$("${psql_app[@]}" --tuples-only --no-align \
    --command "SELECT count(*) FROM pg_catalog.pg_roles WHERE rolname = 'streamflow_ingest'")"
if [[ "$group_exists" != "1" ]]; then
    echo "002_ingest_login.sh: group role streamflow_ingest not found; 001_schema.sql must create it" >&2
    exit 1
fi

# The heredocs are quoted ('SQL'): the shell expands nothing inside them; psql
# substitutes :'name' with a correctly quoted literal.
# The cluster is new: a role of that name is another one (PREFECT_DB_USER's, say),
# which would keep its own password and privileges and gain the pipeline's.
login_exists="$("${psql_app[@]}" --tuples-only --no-align --set=ingest_user="$INGEST_DB_USER" <<'SQL'
SELECT count(*) FROM pg_catalog.pg_roles WHERE rolname = :'ingest_user'
SQL
)"
if [[ "$login_exists" != "0" ]]; then
    echo "002_ingest_login.sh: role \"$INGEST_DB_USER\" already exists; INGEST_DB_USER must name a new login, other than PREFECT_DB_USER and POSTGRES_USER" >&2
    exit 1
fi

"${psql_app[@]}" \
    --set=ingest_user="$INGEST_DB_USER" <<'SQL'
\getenv ingest_password INGEST_DB_PASSWORD
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT',
              :'ingest_user', :'ingest_password')
\gexec

SELECT format('GRANT streamflow_ingest TO %I', :'ingest_user')
\gexec
SQL

echo "002_ingest_login.sh: login role \"$INGEST_DB_USER\" is a member of streamflow_ingest"
