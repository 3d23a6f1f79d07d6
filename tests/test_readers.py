"""What the feature store and training jobs reading the database see while months are
published: a month whole or not at all, and no wait of theirs stalls a run."""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

import psycopg
import pytest
from month_files import AS_OF, ok, small_months
from streamflow.registry import SNAPSHOT_TABLES

JAN, FEB = AS_OF["month_000"], AS_OF["month_001"]
JAN_MISSING_FROM_HISTORY = (
    "ingest failed: published months missing from history: labels_snapshots 2024-01-31 "
    "(a partition detached or dropped by hand?); nothing was run: attach the month's "
    "partition back to its history table, or restore the database"
)


def not_listed(shown: str) -> str:
    """The CLI's refusal of history months the ledger does not list, ``shown`` named."""
    return (
        f"ingest failed: months in history that the ledger (ingest_months) does not list: "
        f"{shown} (rows deleted by hand, or a restore that stopped part-way?); nothing was "
        "run: restore the database whole (docs/stack.md, 'Backup and restore')"
    )


@pytest.fixture(scope="module")
def months(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_months(tmp_path_factory.mktemp("small"))


def test_a_repeatable_read_reader_sees_a_month_whole_or_not_at_all(
    run_flow, db_url, months, monkeypatch
):
    """A training job reads history in one REPEATABLE READ transaction that began while a
    month was being published. The history rows were committed in staging by their own
    transaction before the publish, and PostgreSQL reads the partitions of a table from
    its catalogue, not from the reader's snapshot: once attached, the month showed up
    in every history table, though ingest_months and live did not list it (consumer
    audit). The month's rows are now written by the publishing transaction."""
    from streamflow import ledger

    ok(run_flow(db_url, months / "month_000", JAN))
    reader = psycopg.connect(db_url)
    reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    real = ledger.record_month

    def then_a_reader_starts(conn, *args, **kwargs):
        real(conn, *args, **kwargs)  # the month is written, waiting for its verdict
        reader.execute("SELECT count(*) FROM ingest_months")  # the snapshot is taken here

    monkeypatch.setattr(ledger, "record_month", then_a_reader_starts)
    with reader:
        ok(run_flow(db_url, months / "month_001", FEB))
        listed = reader.execute("SELECT as_of::text FROM ingest_months").fetchall()
        seen = {
            table: reader.execute(
                f"SELECT DISTINCT as_of::text FROM {table} ORDER BY 1"  # noqa: S608
            ).fetchall()
            for table in SNAPSHOT_TABLES
        }
        reader.rollback()
        assert listed == [(JAN,)]
        assert seen == {table: [(JAN,)] for table in SNAPSHOT_TABLES}, seen
        after = reader.execute("SELECT count(DISTINCT as_of) FROM labels_snapshots").fetchone()
        assert after == (2,)


def test_a_reader_holding_an_empty_table_does_not_stall_the_first_month(run_flow, db_url, months):
    """A first load drops the empty child tables' keys to append, which needs an exclusive
    lock: a reader holding one of them (a long report, LOCK TABLE ... IN ACCESS SHARE
    MODE) stalled the run for as long as it held it, and every reader after it queued
    behind the run's lock request (consumer audit). The run now appends into the keyed
    table instead; here the reader lets go only after 60 s, if the run is still waiting."""
    reader = psycopg.connect(db_url)
    reader.execute("LOCK TABLE labels IN ACCESS SHARE MODE")
    done = threading.Event()
    released = []

    def let_go_after_a_minute() -> None:
        if not done.wait(60):
            released.append("the run waited for the reader")
            reader.rollback()

    watchdog = threading.Thread(target=let_go_after_a_minute)
    watchdog.start()
    try:
        ok(run_flow(db_url, months / "month_000", JAN))
    finally:
        done.set()
        watchdog.join()
    assert released == []
    reader.rollback()  # the reader's lock was held throughout the run
    with reader:
        users = reader.execute("SELECT count(*) FROM users").fetchone()[0]
        assert reader.execute("SELECT count(*) FROM labels").fetchone()[0] == users > 0
        keyed = reader.execute(
            "SELECT count(*) FROM pg_constraint WHERE conrelid = 'labels'::regclass "
            "AND contype = 'p'"
        ).fetchone()
        assert keyed == (1,)


def every_run_refused(
    run_flow, db_url: str, months: Path, unchanged: str, folders: tuple[str, ...], refused: str
) -> None:
    """The CLI's unchanged check (before Prefect starts) of the published month
    ``unchanged`` raises, no "nothing to do"; each month of ``folders`` is refused with
    ``refused`` as the CLI's last line."""
    from streamflow import rerun
    from streamflow.errors import HistoryIncomplete

    with pytest.raises(HistoryIncomplete):
        rerun.unchanged_month(str(months / unchanged), AS_OF[unchanged])
    for folder in folders:
        rc, _, err = run_flow(db_url, months / folder, AS_OF[folder])
        assert rc == 1
        assert err.strip().splitlines()[-1] == refused


def test_a_month_missing_from_history_stops_the_next_run(run_flow, db_url, months):
    """A history partition detached by hand: the next month published with exit 0 while
    January read as empty in labels_snapshots, and a --replace of January failed with
    "unexpected CheckViolation" (operator audit). No run goes on until it is back, not
    even an unchanged rerun (it answered "nothing to do", exit 0: docs audit), and each
    refusal is a row of the ledger like any other."""

    ok(run_flow(db_url, months / "month_000", JAN))
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute("ALTER TABLE labels_snapshots DETACH PARTITION labels_snapshots_20240131")

    refused = JAN_MISSING_FROM_HISTORY
    every_run_refused(run_flow, db_url, months, "month_000", ("month_001", "month_000"), refused)
    with psycopg.connect(db_url, autocommit=True) as admin:
        assert admin.execute("SELECT count(*) FROM ingest_months").fetchone() == (1,)
        runs = admin.execute(
            "SELECT as_of::text, mode, status, error FROM ingest_runs ORDER BY run_id"
        ).fetchall()
        assert [r[:3] for r in runs] == [
            (JAN, "publish", "succeeded"),
            (FEB, "refused", "failed"),
            (JAN, "refused", "failed"),
        ]
        assert runs[1][3] == runs[2][3] == refused.removeprefix("ingest failed: ")
        admin.execute(
            "ALTER TABLE labels_snapshots ATTACH PARTITION labels_snapshots_20240131 "
            "FOR VALUES IN ('2024-01-31')"
        )
    ok(run_flow(db_url, months / "month_001", FEB))


def test_a_missing_month_is_found_among_other_months_and_by_bounds_not_name(
    run_flow, db_url, months
):
    """Partitions are found by their bounds: one renamed by hand is still the month,
    and a month detached while another remains is missing (with one month published,
    "missing" and "no partition at all" looked alike: mutation audit). A --replace of
    the missing month is refused, not failed with "no partition of relation ... found"."""
    ok(run_flow(db_url, months / "month_000", JAN))
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute("ALTER TABLE labels_snapshots_20240131 RENAME TO labels_jan_restored")
    ok(run_flow(db_url, months / "month_001", FEB))
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute("ALTER TABLE labels_snapshots DETACH PARTITION labels_jan_restored")

    rc, _, err = run_flow(db_url, months / "month_000", JAN, "--replace")

    assert rc == 1
    assert err.strip().splitlines()[-1] == JAN_MISSING_FROM_HISTORY, err[-2000:]
    with psycopg.connect(db_url) as conn:
        last = conn.execute(
            "SELECT as_of::text, mode, status FROM ingest_runs ORDER BY run_id DESC LIMIT 1"
        ).fetchone()
    assert last == (JAN, "refused", "failed")


def test_a_session_holding_a_staging_table_does_not_stall_a_published_run(
    run_flow, db_url, months, monkeypatch, caplog
):
    """Someone looks at staging with SQL (the README invites it for a refused month) and
    holds a table when the run empties it: the emptying gives up after its lock_timeout,
    with a warning, instead of holding the writer lock, and every run after it, for as
    long as that session does (mutation audit)."""
    import logging

    from streamflow import loading

    holder = psycopg.connect(db_url)
    released: list[str] = []
    done = threading.Event()
    real_empty = loading.empty_staging

    def held_then_emptied(conn: psycopg.Connection) -> None:
        holder.execute("LOCK TABLE staging.labels IN ACCESS SHARE MODE")

        def let_go() -> None:
            if not done.wait(40):
                released.append("the run waited for the session")
                holder.rollback()

        threading.Thread(target=let_go, daemon=True).start()
        return real_empty(conn)

    monkeypatch.setattr(loading, "empty_staging", held_then_emptied)
    try:
        with caplog.at_level(logging.WARNING):
            ok(run_flow(db_url, months / "month_000", JAN))
    finally:
        done.set()
        holder.rollback()
        holder.close()
    assert released == []
    assert "staging not emptied" in caplog.text


def test_a_month_in_history_the_ledger_does_not_list_stops_the_next_run(run_flow, db_url, months):
    """ingest_months lost January's row while its partitions stayed (a plain pg_restore
    into an initialised database left ingest_months empty behind foreign-key errors:
    backup audit): the rerun rules, which read the ledger, took January for a month never
    published (here a backfill; with February's row gone too, as after that restore, the
    latest, over February's live values). No run goes on, not even an unchanged rerun."""

    ok(run_flow(db_url, months / "month_000", JAN))
    ok(run_flow(db_url, months / "month_001", FEB))
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute("DELETE FROM ingest_months WHERE as_of = %s", (JAN,))
        live_before = admin.execute("SELECT * FROM labels ORDER BY user_id").fetchall()
    refused = not_listed(
        "labels_snapshots 2024-01-31, payments_agg_90d_snapshots 2024-01-31, "
        "subscriptions_profile_snapshots 2024-01-31, support_agg_90d_snapshots 2024-01-31, "
        "usage_agg_30d_snapshots 2024-01-31"
    )
    every_run_refused(run_flow, db_url, months, "month_001", ("month_000", "month_001"), refused)
    with psycopg.connect(db_url) as admin:
        assert admin.execute("SELECT * FROM labels ORDER BY user_id").fetchall() == live_before


def test_a_partition_of_no_one_month_and_a_missing_month_are_both_found(run_flow, db_url, months):
    """Both directions of the history check in one database: a DEFAULT partition
    attached by hand (no month of its own) and a month detached. The detached month is
    named first (attaching it back is the first repair); once it is back, the DEFAULT
    partition still stops every run, as "(not one month)"."""
    ok(run_flow(db_url, months / "month_000", JAN))
    ok(run_flow(db_url, months / "month_001", FEB))
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute("CREATE TABLE usage_by_hand PARTITION OF usage_agg_30d_snapshots DEFAULT")
        admin.execute("ALTER TABLE labels_snapshots DETACH PARTITION labels_snapshots_20240131")

    rc, _, err = run_flow(db_url, months / "month_001", FEB)
    assert rc == 1
    assert err.strip().splitlines()[-1] == JAN_MISSING_FROM_HISTORY, err[-2000:]

    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute(
            "ALTER TABLE labels_snapshots ATTACH PARTITION labels_snapshots_20240131 "
            "FOR VALUES IN ('2024-01-31')"
        )
    every_run_refused(
        run_flow,
        db_url,
        months,
        "month_001",
        ("month_001",),
        not_listed("usage_agg_30d_snapshots (not one month)"),
    )


def test_a_run_waiting_for_a_dump_says_who_it_waits_for(run_flow, db_url, months, caplog):
    """A pg_dump holds a lock on every table it dumps, staging's too, until the whole
    dump ends: a run started meanwhile waited at its first TRUNCATE without a word for as
    long as the dump ran (backup audit), and looked hung. It now names the holder after a
    few seconds, then waits; here the "dump" lets go after 8 s and the month publishes."""
    ok(run_flow(db_url, months / "month_000", JAN))  # Prefect's logging set up, for caplog
    dump = psycopg.connect(db_url, application_name="pg_dump")
    dump.execute("LOCK TABLE staging.users IN ACCESS SHARE MODE")
    pid = dump.info.backend_pid
    let_go = threading.Timer(8, dump.rollback)
    let_go.start()
    try:
        with caplog.at_level(logging.WARNING):
            ok(run_flow(db_url, months / "month_001", FEB))
    finally:
        let_go.cancel()
        dump.close()
    said = [r.getMessage() for r in caplog.records if "waiting for staging" in r.getMessage()]
    # The run's own GX process may hold the table too, for as long as its first look at
    # it takes (CI, on a loaded machine: "pid 5078 (pg_dump), pid 5103 (postgres)").
    others = r"(pid \d+ \(postgres\), )*"
    assert len(said) == 1, said
    assert re.fullmatch(
        rf"users\.csv: waiting for staging\.users, held by {others}pid {pid} \(pg_dump\)"
        r"(, pid \d+ \(postgres\))* \(a pg_dump holds each table it dumps until it ends\); "
        r"the run goes on when it lets go",
        said[0],
    ), said
