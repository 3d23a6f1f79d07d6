-- StreamFlow ingest schema. Idempotent: safe to run on every start, in Docker
-- (docker-entrypoint-initdb.d) and by the flow itself on an empty or older database
-- (bootstrap.ensure_schema, when the login may).

-- ---------------------------------------------------------------------------
-- Live tables: the latest published month, exactly the lab's columns.
-- ---------------------------------------------------------------------------
-- user_id is an identifier, not words: the "C" collation compares bytes, which
-- lets PostgreSQL sort and index a month's keys 2-3x faster than a locale's rules
-- (and gives the same order on every server, whatever its locale).
CREATE TABLE IF NOT EXISTS users (
    user_id        TEXT COLLATE "C" PRIMARY KEY,
    signup_date    DATE,
    user_gender    TEXT,
    user_is_senior BOOLEAN,
    has_family     BOOLEAN,
    has_dependents BOOLEAN
);

CREATE TABLE IF NOT EXISTS subscriptions (
    user_id               TEXT COLLATE "C" PRIMARY KEY REFERENCES users (user_id),
    months_active         INTEGER,
    plan_stream_tv        BOOLEAN,
    plan_stream_movies    BOOLEAN,
    contract_type         TEXT,
    paperless_billing     BOOLEAN,
    monthly_fee           NUMERIC,
    total_paid            NUMERIC,
    net_service           TEXT,
    -- Not in the monthly export: kept from the lab's schema, left NULL.
    add_on_security       BOOLEAN,
    add_on_backup         BOOLEAN,
    add_on_device_protect BOOLEAN,
    add_on_support        BOOLEAN
);

CREATE TABLE IF NOT EXISTS usage_agg_30d (
    user_id             TEXT COLLATE "C" PRIMARY KEY REFERENCES users (user_id),
    watch_hours_30d     NUMERIC,
    avg_session_mins_7d NUMERIC,
    unique_devices_30d  INTEGER,
    skips_7d            INTEGER,
    rebuffer_events_7d  INTEGER
)
-- Every user's usage changes every month: room on each page for the new version
-- of its rows keeps the monthly update HOT (no index entry per updated row).
WITH (fillfactor = 50);

CREATE TABLE IF NOT EXISTS payments_agg_90d (
    user_id             TEXT COLLATE "C" PRIMARY KEY REFERENCES users (user_id),
    failed_payments_90d INTEGER
)
WITH (fillfactor = 90);

CREATE TABLE IF NOT EXISTS support_agg_90d (
    user_id                       TEXT COLLATE "C" PRIMARY KEY REFERENCES users (user_id),
    support_tickets_90d           INTEGER,
    ticket_avg_resolution_hrs_90d NUMERIC
)
WITH (fillfactor = 90);

CREATE TABLE IF NOT EXISTS labels (
    user_id     TEXT COLLATE "C" PRIMARY KEY REFERENCES users (user_id),
    churn_label BOOLEAN
)
WITH (fillfactor = 60);  -- ~40% of labels flip each month; see usage_agg_30d

-- ---------------------------------------------------------------------------
-- History: what was known at the end of each month, keyed (user_id, as_of).
-- Read by the feature store and training jobs: names and columns are a contract.
-- Each table is partitioned by as_of, one partition a month: a month is written
-- into its own table, indexed once it is full, then attached (see the functions
-- below), and a reader asking for one as_of only touches that month.
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS subscriptions_profile_snapshots (
    user_id            TEXT COLLATE "C" NOT NULL,
    as_of              DATE NOT NULL,
    months_active      INTEGER,
    monthly_fee        NUMERIC,
    paperless_billing  BOOLEAN,
    plan_stream_tv     BOOLEAN,
    plan_stream_movies BOOLEAN,
    net_service        TEXT,
    PRIMARY KEY (user_id, as_of)
) PARTITION BY LIST (as_of);

CREATE TABLE IF NOT EXISTS usage_agg_30d_snapshots (
    user_id             TEXT COLLATE "C" NOT NULL,
    as_of               DATE NOT NULL,
    watch_hours_30d     NUMERIC,
    avg_session_mins_7d NUMERIC,
    unique_devices_30d  INTEGER,
    skips_7d            INTEGER,
    rebuffer_events_7d  INTEGER,
    PRIMARY KEY (user_id, as_of)
) PARTITION BY LIST (as_of);

CREATE TABLE IF NOT EXISTS payments_agg_90d_snapshots (
    user_id             TEXT COLLATE "C" NOT NULL,
    as_of               DATE NOT NULL,
    failed_payments_90d INTEGER,
    PRIMARY KEY (user_id, as_of)
) PARTITION BY LIST (as_of);

CREATE TABLE IF NOT EXISTS support_agg_90d_snapshots (
    user_id                       TEXT COLLATE "C" NOT NULL,
    as_of                         DATE NOT NULL,
    support_tickets_90d           INTEGER,
    ticket_avg_resolution_hrs_90d NUMERIC,
    PRIMARY KEY (user_id, as_of)
) PARTITION BY LIST (as_of);

-- Labels change every month; without their history a model trained on January
-- features would silently be scored against February's labels.
CREATE TABLE IF NOT EXISTS labels_snapshots (
    user_id     TEXT COLLATE "C" NOT NULL,
    as_of       DATE NOT NULL,
    churn_label BOOLEAN,
    PRIMARY KEY (user_id, as_of)
) PARTITION BY LIST (as_of);

-- ---------------------------------------------------------------------------
-- Ingestion ledger: every run, and the fingerprint of each published month.
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS ingest_runs (
    run_id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    as_of       DATE NOT NULL,
    seed_dir    TEXT NOT NULL,
    status      TEXT NOT NULL
                CHECK (status IN ('running', 'succeeded', 'noop', 'failed', 'abandoned')),
    mode        TEXT,
    fingerprint TEXT,
    files       JSONB,
    table_stats JSONB,
    validation  JSONB,
    timings     JSONB,
    error       TEXT,
    started_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at TIMESTAMPTZ,
    flow_run_id UUID
);
-- flow_run_id: the Prefect flow run that ran it (its logs, task runs and artifact in
-- the UI); NULL for a no-op answered before Prefect starts. Added to ledgers made
-- before it existed.
ALTER TABLE ingest_runs ADD COLUMN IF NOT EXISTS flow_run_id UUID;

CREATE TABLE IF NOT EXISTS ingest_months (
    as_of        DATE PRIMARY KEY,
    fingerprint  TEXT NOT NULL,
    run_id       BIGINT NOT NULL REFERENCES ingest_runs (run_id),
    published_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------------------
-- Staging: one unlogged, constraint-free copy of each live table. A month is
-- COPYed here and validated before anything live is touched.
-- ---------------------------------------------------------------------------
CREATE SCHEMA IF NOT EXISTS staging;

CREATE UNLOGGED TABLE IF NOT EXISTS staging.users (LIKE public.users);
CREATE UNLOGGED TABLE IF NOT EXISTS staging.subscriptions (LIKE public.subscriptions);
CREATE UNLOGGED TABLE IF NOT EXISTS staging.usage_agg_30d (LIKE public.usage_agg_30d);
CREATE UNLOGGED TABLE IF NOT EXISTS staging.payments_agg_90d (LIKE public.payments_agg_90d);
CREATE UNLOGGED TABLE IF NOT EXISTS staging.support_agg_90d (LIKE public.support_agg_90d);
CREATE UNLOGGED TABLE IF NOT EXISTS staging.labels (LIKE public.labels);
-- The export has no add_on_* columns: staging holds exactly what a file holds.
ALTER TABLE staging.subscriptions
    DROP COLUMN IF EXISTS add_on_security,
    DROP COLUMN IF EXISTS add_on_backup,
    DROP COLUMN IF EXISTS add_on_device_protect,
    DROP COLUMN IF EXISTS add_on_support;

-- ---------------------------------------------------------------------------
-- Month partitions of the history tables. The pipeline's role may not create or
-- alter tables; these functions do exactly that one job for it, for the five
-- history tables only, and run with their owner's rights (SECURITY DEFINER).
-- Their owner's rights would also place what they create in any tablespace the
-- caller's default_tablespace names (a login's PGOPTIONS, without CREATE on it):
-- they build in the database's default one.
-- A new month is built in the staging schema by the publishing transaction, after
-- the live upserts: created, filled, keyed, then moved into public and attached. A
-- month that fails is rolled back whole; no reader ever sees part of one (rows
-- committed before the publish would show, once attached, to a snapshot older than it).
-- ---------------------------------------------------------------------------
-- The month partition's name, for one of the five history tables only: the names
-- these functions build come from this list, never from the caller.
CREATE OR REPLACE FUNCTION streamflow_month_partition_name(history text, month date)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF history NOT IN ('subscriptions_profile_snapshots', 'usage_agg_30d_snapshots',
                       'payments_agg_90d_snapshots', 'support_agg_90d_snapshots',
                       'labels_snapshots') THEN
        RAISE EXCEPTION 'not a history table: %', history;
    END IF;
    RETURN history || '_' || to_char(month, 'YYYYMMDD');
END
$$;

-- The month's partition built in staging, or an error naming what could not be done.
CREATE OR REPLACE FUNCTION streamflow_staged_month_partition(history text, month date,
                                                             purpose text)
RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    part text := streamflow_month_partition_name(history, month);
BEGIN
    IF to_regclass(format('staging.%I', part)) IS NULL THEN
        RAISE EXCEPTION 'no month partition % to %', part, purpose;
    END IF;
    RETURN part;
END
$$;

-- What failed runs of earlier versions (which committed the month's partitions in
-- staging before the publish) left there, never attached. Run first by each history
-- build (under the writer lock, so none is being built meanwhile).
CREATE OR REPLACE FUNCTION streamflow_drop_staged_months()
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    leftover text;
    dropped integer := 0;
BEGIN
    FOR leftover IN
        SELECT tablename FROM pg_tables
        WHERE schemaname = 'staging'
          AND tablename ~ ('^(subscriptions_profile|usage_agg_30d|payments_agg_90d|'
                           'support_agg_90d|labels)_snapshots_[0-9]{8}$')
    LOOP
        EXECUTE format('DROP TABLE staging.%I', leftover);
        dropped := dropped + 1;
    END LOOP;
    RETURN dropped;
END
$$;

-- The month's partition, new and empty in staging (NULL: the month is in history).
CREATE OR REPLACE FUNCTION streamflow_new_month_partition(history text, month date)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
SET default_tablespace = ''
AS $$
DECLARE
    part text := streamflow_month_partition_name(history, month);
BEGIN
    IF to_regclass(format('public.%I', part)) IS NOT NULL THEN
        RETURN NULL;  -- the month exists: the caller rewrites it through the parent
    END IF;
    EXECUTE format('DROP TABLE IF EXISTS staging.%I', part);  -- a failed run's, if any
    -- No index yet: a month is appended in one go, then indexed by one sort.
    EXECUTE format('CREATE TABLE staging.%I (LIKE public.%I)', part, history);
    EXECUTE format('GRANT INSERT ON staging.%I TO streamflow_ingest', part);
    RETURN part;
END
$$;

-- Filled: its key, and the CHECK that lets ATTACH skip its own validation scan.
CREATE OR REPLACE FUNCTION streamflow_index_month_partition(history text, month date)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
SET default_tablespace = ''
SET maintenance_work_mem = '256MB'
AS $$
DECLARE
    part text := streamflow_staged_month_partition(history, month, 'index');
BEGIN
    EXECUTE format('REVOKE INSERT ON staging.%I FROM streamflow_ingest', part);
    EXECUTE format('ALTER TABLE staging.%I ADD PRIMARY KEY (user_id, as_of)', part);
    EXECUTE format('ALTER TABLE staging.%I ADD CONSTRAINT %I CHECK (as_of = %L)',
                   part, part || '_as_of', month);
END
$$;

-- In the publishing transaction: the built month becomes part of history.
CREATE OR REPLACE FUNCTION streamflow_attach_month_partition(history text, month date)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    part text := streamflow_staged_month_partition(history, month, 'attach');
BEGIN
    EXECUTE format('ALTER TABLE staging.%I SET SCHEMA public', part);
    EXECUTE format('ALTER TABLE public.%I ATTACH PARTITION public.%I FOR VALUES IN (%L)',
                   history, part, month);
END
$$;

REVOKE ALL ON FUNCTION streamflow_drop_staged_months() FROM PUBLIC;
REVOKE ALL ON FUNCTION streamflow_new_month_partition(text, date) FROM PUBLIC;
REVOKE ALL ON FUNCTION streamflow_index_month_partition(text, date) FROM PUBLIC;
REVOKE ALL ON FUNCTION streamflow_attach_month_partition(text, date) FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- First load of a live table. Appending 1M rows to an empty table and then building
-- its primary key by one sort takes half the time of keeping the key up to date row
-- by row. These two functions drop and rebuild that key, inside the publishing
-- transaction, for the five tables keyed to users and only while they are empty.
-- users keeps its key: the foreign keys point at it, and validation reads it while
-- the month is being published (a lock on it would make validation wait for the
-- transaction that waits for validation).
-- ---------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION streamflow_live_key_table(live text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF live NOT IN ('subscriptions', 'usage_agg_30d', 'payments_agg_90d',
                    'support_agg_90d', 'labels') THEN
        RAISE EXCEPTION 'not a live table keyed to users: %', live;
    END IF;
    RETURN live;
END
$$;

-- true: the table was empty and has no primary key until streamflow_restore_live_key.
CREATE OR REPLACE FUNCTION streamflow_drop_empty_live_key(live text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    tbl text := streamflow_live_key_table(live);
    empty boolean;
BEGIN
    EXECUTE format('SELECT NOT EXISTS (SELECT 1 FROM %I)', tbl) INTO empty;
    IF NOT empty THEN
        RETURN false;  -- checked before locking: a table in use is never locked here
    END IF;
    -- No wait: a reader holding the table would stall the run for as long as it
    -- holds it, and every reader after it would queue behind this lock request.
    -- The caller then appends into the keyed table.
    BEGIN
        EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE NOWAIT', tbl);
    EXCEPTION WHEN lock_not_available THEN
        RETURN false;
    END;
    EXECUTE format('SELECT NOT EXISTS (SELECT 1 FROM %I)', tbl) INTO empty;
    IF NOT empty THEN
        RETURN false;
    END IF;
    EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', tbl, tbl || '_pkey');
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION streamflow_restore_live_key(live text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
SET default_tablespace = ''
SET maintenance_work_mem = '256MB'
AS $$
DECLARE
    tbl text := streamflow_live_key_table(live);
BEGIN
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I PRIMARY KEY (user_id)', tbl, tbl || '_pkey');
END
$$;

REVOKE ALL ON FUNCTION streamflow_drop_empty_live_key(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION streamflow_restore_live_key(text) FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- Least privilege: the flow logs in as a member of streamflow_ingest, which can
-- read and write the pipeline's rows but owns nothing, so it cannot DROP, ALTER
-- or TRUNCATE live data, nor create roles. Login roles are made per deployment
-- (db/init/002_ingest_login.sh in Docker).
-- ---------------------------------------------------------------------------
-- The group roles: the flow's (streamflow_ingest) and the readers' (streamflow_reader,
-- below). A login of either name (PREFECT_DB_USER, say) would get the group's grants,
-- and its own privileges would reach every member of the group: refused.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['streamflow_ingest', 'streamflow_reader'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        ELSIF (SELECT rolcanlogin FROM pg_roles WHERE rolname = r) THEN
            RAISE EXCEPTION 'role % exists and can log in: it must be a NOLOGIN group role', r;
        END IF;
    END LOOP;
END
$$;

-- Only the two groups connect (besides the database's owner and superusers):
-- PostgreSQL lets PUBLIC connect and create temporary tables in a new database, so
-- Prefect's login or any other could open sessions here. Only the owner may change
-- that: a login applying this file to an older database without being the owner
-- (bootstrap.ensure_schema) leaves it as it was. Not on the cluster's maintenance database
-- (the embedded server's): every client and tool expects to reach that one.
DO $$
BEGIN
    IF current_database() <> 'postgres'
       AND pg_has_role(current_user, (SELECT datdba FROM pg_database
                                      WHERE datname = current_database()), 'MEMBER') THEN
        EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
        EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I '
                       'TO streamflow_ingest, streamflow_reader', current_database());
    END IF;
END
$$;

REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public, staging TO streamflow_ingest;
GRANT SELECT, INSERT, UPDATE ON
    users, subscriptions, usage_agg_30d, payments_agg_90d, support_agg_90d, labels,
    subscriptions_profile_snapshots, usage_agg_30d_snapshots, payments_agg_90d_snapshots,
    support_agg_90d_snapshots, labels_snapshots,
    ingest_runs, ingest_months
    TO streamflow_ingest;
-- DELETE on history only: --replace rewrites one as_of atomically.
GRANT DELETE ON
    subscriptions_profile_snapshots, usage_agg_30d_snapshots, payments_agg_90d_snapshots,
    support_agg_90d_snapshots, labels_snapshots
    TO streamflow_ingest;
-- Publishing switches the per-row foreign-key triggers off for its own transaction
-- (db/sql/publish.sql): the month's keys are checked set-based instead, by the GX
-- orphan expectation whose verdict gates the commit. PostgreSQL 15+.
GRANT SET ON PARAMETER session_replication_role TO streamflow_ingest;
GRANT EXECUTE ON FUNCTION streamflow_drop_staged_months(),
                          streamflow_new_month_partition(text, date),
                          streamflow_index_month_partition(text, date),
                          streamflow_attach_month_partition(text, date),
                          streamflow_drop_empty_live_key(text),
                          streamflow_restore_live_key(text)
    TO streamflow_ingest;
GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON
    staging.users, staging.subscriptions, staging.usage_agg_30d,
    staging.payments_agg_90d, staging.support_agg_90d, staging.labels
    TO streamflow_ingest;

-- ---------------------------------------------------------------------------
-- The readers: the feature store and training jobs read history and labels,
-- and the ledger to know which months are published; they write nothing and
-- never see staging (a month there is not validated). Logins are made per
-- consumer: CREATE ROLE feature_store LOGIN PASSWORD '…' IN ROLE streamflow_reader.
-- ---------------------------------------------------------------------------
GRANT USAGE ON SCHEMA public TO streamflow_reader;
GRANT SELECT ON
    users, subscriptions, usage_agg_30d, payments_agg_90d, support_agg_90d, labels,
    subscriptions_profile_snapshots, usage_agg_30d_snapshots, payments_agg_90d_snapshots,
    support_agg_90d_snapshots, labels_snapshots,
    ingest_runs, ingest_months
    TO streamflow_reader;

-- ---------------------------------------------------------------------------
-- This file's version. A database initialised by an older one (bootstrap.ensure_schema
-- compares the numbers) gets the whole file again: a changed function body or
-- setting reaches it, not only new databases. Raise it with every change to its SQL (the
-- one place it is written; tests/test_init_scripts.py holds each version's sha256 of
-- the SQL, comments aside: a comment-only edit keeps the version).
-- ---------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION streamflow_schema_version()
RETURNS integer
LANGUAGE sql IMMUTABLE
AS 'SELECT 2';
-- Granted, not left to PUBLIC: a database whose default privileges revoke EXECUTE
-- from PUBLIC (a common hardening) would refuse every run of the ingest login.
GRANT EXECUTE ON FUNCTION streamflow_schema_version() TO streamflow_ingest, streamflow_reader;
