-- Verification queries printed by `python -m streamflow.verify` (and quoted in the report).
-- Each can be pasted into psql as is.

-- name: live_tables
-- In the files' order: a UNION ALL alone has none (a parallel plan printed users last).
SELECT table_name, row_count
FROM (SELECT 1 AS n, 'users' AS table_name, count(*) AS row_count FROM users
      UNION ALL SELECT 2, 'subscriptions', count(*) FROM subscriptions
      UNION ALL SELECT 3, 'usage_agg_30d', count(*) FROM usage_agg_30d
      UNION ALL SELECT 4, 'payments_agg_90d', count(*) FROM payments_agg_90d
      UNION ALL SELECT 5, 'support_agg_90d', count(*) FROM support_agg_90d
      UNION ALL SELECT 6, 'labels', count(*) FROM labels) AS live
ORDER BY n;

-- name: snapshots_by_as_of
SELECT as_of,
       (SELECT count(*) FROM subscriptions_profile_snapshots s WHERE s.as_of = m.as_of) AS subscriptions_profile,
       (SELECT count(*) FROM usage_agg_30d_snapshots s WHERE s.as_of = m.as_of) AS usage_agg_30d,
       (SELECT count(*) FROM payments_agg_90d_snapshots s WHERE s.as_of = m.as_of) AS payments_agg_90d,
       (SELECT count(*) FROM support_agg_90d_snapshots s WHERE s.as_of = m.as_of) AS support_agg_90d,
       (SELECT count(*) FROM labels_snapshots s WHERE s.as_of = m.as_of) AS labels,
       (SELECT count(*) FROM labels_snapshots s WHERE s.as_of = m.as_of AND s.churn_label) AS churners
FROM ingest_months m
ORDER BY as_of;

-- name: null_plan_flags
SELECT count(*) FILTER (WHERE plan_stream_tv IS NULL) AS plan_stream_tv_null,
       count(*) FILTER (WHERE plan_stream_movies IS NULL) AS plan_stream_movies_null
FROM subscriptions;

-- name: ledger
-- A failed run says why in one line (the whole text is in ingest_runs.error).
SELECT run_id, as_of, status, mode,
       coalesce(round(extract(epoch FROM finished_at - started_at)::numeric, 3) || ' s',
                '-') AS duration,  -- an abandoned run's end is not known
       CASE WHEN length(split_part(error, E'\n', 1)) > 100
            THEN left(split_part(error, E'\n', 1), 99) || '…'
            ELSE coalesce(split_part(error, E'\n', 1), '')
       END AS error
FROM ingest_runs
ORDER BY run_id;
