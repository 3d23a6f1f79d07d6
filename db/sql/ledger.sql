-- The ingestion ledger: one ingest_runs row per run, one ingest_months row per
-- published as_of (its file fingerprint decides no-op / refuse / replace).

-- name: abandon_stale_runs
-- Called with the writer lock held: a 'running' row now belongs to a dead run. When
-- it stopped is not known: finished_at stays empty (now() gave it the next run's start).
UPDATE ingest_runs
SET status = 'abandoned',
    error = coalesce(error, 'the run ended without recording its outcome (process killed, '
                            'connection lost, or the ledger could not be written: see the '
                            'run''s log)')
WHERE status = 'running';

-- name: published_month
SELECT fingerprint, run_id FROM ingest_months WHERE as_of = %(as_of)s;

-- name: published_files
-- The files as recorded by the last run that published this as_of or found it
-- unchanged: with their stat, an unchanged month is recognised without reading it.
SELECT r.files FROM ingest_runs AS r
JOIN ingest_months AS m ON m.as_of = r.as_of AND m.fingerprint = r.fingerprint
WHERE r.as_of = %(as_of)s AND r.status IN ('succeeded', 'noop')
ORDER BY r.run_id DESC
LIMIT 1;

-- name: same_files_elsewhere
-- Another as_of published from byte-identical files: a month copied under a new date.
SELECT as_of, run_id FROM ingest_months
WHERE fingerprint = %(fingerprint)s AND as_of <> %(as_of)s
ORDER BY as_of
LIMIT 1;

-- name: files_published_elsewhere
-- This month's files that are byte for byte a file another published as_of has (a
-- stale export copied into the folder: last month's labels under this month's date).
-- Only the files whose values are the month's own are asked about (registry.py).
SELECT DISTINCT f.key, m.as_of
FROM ingest_months AS m
JOIN ingest_runs AS r ON r.run_id = m.run_id
CROSS JOIN LATERAL jsonb_each(r.files) AS f
WHERE m.as_of <> %(as_of)s AND f.value ->> 'sha256' = ANY(%(hashes)s)
ORDER BY m.as_of, f.key;

-- name: latest_published
SELECT max(as_of) FROM ingest_months;

-- name: start_run
INSERT INTO ingest_runs (as_of, seed_dir, status, mode, fingerprint, files, flow_run_id)
VALUES (%(as_of)s, %(seed_dir)s, %(status)s, %(mode)s, %(fingerprint)s, %(files)s,
        %(flow_run_id)s)
RETURNING run_id;

-- name: finish_run
-- A run whose month committed stays succeeded: an interrupt between the commit (on the
-- publishing connection) and this update must not record it as failed.
UPDATE ingest_runs
SET status = %(status)s, table_stats = %(table_stats)s, validation = %(validation)s,
    timings = %(timings)s, error = %(error)s, finished_at = now()
WHERE run_id = %(run_id)s AND NOT (status = 'succeeded' AND %(status)s = 'failed');

-- name: mark_published
-- In the publishing transaction: the run is known to have published the month the
-- moment the month is, whatever happens to the process before finish_run.
UPDATE ingest_runs
SET status = 'succeeded', table_stats = %(table_stats)s, error = NULL, finished_at = now()
WHERE run_id = %(run_id)s;

-- name: published_stats
-- What the publishing transaction recorded of its month (mark_published), read back
-- when the publisher's task failed after its COMMIT returned.
SELECT table_stats FROM ingest_runs WHERE run_id = %(run_id)s AND status = 'succeeded';

-- name: record_month
INSERT INTO ingest_months AS m (as_of, fingerprint, run_id)
VALUES (%(as_of)s, %(fingerprint)s, %(run_id)s)
ON CONFLICT (as_of) DO UPDATE
    SET fingerprint = excluded.fingerprint, run_id = excluded.run_id, published_at = now();

-- name: history_against_ledger
-- Every run checks the history tables' month partitions against the published months,
-- both ways. A published month with no partition in a table (detached or dropped by
-- hand) would read as empty there, and a --replace of it would fail; a partition whose
-- month the ledger does not list (ingest_months rows deleted, a restore that stopped
-- part-way) would be taken for a new month by the rerun rules. Bounds are compared,
-- not names, as text in the session's DateStyle on both sides; each partition's bound is
-- deparsed once (the costly part: a database holds one partition per table per month,
-- 13 ms for 1,200 of them). as_of NULL: a partition that is not one month's (a DEFAULT
-- one attached by hand; its date is read from the bound for the message, ISO only).
-- "histories" is the registry's list of history tables.
WITH partitions AS MATERIALIZED (
  SELECT h.history, pg_get_expr(c.relpartbound, c.oid) AS bound
  FROM unnest(%(histories)s::text[]) AS h (history)
  JOIN pg_inherits AS i ON i.inhparent = to_regclass('public.' || h.history)
  JOIN pg_class AS c ON c.oid = i.inhrelid
),
published AS (
  SELECT h.history, m.as_of, format('FOR VALUES IN (%%L)', m.as_of) AS bound
  FROM ingest_months AS m
  CROSS JOIN unnest(%(histories)s::text[]) AS h (history)
)
SELECT coalesce(m.history, p.history) AS history,
       coalesce(m.as_of,
                substring(p.bound FROM '^FOR VALUES IN \(''([0-9-]+)''\)$')::date) AS as_of,
       p.history IS NULL AS missing
FROM published AS m
FULL JOIN partitions AS p ON p.history = m.history AND p.bound = m.bound
WHERE m.history IS NULL OR p.history IS NULL
ORDER BY 2, 1;
