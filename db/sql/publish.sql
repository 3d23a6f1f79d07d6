-- Publishing a validated month: live upserts and as_of snapshots, run together in
-- one transaction by streamflow.publishing. {placeholders} are registry identifiers.

-- name: session
-- Sorting a month by user_id and the hash joins are work over the whole month: give
-- them memory. No foreign-key trigger call per row: the month's keys were checked
-- set-based by the GX orphan expectation (db/sql/validation.sql), and this
-- transaction commits only if it passed. session_replication_role is granted to
-- streamflow_ingest for this alone (db/init/001_schema.sql).
SET LOCAL work_mem = '256MB';
SET LOCAL session_replication_role = replica;

-- name: live_is_empty
SELECT NOT EXISTS (SELECT 1 FROM {live});

-- name: drop_empty_live_key
-- A first load of a table keyed to users: its primary key is rebuilt after the
-- month is in (db/init/001_schema.sql says why; false: the table is not empty, or
-- a reader holds it).
SELECT streamflow_drop_empty_live_key(%(live)s);

-- name: restore_live_key
SELECT streamflow_restore_live_key(%(live)s);

-- name: append_live
-- Into a table without its key: no order needed, the key is built by one sort after.
INSERT INTO {live} ({columns})
SELECT {staged_columns} FROM {staged} AS s;

-- name: live_rows
SELECT count(*) FROM {live};

-- name: merge_live
-- One hash join of the month with the live table for both kinds of row: new users
-- are inserted, users whose values changed are rewritten (IS DISTINCT FROM treats
-- NULLs as values), unchanged rows are not touched. An UPDATE then an anti-join
-- INSERT would join the two tables twice (~1.4 s per 1M-row table). The source is
-- the staged table, or for a backfill the subquery backfill_rows.
MERGE INTO {live} AS t
USING {source} AS s ON t.user_id = s.user_id
WHEN MATCHED AND ({live_values}) IS DISTINCT FROM ({staged_values}) THEN
  UPDATE SET ({value_columns}) = ROW({staged_values})
WHEN NOT MATCHED THEN
  INSERT ({columns}) VALUES ({staged_columns});

-- name: not_listed_later
-- A backfill's users whose live values it writes: the live tables hold each user's
-- latest listed month, so only the users no later published month lists take this
-- month's values (a user who left before the newer months, or who appears only here).
-- Every published month lists all its users in labels_snapshots (validated: each file
-- lists the users of users.csv). An anti-join against every later month, so found once
-- for the six tables: it grows with the months after this one.
CREATE TEMP TABLE backfill_users ON COMMIT DROP AS
SELECT s.user_id FROM staging.users AS s
WHERE NOT EXISTS (
  SELECT 1 FROM labels_snapshots AS later
  WHERE later.as_of > %(as_of)s AND later.user_id = s.user_id
);

-- name: analyze_backfill_users
-- Its row count for the planner of the six semi-joins (a table just created has none).
ANALYZE pg_temp.backfill_users;

-- name: backfill_rows
-- The source of merge_live for a backfill: the staged rows of not_listed_later's users.
(SELECT s.* FROM {staged} AS s
 WHERE EXISTS (SELECT 1 FROM pg_temp.backfill_users AS b WHERE b.user_id = s.user_id))

-- name: insert_live
-- A first load into an empty table: the whole month, in key order, so the primary
-- key index is appended to rather than split at random pages.
INSERT INTO {live} ({columns})
SELECT {staged_columns} FROM {staged} AS s
ORDER BY s.user_id;

-- name: drop_vanished_snapshots
-- Only matters with --replace: users absent from the new files leave that month.
DELETE FROM {history} AS h
WHERE h.as_of = %(as_of)s
  AND NOT EXISTS (SELECT 1 FROM {staged} AS s WHERE s.user_id = h.user_id);

-- name: drop_staged_months
-- Month partitions that failed runs of earlier versions committed in staging.
SELECT streamflow_drop_staged_months();

-- name: new_month_partition
-- A month seen for the first time gets its own partition, built in staging by the
-- publishing transaction (NULL: the month is in history already).
SELECT streamflow_new_month_partition(%(history)s, %(as_of)s);

-- name: insert_snapshot
-- Into the new, index-free partition: nothing to compare with, nothing to maintain.
-- No ORDER BY: the primary key built next sorts the month once anyway.
INSERT INTO {partition} (user_id, as_of, {columns})
SELECT user_id, %(as_of)s, {columns} FROM {staged};

-- name: index_month_partition
SELECT streamflow_index_month_partition(%(history)s, %(as_of)s);

-- name: attach_month_partition
-- In the publishing transaction: from staging into public, and into history.
SELECT streamflow_attach_month_partition(%(history)s, %(as_of)s);

-- name: update_snapshot
-- --replace of a published month: rewrite only the rows that differ. (Two statements
-- rather than ON CONFLICT: a partitioned table cannot return xmax to tell them apart.)
UPDATE {history} AS h
SET ({columns}) = ROW({staged_values})
FROM {staged} AS s
WHERE h.as_of = %(as_of)s AND h.user_id = s.user_id
  AND ({history_values}) IS DISTINCT FROM ({staged_values});

-- name: add_to_snapshot
INSERT INTO {history} (user_id, as_of, {columns})
SELECT s.user_id, %(as_of)s, {staged_values} FROM {staged} AS s
WHERE NOT EXISTS (SELECT 1 FROM {history} AS h WHERE h.as_of = %(as_of)s AND h.user_id = s.user_id)
ORDER BY s.user_id;
