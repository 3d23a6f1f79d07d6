-- Publishing a validated month: live upserts and as_of snapshots, run together in
-- one transaction by streamflow.publishing. {placeholders} are registry identifiers.

-- name: upsert_live
-- Only rows whose values changed are rewritten (IS DISTINCT FROM treats NULLs as
-- values); xmax = 0 on a returned row means it was inserted, not updated.
WITH written AS (
    INSERT INTO {live} AS live ({columns})
    SELECT {columns} FROM {staged}
    ON CONFLICT (user_id) DO UPDATE
        SET ({value_columns}) = ROW({excluded_values})
        WHERE ({live_values}) IS DISTINCT FROM ({excluded_values})
    RETURNING (xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted)     AS inserted,
       count(*) FILTER (WHERE NOT inserted) AS updated
FROM written;

-- name: drop_vanished_snapshots
-- Only matters with --replace: users absent from the new files leave that month.
DELETE FROM {history} AS h
WHERE h.as_of = %(as_of)s
  AND NOT EXISTS (SELECT 1 FROM {staged} AS s WHERE s.user_id = h.user_id);

-- name: snapshot
WITH written AS (
    INSERT INTO {history} AS h (user_id, as_of, {columns})
    SELECT user_id, %(as_of)s, {columns} FROM {staged}
    ON CONFLICT (user_id, as_of) DO UPDATE
        SET ({columns}) = ROW({excluded_values})
        WHERE ({history_values}) IS DISTINCT FROM ({excluded_values})
    RETURNING (xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted)     AS inserted,
       count(*) FILTER (WHERE NOT inserted) AS updated
FROM written;

-- name: staged_rows
SELECT count(*) FROM {staged};
