-- Cross-table expectations GX has no built-in for. {batch} is the staged table:
-- GX substitutes an aliased subquery for it, hence the extra SELECT level.

-- name: orphans
-- A child row must belong to a user of this month's users.csv: each file of a month
-- lists the same users, one row each.
SELECT o.user_id FROM (SELECT user_id FROM {batch}) AS o
WHERE o.user_id IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM staging.users AS s WHERE s.user_id = o.user_id)

-- name: missing_users
-- The users of users.csv without a row in the file: the examples behind a file with
-- fewer rows than users.csv ({batch} is the staged table itself here).
SELECT s.user_id FROM staging.users AS s
WHERE s.user_id IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM {batch} AS b WHERE b.user_id = s.user_id)

-- name: duplicates
-- The user_ids that appear more than once, with how many times: the examples behind
-- a failed uniqueness expectation.
SELECT d.user_id, d.copies FROM (
  SELECT user_id, count(*) AS copies FROM {batch} WHERE user_id IS NOT NULL
  GROUP BY user_id HAVING count(*) > 1
) AS d

-- name: not_numbers
-- PostgreSQL's numeric input accepts NaN and +-Infinity, and NaN sorts above every
-- number (so it passes ">= 0"); no monthly figure is one of them, nor a number no
-- float holds (1e400: a reader in double precision, pandas included, gets Infinity).
-- One comparison finds all three: abs() keeps NaN and Infinity above the bound.
-- {column} is a numeric column of the registry.
SELECT b.user_id, b.{column} FROM (SELECT user_id, {column} FROM {batch}) AS b
WHERE abs(b.{column}) > 1.7976931348623157e308

-- name: above_ceiling
-- A figure above what its window holds (watch hours in 30 days above 720): an export
-- in another unit (minutes), or summed over another window. {column} and its {bound}
-- are the registry's. NaN and Infinity sort above every number: not_numbers names them.
SELECT b.user_id, b.{column} FROM (SELECT user_id, {column} FROM {batch}) AS b
WHERE b.{column} > {bound} AND b.{column} <= 1.7976931348623157e308

-- name: negatives
-- The rows behind a failed ">= 0" expectation, to name them in the error.
SELECT b.user_id, b.{column} FROM (SELECT user_id, {column} FROM {batch}) AS b
WHERE b.{column} < 0

-- name: empty_values
-- The rows behind a failed "not empty" expectation, named by their user_id (an empty
-- churn_label in a 10M-row file had nothing to search for).
-- The value is aliased: the column may be user_id itself (GX's not-null check of the
-- key fails only if its query failed), which the subquery would list twice.
SELECT b.user_id, NULL::text FROM (SELECT user_id, {column} AS value FROM {batch}) AS b
WHERE b.value IS NULL

-- name: outside_set
-- The rows behind a failed value-set expectation; "allowed" is the registry's set.
SELECT b.user_id, b.{column} FROM (SELECT user_id, {column} FROM {batch}) AS b
WHERE b.{column} <> ALL (%(allowed)s)

-- name: outside_dates
-- The rows behind a failed "from the earliest date to the as_of" expectation; "as_of"
-- is the run's, "earliest" the registry's, {column} a date column of the registry. As
-- text: -infinity and BC dates have no Python date.
SELECT b.user_id, b.{column}::text FROM (SELECT user_id, {column} FROM {batch}) AS b
WHERE b.{column} > %(as_of)s OR b.{column} < %(earliest)s

-- name: empty_columns
-- The columns that may be empty but are empty in every row: an export that lost them.
-- Each registry column's name is paired with EXISTS (a non-null value), which stops at
-- the first one: a passing month reads a few rows, not the table. A file with no rows
-- is left to its own check. The VALUES list: one empty_columns_row per column.
SELECT NULL::text AS user_id, e.name FROM (VALUES {filled}) AS e (name, filled)
WHERE NOT e.filled AND EXISTS (SELECT 1 FROM {batch})

-- name: empty_columns_row
({column_name}, EXISTS (SELECT 1 FROM {{batch}} WHERE {column} IS NOT NULL))

-- name: key_spelling
-- user_ids that are not a plain code. (1) White space, a control or an invisible
-- character anywhere: ' 7590-VHVEG', '7590-VHVEG' + a direction mark and '7590 VHVEG'
-- are other users than '7590-VHVEG', and look the same. The class, by code point:
-- controls and space (1-32), DEL, C1 controls and no-break space (127-160), soft
-- hyphen, combining grapheme joiner, Unicode's spaces, the default-ignorable and
-- format characters (direction marks and isolates, zero-width characters, Arabic,
-- Syriac, Kaithi, Egyptian and shorthand format controls, invisible Khmer vowels,
-- Hangul fillers, variation selectors, tags), braille blank, byte-order mark, and
-- the code points no font draws: private use (U+E000-F8FF, planes 15-16) and the
-- noncharacters (U+FDD0-FDEF, the last two of every plane). (2) A
-- word CSV readers take for a missing value: pandas' read_csv defaults (the lab's own
-- loader read these files with it), so any CSV round trip would lose that user's key.
-- Letters of any script are allowed ('É-1'). The regex alone is cheaper than the two
-- hashed lookups of the first and last characters it replaced; the word list adds
-- 0.02 s at 1M rows (docs/performance.md, 30). E'' so that the escapes reach the regex
-- whether standard_conforming_strings is on or off. An empty user_id is already NULL
-- (staging's FORCE_NULL), refused by loading.
SELECT b.user_id, b.user_id FROM (SELECT user_id FROM {batch}) AS b
WHERE b.user_id ~ E'[\\x01-\\x20\\x7f-\\xa0\\u00ad\\u034f\\u0600-\\u0605\\u061c\\u06dd\\u070f\\u0890\\u0891\\u08e2\\u115f\\u1160\\u1680\\u17b4\\u17b5\\u180b-\\u180f\\u2000-\\u200f\\u2028-\\u202f\\u205f-\\u206f\\u2800\\u3000\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0\\ufff9-\\ufffb\\U000110bd\\U000110cd\\U00013430-\\U0001343f\\U0001bca0-\\U0001bca3\\U0001d173-\\U0001d17a\\U000e0000-\\U000e0fff\\ue000-\\uf8ff\\ufdd0-\\ufdef\\ufffe\\uffff\\U0001fffe\\U0001ffff\\U0002fffe\\U0002ffff\\U0003fffe\\U0003ffff\\U0004fffe\\U0004ffff\\U0005fffe\\U0005ffff\\U0006fffe\\U0006ffff\\U0007fffe\\U0007ffff\\U0008fffe\\U0008ffff\\U0009fffe\\U0009ffff\\U000afffe\\U000affff\\U000bfffe\\U000bffff\\U000cfffe\\U000cffff\\U000dfffe\\U000dffff\\U000efffe\\U000effff\\U000f0000-\\U0010ffff]'
   OR b.user_id IN ('#N/A', '#N/A N/A', '#NA', '-1.#IND', '-1.#QNAN', '-NaN', '-nan',
                    '1.#IND', '1.#QNAN', '<NA>', 'N/A', 'NA', 'NULL', 'NaN', 'None', 'n/a',
                    'nan', 'null')

-- name: first_examples
-- A failed check's query, cut to the few rows an error message shows.
SELECT * FROM ({rows}) AS r LIMIT 5

-- name: count_rows
-- A failed check's query, counted when GX did not count it.
SELECT count(*) FROM ({rows}) AS r

-- name: month_before
-- The latest month published before this as_of: the one the users-drop check
-- compares the staged month with (no row: none was).
SELECT as_of FROM ingest_months WHERE as_of < %(as_of)s ORDER BY as_of DESC LIMIT 1;

-- name: users_of_month
-- Every published month lists all its users in labels_snapshots (each file lists
-- the users of users.csv); a constant as_of reads that month's partition only.
SELECT count(*) FROM labels_snapshots WHERE as_of = %(as_of)s;

-- name: users_sample
-- Users of the month before, to count how many this month still lists: a re-keyed
-- export lists as many users, none of them known. Each row is kept with the same
-- chance (BERNOULLI: every page is read, ~9 ms at 1M users), the same rows each run
-- (REPEATABLE). Not whole pages (SYSTEM): a dozen pages would stand for the month,
-- and a file's neighbouring rows (one region, an id range) go missing together.
SELECT user_id FROM labels_snapshots TABLESAMPLE BERNOULLI (%(percent)s) REPEATABLE (0)
WHERE as_of = %(as_of)s;

-- name: still_listed
-- How many users of that sample the staged users.csv lists (duplicates are a check of
-- their own). In WHERE: as a FILTER of count(*) on the same scan it took 379 ms at 1M
-- users, not 44.
SELECT count(DISTINCT user_id) FROM staging.users WHERE user_id = ANY(%(sample)s);

-- name: staged_users
-- How many rows the staged users.csv has, for the message of a failed users-kept check.
SELECT count(*) FROM staging.users;
