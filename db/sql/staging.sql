-- Staging: scratch space for one month, replaced file by file.
-- {placeholders} are identifiers from the table registry, quoted by psycopg.sql.

-- name: truncate
TRUNCATE {staged};

-- name: truncate_or_give_up
-- TRUNCATE waits for every other session's lock on the table, without a word: a
-- pg_dump holds one on each table it dumps until the whole dump ends. Give up after a
-- few seconds, to say who holds it, then wait (loading.stage_file).
SAVEPOINT before_truncate;
SET LOCAL lock_timeout = '5s';
TRUNCATE {staged};
RESET lock_timeout;
RELEASE SAVEPOINT before_truncate;

-- name: back_before_truncate
ROLLBACK TO SAVEPOINT before_truncate;

-- name: holders
-- Who holds a lock on a staged table: pid and what they call themselves (pg_dump's
-- application_name is pg_dump).
SELECT DISTINCT a.pid, coalesce(nullif(a.application_name, ''), a.usename::text)
FROM pg_locks AS l
JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'relation' AND l.relation = %(staged)s::regclass AND l.granted
  AND l.pid <> pg_backend_pid()
ORDER BY 1;

-- name: copy_csv
-- HEADER is not used: the header was already read and matched by name, and the
-- column list below puts PostgreSQL's columns in the file's order. FORCE_NULL makes
-- a quoted empty field ("") NULL like an unquoted one, as writers that quote every
-- field (csv.QUOTE_ALL, pandas, spreadsheets) spell a missing value that way.
COPY {staged} ({columns}) FROM STDIN WITH (FORMAT csv, FORCE_NULL ({columns}));

-- name: staged_rows
SELECT count(*) FROM {staged};

-- name: empty
-- Once their month is published: at 10M users the six tables hold ~4 GB that nothing
-- reads any more. In a transaction of its own, so that the lock wait is bounded.
SET LOCAL lock_timeout = '10s';
TRUNCATE {tables};
