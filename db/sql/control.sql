-- The run's control connection: is the schema there, and the pipeline's writer lock
-- (a session advisory lock: it ends with the session that holds it, however it ends).

-- name: schema_present
SELECT to_regclass('public.users') IS NOT NULL
   AND to_regclass('public.ingest_runs') IS NOT NULL;

-- name: schema_is_current
-- The newest function and column of db/init: a database without them is older.
SELECT to_regprocedure(%(signature)s) IS NOT NULL
   AND EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid = to_regclass(%(table)s) AND attname = %(column)s
                 AND NOT attisdropped);

-- name: try_writer_lock
SELECT pg_try_advisory_lock(%(key)s);

-- name: writer_lock_holder
-- Who holds it, and for how long, to name them when the wait is over.
SELECT pid, now() - backend_start
FROM pg_locks JOIN pg_stat_activity USING (pid)
WHERE locktype = 'advisory' AND objid = %(key)s AND granted;

-- name: unlock_writer_lock
SELECT pg_advisory_unlock(%(key)s);

-- name: holds_writer_lock
-- Whether backend "holder" (a run's control connection) still holds the lock.
SELECT EXISTS (
  SELECT 1 FROM pg_locks
  WHERE locktype = 'advisory' AND granted AND pid = %(holder)s AND objid = %(key)s
);
