-- Staging: scratch space for one month, replaced file by file.
-- {placeholders} are identifiers from the table registry, quoted by psycopg.sql.

-- name: truncate
TRUNCATE {staged};

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
