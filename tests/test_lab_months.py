"""The real lab export files, through the real flow, on a real PostgreSQL."""

from __future__ import annotations

import csv
import shutil
from decimal import Decimal
from pathlib import Path

import psycopg
from conftest import ALL_TABLES, dump, scalar
from streamflow.registry import LIVE_TABLES, SNAPSHOT_TABLES


def _ingest_both(run_flow, url: str, seeds: Path) -> None:
    rc, out, err = run_flow(url, seeds / "month_000", "2024-01-31")
    assert rc == 0, err
    rc, out, err = run_flow(url, seeds / "month_001", "2024-02-29")
    assert rc == 0, err


def test_month_000_lands_with_nulls_kept(run_flow, db_url, shared_seeds):
    rc, out, err = run_flow(db_url, shared_seeds / "month_000", "2024-01-31")
    assert rc == 0, err
    assert "published live + history" in out
    assert scalar(db_url, "SELECT count(*) FROM users") == 7043
    assert scalar(db_url, "SELECT count(*) FROM subscriptions") == 7043
    # Empty cells stay NULL: no implicit "True" for users without a net service.
    assert scalar(db_url, "SELECT count(*) FROM subscriptions WHERE plan_stream_tv IS NULL") == 1526
    assert (
        scalar(db_url, "SELECT count(*) FROM subscriptions WHERE plan_stream_movies IS NULL")
        == 1526
    )
    assert (
        scalar(db_url, "SELECT count(*) FROM subscriptions WHERE add_on_security IS NOT NULL") == 0
    )
    assert scalar(db_url, "SELECT count(*) FROM subscriptions WHERE months_active = 0") == 11
    for table in SNAPSHOT_TABLES:
        assert (
            scalar(db_url, f'SELECT count(*) FROM "{table}" WHERE as_of = %s', ("2024-01-31",))  # noqa: S608
            == 7043
        )
    # user_id compares bytewise everywhere (live, staging, history and its month
    # partitions): the sorts and key indexes of a month depend on it.
    collations = dict(
        psycopg.connect(db_url)
        .execute(
            "SELECT table_schema || '.' || table_name, collation_name"
            " FROM information_schema.columns"
            " WHERE column_name = 'user_id' AND table_schema IN ('public', 'staging')"
        )
        .fetchall()
    )
    assert {f"public.{t}" for t in (*LIVE_TABLES, *SNAPSHOT_TABLES)} <= set(collations)
    assert {f"staging.{t}" for t in LIVE_TABLES} <= set(collations)
    assert any(name.endswith("_20240131") for name in collations)
    assert set(collations.values()) == {"C"}, collations
    # A first load builds the keyed tables' primary keys after the rows are in: the
    # same constraints as a fresh schema, on a valid index, foreign keys untouched.
    with psycopg.connect(db_url) as conn:
        constraints = conn.execute(
            "SELECT c.conrelid::regclass::text, c.conname,"
            "       pg_get_constraintdef(c.oid), i.indisvalid"
            " FROM pg_constraint c LEFT JOIN pg_index i ON i.indexrelid = c.conindid"
            " WHERE c.contype IN ('p', 'f') AND c.connamespace = 'public'::regnamespace"
            "   AND c.conrelid::regclass::text = ANY(%s)",
            (list(LIVE_TABLES),),
        ).fetchall()
    assert sorted(constraints) == sorted(
        [(t, f"{t}_pkey", "PRIMARY KEY (user_id)", True) for t in LIVE_TABLES]
        + [
            (t, f"{t}_user_id_fkey", "FOREIGN KEY (user_id) REFERENCES users(user_id)", True)
            for t in LIVE_TABLES
            if t != "users"
        ]
    )


def test_two_months_history_and_changes(run_flow, db_url, shared_seeds):
    _ingest_both(run_flow, db_url, shared_seeds)
    for table in SNAPSHOT_TABLES:
        counts = dict(
            psycopg_rows(db_url, f'SELECT as_of::text, count(*) FROM "{table}" GROUP BY 1')  # noqa: S608
        )
        assert counts == {"2024-01-31": 7043, "2024-02-29": 7043}, table
    churners = dict(
        psycopg_rows(
            db_url,
            "SELECT as_of::text, count(*) FROM labels_snapshots WHERE churn_label GROUP BY 1",
        )
    )
    assert churners == {"2024-01-31": 1869, "2024-02-29": 1701}
    assert scalar(db_url, "SELECT count(*) FROM labels WHERE churn_label") == 1701

    # A watch_hours_30d that changed in month_001 is the live value now.
    with (shared_seeds / "month_001" / "usage_agg_30d.csv").open() as f:
        row = next(csv.DictReader(f))
    live = scalar(
        db_url, "SELECT watch_hours_30d FROM usage_agg_30d WHERE user_id = %s", (row["user_id"],)
    )
    assert live == Decimal(row["watch_hours_30d"])
    jan = scalar(
        db_url,
        "SELECT watch_hours_30d FROM usage_agg_30d_snapshots"
        " WHERE user_id = %s AND as_of = '2024-01-31'",
        (row["user_id"],),
    )
    assert jan != live

    # The ledger saw exactly what changed between the months.
    stats = scalar(
        db_url,
        "SELECT table_stats FROM ingest_runs WHERE as_of = '2024-02-29' AND status = 'succeeded'",
    )
    by_table = {s["table"]: s for s in stats}
    assert by_table["usage_agg_30d"]["updated"] == 7043
    assert by_table["payments_agg_90d"]["updated"] == 202
    assert by_table["support_agg_90d"]["updated"] == 360
    assert by_table["labels"]["updated"] == 2652
    assert by_table["users"]["updated"] == 0 and by_table["subscriptions"]["updated"] == 0


def test_rerun_same_month_changes_nothing(run_flow, db_url, shared_seeds):
    _ingest_both(run_flow, db_url, shared_seeds)
    before = dump(db_url, ALL_TABLES)
    rc, out, err = run_flow(db_url, shared_seeds / "month_001", "2024-02-29")
    assert rc == 0, err
    assert "nothing to do" in out
    assert dump(db_url, ALL_TABLES) == before
    assert scalar(db_url, "SELECT status FROM ingest_runs ORDER BY run_id DESC LIMIT 1") == "noop"


def test_negative_watch_hours_fails_and_changes_nothing(run_flow, db_url, shared_seeds, tmp_path):
    rc, _, err = run_flow(db_url, shared_seeds / "month_000", "2024-01-31")
    assert rc == 0, err
    bad = tmp_path / "month_001"
    # The lab's files may be read-only (they are here): the copies must not be.
    shutil.copytree(shared_seeds / "month_001", bad, copy_function=shutil.copyfile)
    path = bad / "usage_agg_30d.csv"
    lines = path.read_text().splitlines(keepends=True)
    fields = lines[100].split(",")
    fields[1] = "-3.5"
    lines[100] = ",".join(fields)
    path.write_text("".join(lines))
    before = dump(db_url)
    rc, out, err = run_flow(db_url, bad, "2024-02-29")
    assert rc == 1
    message = err.strip().splitlines()[-1]
    assert "usage_agg_30d.csv" in message and "watch_hours_30d" in message and "-3.5" in message
    assert dump(db_url) == before
    assert scalar(db_url, "SELECT status FROM ingest_runs ORDER BY run_id DESC LIMIT 1") == "failed"


def psycopg_rows(url: str, query: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchall()  # type: ignore[arg-type]
