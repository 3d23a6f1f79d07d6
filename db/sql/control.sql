-- The run's control connection: is the schema there, and the pipeline's writer lock
-- (a session advisory lock: it ends with the session that holds it, however it ends).

-- name: schema_present
SELECT to_regclass('public.users') IS NOT NULL
   AND to_regclass('public.ingest_runs') IS NOT NULL;

-- name: schema_is_current
-- The version function and the newest column of db/init: a database without them is older.
SELECT to_regprocedure(%(signature)s) IS NOT NULL
   AND EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid = to_regclass(%(table)s) AND attname = %(column)s
                 AND NOT attisdropped);

-- name: grants_not_db_init
-- What db/init makes and grants that a database of the current version may still lack:
-- roles and the parameter grant are the cluster's, not the database's, so a dump
-- restored into another cluster comes back without them, and pg_restore's failed GRANTs
-- leave the functions that run with their owner's rights to PUBLIC; the database's own
-- CONNECT/TEMPORARY grants come back only with pg_dump --create. breaks_runs: every run
-- would fail on it. The CASEs keep each privilege function from a role or function that
-- is not there (it raises on one), whatever order the planner chooses.
WITH owner_rights (f) AS (
  VALUES ('streamflow_drop_staged_months()'),
         ('streamflow_new_month_partition(text, date)'),
         ('streamflow_index_month_partition(text, date)'),
         ('streamflow_attach_month_partition(text, date)'),
         ('streamflow_drop_empty_live_key(text)'),
         ('streamflow_restore_live_key(text)')
), ingest (present) AS (
  SELECT to_regrole('streamflow_ingest') IS NOT NULL
)
SELECT problem, breaks_runs
FROM (
  SELECT 1, 'no role streamflow_ingest', true FROM ingest WHERE NOT present
  UNION ALL
  SELECT 2, 'no role streamflow_reader', false WHERE to_regrole('streamflow_reader') IS NULL
  UNION ALL
  SELECT 3, 'streamflow_ingest may not SET session_replication_role', true FROM ingest
  WHERE CASE WHEN present
             THEN NOT has_parameter_privilege('streamflow_ingest', 'session_replication_role',
                                              'SET')
             ELSE false END
  UNION ALL
  SELECT 4, 'streamflow_ingest may not use the staging schema', true FROM ingest
  WHERE CASE WHEN present AND to_regnamespace('staging') IS NOT NULL
             THEN NOT has_schema_privilege('streamflow_ingest', 'staging', 'USAGE')
             ELSE false END
  UNION ALL
  SELECT 5, format('no function %s', f), true FROM owner_rights
  WHERE to_regprocedure(f) IS NULL
  UNION ALL
  SELECT 6, format('streamflow_ingest may not run %s', f), true FROM owner_rights, ingest
  WHERE CASE WHEN present AND to_regprocedure(f) IS NOT NULL
             THEN NOT has_function_privilege('streamflow_ingest', to_regprocedure(f), 'EXECUTE')
             ELSE false END
  UNION ALL
  SELECT 7, format('PUBLIC may run %s, which runs with its owner''s rights', f), false
  FROM owner_rights
  WHERE CASE WHEN to_regprocedure(f) IS NOT NULL
             THEN has_function_privilege('public', to_regprocedure(f), 'EXECUTE')
             ELSE false END
  UNION ALL
  -- A backfill finds its users once, into a temporary table (publish.sql): only a run
  -- of a month older than the latest would fail.
  SELECT 8, 'streamflow_ingest may not create temporary tables in this database, which a '
            'backfill (a month older than the latest) needs', false FROM ingest
  WHERE CASE WHEN present
             THEN NOT has_database_privilege('streamflow_ingest', current_database(),
                                             'TEMPORARY')
             ELSE false END
) AS found (n, problem, breaks_runs)
ORDER BY n;

-- name: tables_not_ours
-- Tables of the pipeline's names that db/init did not make (the lab's own schema, an
-- older tool's): a history table not partitioned by as_of (column NULL), or a table
-- without a column the pipeline writes. db/init's CREATE TABLE IF NOT EXISTS would keep
-- them as they are, and a month would be staged and validated, then fail at its end.
SELECT w.tbl, w.col
FROM unnest(%(tables)s::text[], %(columns)s::text[]) WITH ORDINALITY AS w (tbl, col, n)
JOIN pg_class AS c ON c.oid = to_regclass(format('public.%%I', w.tbl))
WHERE CASE WHEN w.col IS NULL THEN c.relkind <> 'p'
           ELSE NOT EXISTS (SELECT 1 FROM pg_attribute AS a
                            WHERE a.attrelid = c.oid AND a.attname = w.col
                              AND a.attnum > 0 AND NOT a.attisdropped)
      END
ORDER BY w.n;

-- name: schema_version
SELECT streamflow_schema_version();

-- name: try_writer_lock
SELECT pg_try_advisory_lock(%(key)s);

-- name: writer_lock_holder
-- Who holds it, to name them when the wait is over. Advisory locks are per database:
-- another database's pipeline holds its own. Whether the ledger exists yet: its
-- running row says which run holds the lock (writer_lock_run).
SELECT l.pid, a.backend_start, to_regclass('ingest_runs') IS NOT NULL AS has_ledger
FROM pg_locks AS l
LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.objid = %(key)s AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database());

-- name: writer_lock_run
-- The run that holds the lock: the newest running row opened since its holder's
-- session began (a row opened before is a dead run's, not yet marked abandoned). Not
-- exact: a run killed after the holder connected, whose row the holder has not yet
-- marked abandoned (it does so once it has the lock and the schema is checked), passes
-- too. In a transaction bounded by writer_lock_run_bounds.
SELECT run_id, as_of, seed_dir, started_at, flow_run_id
FROM ingest_runs
WHERE status = 'running' AND started_at >= %(since)s
ORDER BY run_id DESC
LIMIT 1;

-- name: writer_lock_run_bounds
-- The message is a courtesy: its lookup must not wait behind the schema's DDL (an
-- upgrade holds ingest_runs until its init script ends) nor stall the wait it words.
SET LOCAL lock_timeout = '1s';
SET LOCAL statement_timeout = '2s';

-- name: unlock_writer_lock
SELECT pg_advisory_unlock(%(key)s);

-- name: holds_writer_lock
-- Whether backend "holder" (a run's control connection) still holds the lock; if not,
-- which session of this database holds it now, if one does (a lost connection alone
-- is not another run writing).
SELECT
  EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND pid = %(holder)s AND objid = %(key)s
  ),
  (SELECT min(pid) FROM pg_locks
   WHERE locktype = 'advisory' AND objid = %(key)s AND granted AND pid <> %(holder)s
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database()));
