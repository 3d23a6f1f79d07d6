"""What publishing reads of the months already published: a backfill looks at each later
month's users once, not once per live table."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest
from conftest import scalar
from month_files import AS_OF, ok, small_months

JAN, FEB = AS_OF["month_000"], AS_OF["month_001"]
USERS = 200


@pytest.fixture(scope="module")
def months(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_months(tmp_path_factory.mktemp("cost"), users=USERS)


def rows_read(url: str, table: str) -> int:
    """Rows read from ``table`` so far, by sequential scans and index fetches."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables "
            "WHERE relid = %s::regclass",
            (table,),
        ).fetchone()
    assert row is not None
    return row[0]


def settled_rows_read(url: str, table: str, before: int, wait: float = 10) -> int:
    """``rows_read`` once the run's backends have reported their counts (at their exit,
    shortly after the run ends): it has moved, then stays put for a second."""
    deadline = time.monotonic() + wait
    last, since = rows_read(url, table), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = rows_read(url, table)
        if now != last:
            last, since = now, time.monotonic()
        elif last != before and time.monotonic() - since >= 1:
            break
    return last


def test_a_backfill_reads_each_later_month_once(run_flow, db_url, months):
    """January backfilled after February: which of its users February lists is one
    anti-join against February's labels, shared by the six live tables (it was one per
    table: six times the later months' rows, about 2 s each already at 200k users and 24
    later months, docs/performance.md item 40)."""
    ok(run_flow(db_url, months / "month_001", FEB))
    february = scalar(
        db_url,
        "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'labels_snapshots'::regclass",
    )
    before = rows_read(db_url, str(february))

    ok(run_flow(db_url, months / "month_000", JAN))

    read = settled_rows_read(db_url, str(february), before) - before
    assert 0 < read <= USERS, f"{read} rows of February's labels read for {USERS} users"
    assert scalar(db_url, "SELECT count(*) FROM labels_snapshots WHERE as_of = %s", (JAN,)) == USERS
