"""Several flow processes at once: one writer at a time (the advisory lock), the others
wait and then publish, backfill or no-op; a writer that cannot get the lock in time
says so in one line and changes nothing.

Each process is the real CLI (``python services/prefect/ingest_flow.py``) with its own
PREFECT_HOME, talking to one ``prefect server`` started for this module (as the
deployed runner does), so no process spends 10-20 s starting a temporary server.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import ALL_TABLES, DATA_TABLES, dump, with_database
from month_files import (
    AS_OF,
    end_writer_lock_holder,
    flow_command,
    flow_env,
    migrated_prefect_home,
    prefect_server,
    small_months,
)
from streamflow.locking import LOCK_KEY
from streamflow.registry import SNAPSHOT_TABLES

JAN, FEB = AS_OF["month_000"], AS_OF["month_001"]
APP = "streamflow-ingest"  # application_name of the flow's connections
TIMEOUT = 300


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with prefect_server(migrated_prefect_home(tmp_path_factory.mktemp("prefect_server"))) as api:
        yield api


@pytest.fixture(scope="module")
def months(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_months(tmp_path_factory.mktemp("small"))


def start(
    url: str, seed_dir: Path, as_of: str, home: Path, api: str, **env: str
) -> subprocess.Popen:
    home.mkdir(parents=True)
    return subprocess.Popen(
        flow_command(seed_dir, as_of),
        env=flow_env(
            url,
            PREFECT_HOME=str(home),
            PREFECT_API_URL=api,
            GX_DOCS_DIR=str(home / "gx_docs"),
            **env,
        ),
        cwd=home,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def wait_for_connections(url: str, n: int, deadline: float) -> None:
    """Until ``n`` flow processes have opened their control connection.

    Before it holds the lock a flow process has exactly one connection open.
    """
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            count = conn.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = %s",
                (APP,),
            ).fetchone()[0]
            if count >= n:
                return
            assert time.monotonic() < deadline, f"only {count} of {n} flow processes connected"
            time.sleep(0.2)


def ledger(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT as_of::text, status, mode, started_at, finished_at FROM ingest_runs "
            "ORDER BY started_at"
        ).fetchall()


def test_three_writers_at_once_publish_one_after_the_other(
    db_url, months, tmp_path, run_flow, pg_admin_url, prefect_api
):
    """January twice and February, started together while the lock is held elsewhere."""
    jan, feb = months / "month_000", months / "month_001"
    with psycopg.connect(db_url, autocommit=True) as holder:
        # Hold the lock until all three are waiting on it, so they really contend.
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        procs = [
            start(db_url, jan, JAN, tmp_path / "a", prefect_api),
            start(db_url, feb, FEB, tmp_path / "b", prefect_api),
            start(db_url, jan, JAN, tmp_path / "c", prefect_api),
        ]
        try:
            wait_for_connections(db_url, 3, time.monotonic() + TIMEOUT)
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
        results = [finish(p) for p in procs]

    for rc, _out, err in results:
        assert rc == 0, err[-3000:]
    runs = ledger(db_url)
    assert sorted((r[0], r[1]) for r in runs) == [
        (JAN, "noop"),
        (JAN, "succeeded"),
        (FEB, "succeeded"),
    ]
    # One writer at a time: no two runs' [start, finish] overlap.
    for earlier, later in zip(runs, runs[1:], strict=False):
        assert earlier[4] <= later[3], (earlier, later)
    # Whatever order they got the lock in, the result is the calendar-order database.
    reference = _reference(pg_admin_url, run_flow, jan, feb)
    assert dump(db_url, DATA_TABLES) == reference
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM ingest_months").fetchone()[0] == 2
        for table in SNAPSHOT_TABLES:
            per_month = conn.execute(
                f'SELECT as_of::text, count(*), count(DISTINCT user_id) FROM "{table}" GROUP BY 1'  # noqa: S608
            ).fetchall()
            assert sorted(per_month) == [(JAN, 200, 200), (FEB, 200, 200)], table


def _reference(admin_url: str, run_flow, jan: Path, feb: Path) -> dict[str, list[tuple]]:
    name = f"sf_conc_ref_{os.getpid()}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_database(admin_url, name)
    try:
        assert run_flow(url, jan, JAN)[0] == 0
        assert run_flow(url, feb, FEB)[0] == 0
        return dump(url, DATA_TABLES)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_lock_wait_timeout_says_another_ingestion_is_running(db_url, months, tmp_path, prefect_api):
    before = dump(db_url, ALL_TABLES)
    with psycopg.connect(db_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        holder_pid = holder.execute("SELECT pg_backend_pid()").fetchone()[0]
        started = time.monotonic()
        rc, out, err = finish(
            start(
                db_url,
                months / "month_000",
                JAN,
                tmp_path / "p",
                prefect_api,
                LOCK_WAIT_SECONDS="1",
            )
        )
        elapsed = time.monotonic() - started

    assert rc != 0
    message = err.strip().splitlines()[-1]
    assert message.startswith("ingest failed: another ingestion is running"), err[-3000:]
    assert f"pid {holder_pid}" in message and "LOCK_WAIT_SECONDS" in message
    assert elapsed < TIMEOUT
    assert dump(db_url, ALL_TABLES) == before
    assert ledger(db_url) == []


def test_a_run_waiting_for_the_lock_names_the_run_that_holds_it(db_url):
    """The wait and the timeout name the holder's run (its ledger row: run, month,
    folder, flow run), not only a backend pid, which nothing else shows an operator; a
    dead run's row still marked running is not taken for it."""
    import uuid
    from datetime import date

    from streamflow import ledger as ledger_rows
    from streamflow.errors import LockTimeout
    from streamflow.locking import writer_lock

    with psycopg.connect(db_url, autocommit=True) as conn:
        # A run killed before it could record its outcome, before the holder started.
        conn.execute(
            "INSERT INTO ingest_runs (as_of, seed_dir, status, started_at) "
            "VALUES ('2023-12-31', '/seeds/dead', 'running', now() - interval '1 hour')"
        )
    flow_run = str(uuid.uuid4())
    with psycopg.connect(db_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        holder_pid = holder.execute("SELECT pg_backend_pid()").fetchone()[0]
        told: list[str] = []
        with psycopg.connect(db_url, autocommit=True) as waiter:
            # Before the holder opens its row: only its pid is known.
            with pytest.raises(LockTimeout) as early, writer_lock(waiter, 0.3):
                pass
            run_id = ledger_rows.start_run(
                holder,
                as_of=date(2024, 1, 31),
                seed_dir="/seeds/month_000",
                status="running",
                mode="new",
                fingerprint=None,
                files=None,
                flow_run_id=flow_run,
            )
            with pytest.raises(LockTimeout) as late, writer_lock(waiter, 0.3, told.append):
                pass
            # The ledger held by DDL (an upgrade's init script holds it to its end): the
            # lookup gives up at once and leaves the pid; the wait is not a crash, nor
            # held up. (The waiter's own statement_timeout stops the old lookup's wait.)
            with psycopg.connect(db_url) as upgrade:
                upgrade.execute("LOCK TABLE ingest_runs IN ACCESS EXCLUSIVE MODE")
                waiter.execute("SET statement_timeout = '20s'")
                started = time.monotonic()
                with pytest.raises(LockTimeout) as blocked, writer_lock(waiter, 0.3, told.append):
                    pass
                looked = time.monotonic() - started
                # The lookups' bounds ended with them: the waiter is as it was.
                assert waiter.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                assert waiter.execute("SHOW statement_timeout").fetchone() == ("20s",)
                assert waiter.execute("SHOW lock_timeout").fetchone() == ("0",)

    assert str(early.value).startswith(
        f"another ingestion is running (held by backend pid {holder_pid});"
    )
    assert "/seeds/dead" not in str(early.value)
    for message in (str(late.value), told[0]):
        assert f"(run {run_id}: as_of 2024-01-31 from /seeds/month_000, started " in message
        assert f" UTC, flow run {flow_run}; backend pid {holder_pid})" in message
        assert "/seeds/dead" not in message
    assert told[0].endswith("waiting for it, up to 0.3s (LOCK_WAIT_SECONDS)")
    assert "waited 0.3s for it (set LOCK_WAIT_SECONDS to wait longer)" in str(late.value)
    assert str(blocked.value).startswith(
        f"another ingestion is running (held by backend pid {holder_pid});"
    )
    assert told[1].startswith(f"another ingestion is running (held by backend pid {holder_pid}):")
    assert looked < 10, looked


def test_the_early_noop_check_does_not_wait_for_the_lock(db_url, months, monkeypatch):
    """The CLI's look for an unchanged month, before Prefect starts, gives way at once
    to a running ingestion: the flow then waits LOCK_WAIT_SECONDS, once (it waited
    twice, the first time without a word)."""
    from streamflow import rerun
    from streamflow.errors import LockTimeout

    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("LOCK_WAIT_SECONDS", "8")
    with psycopg.connect(db_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        started = time.monotonic()
        with pytest.raises(LockTimeout) as err:
            rerun.unchanged_month(str(months / "month_000"), JAN)
        elapsed = time.monotonic() - started

    assert elapsed < 4, elapsed
    assert "waited 0s" in str(err.value)
    assert ledger(db_url) == []


@pytest.mark.parametrize("when", ["staging", "validation"])
def test_a_run_that_loses_its_writer_lock_publishes_nothing(
    run_flow, db_url, months, monkeypatch, when
):
    """The lock is a session lock of the run's control connection: if that connection
    ends (network cut, idle_session_timeout, pg_terminate_backend), the lock goes with
    it and a waiting run takes it and rewrites staging. The audit had a second run's
    January published as February that way. The run must notice before any commit:
    here its control backend is terminated while it stages (the COPY's commit checks)
    or validates (the publishing transaction checks, while waiting and before its
    COMMIT); nothing is published either way."""
    from streamflow import loading, outcomes

    assert run_flow(db_url, months / "month_000", JAN)[0] == 0
    before = dump(db_url)

    if when == "staging":
        real_stage = loading.stage_file
        first = threading.Lock()  # two files are staged at once: cut once

        def stage_then_cut(*args, **kwargs):
            if first.acquire(blocking=False):
                end_writer_lock_holder(db_url)
            return real_stage(*args, **kwargs)

        monkeypatch.setattr(loading, "stage_file", stage_then_cut)
    else:
        real_check = outcomes.check

        def check_after_cut(found):
            end_writer_lock_holder(db_url)
            return real_check(found)

        monkeypatch.setattr(outcomes, "check", check_after_cut)

    rc, _, err = run_flow(db_url, months / "month_001", FEB)

    assert rc == 1
    last = err.strip().splitlines()[-1]
    # Not "another run may be writing the staging tables" when none does (operator
    # audit: a server restart read as a concurrent run).
    assert last == (
        "ingest failed: the run lost the pipeline's writer lock (its control connection to "
        "PostgreSQL ended: a server restart, a network cut, idle_session_timeout or "
        "pg_terminate_backend); no other run holds it; nothing of this run was published: "
        "rerun it"
    ), err[-2000:]
    # Recorded on a new connection: the row stayed "running" until the next run marked
    # it abandoned, without this reason (operator audit).
    with psycopg.connect(db_url) as conn:
        status, error, finished, timings = conn.execute(
            "SELECT status, error, finished_at IS NOT NULL, timings FROM ingest_runs "
            "ORDER BY run_id DESC LIMIT 1"
        ).fetchone()
    assert (status, "ingest failed: " + error, finished) == ("failed", last, True)
    assert dump(db_url) == before
    # Stopped where the lock was found lost: by the COPY's own check, before validation
    # (the publisher's check would say the same, later: mutation audit).
    assert ("validate_with_ge" in timings) is (when == "validation"), timings


def test_a_writer_lock_held_by_another_session_is_not_the_runs(db_url, months):
    """Before each commit a run checks that its own control backend still holds the
    writer lock: the lock held by someone else (the run that took it once this one's
    went with its connection) must not pass for it. Staging's COPY then commits
    nothing."""
    from streamflow import loading, locking
    from streamflow.errors import LockLost
    from streamflow.registry import BY_NAME

    labels = BY_NAME["labels"]
    staged_rows = "SELECT user_id, churn_label FROM staging.labels ORDER BY user_id"
    with (
        psycopg.connect(db_url, autocommit=True) as other,
        psycopg.connect(db_url, autocommit=True) as control,
        psycopg.connect(db_url) as work,
    ):
        mine = control.info.backend_pid
        loading.stage_file(work, labels, months / "month_000" / "labels.csv")
        before = work.execute(staged_rows).fetchall()
        work.commit()
        assert before
        with locking.writer_lock(other, 0):
            with pytest.raises(LockLost) as lost:
                locking.check_writer_lock(control, mine)
            taken = f"another session (pid {other.info.backend_pid}) holds it now"
            assert taken in str(lost.value)

            with pytest.raises(LockLost):
                loading.stage_file(
                    work, labels, months / "month_001" / "labels.csv", lock_holder=mine
                )
            work.rollback()
            assert work.execute(staged_rows).fetchall() == before
            work.commit()

        with locking.writer_lock(control, 0):  # its own lock: the check passes
            locking.check_writer_lock(control, mine)


def test_a_lock_timeout_names_the_holder_in_this_database(db_url, empty_db_url):
    """Advisory locks are per database: a pipeline in another database of the server
    holds its own. The timeout named the first holder of the key anywhere on the server
    (the other database's session) instead of the one this run waited for."""
    from streamflow import locking
    from streamflow.errors import LockTimeout

    with (
        psycopg.connect(empty_db_url, autocommit=True) as elsewhere,
        psycopg.connect(db_url, autocommit=True) as here,
        psycopg.connect(db_url, autocommit=True) as waiting,
    ):
        elsewhere.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        here.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        holder = here.info.backend_pid
        with pytest.raises(LockTimeout) as err:
            with locking.writer_lock(waiting, 0):
                pass

    assert f"held by backend pid {holder})" in str(err.value)


@pytest.mark.slow
def test_a_prefect_api_lost_mid_run_leaves_the_run_its_own_outcome(db_url, months, tmp_path):
    """Prefect's server killed while the month is being published: the month lands and
    the ledger says succeeded, but the CLI said 'ingest failed: unexpected ConnectError'
    (exit 1), after Prefect's 'Error logging to API' below its last line. It now prints
    the run's own line, exit 0, and a warning that the UI's state is not the outcome.
    Publishing is held by a reader's SHARE lock on users until the server is gone."""
    migrated_prefect_home(tmp_path / "server")
    with psycopg.connect(db_url) as reader:
        reader.execute("LOCK TABLE users IN SHARE MODE")
        with prefect_server(tmp_path / "server") as api:
            proc = start(
                db_url,
                months / "month_000",
                JAN,
                tmp_path / "home",
                api,
                PREFECT_CLIENT_MAX_RETRIES="0",  # Prefect's own retries take minutes
            )
            deadline = time.monotonic() + TIMEOUT
            while not _waits_for_a_lock(db_url):
                assert proc.poll() is None, finish(proc)
                assert time.monotonic() < deadline
                time.sleep(0.2)
        reader.rollback()  # the server is gone: the month may be published now
        rc, out, err = finish(proc)

    assert ledger(db_url)[-1][1:3] == ("succeeded", "publish"), ledger(db_url)
    assert rc == 0, err[-3000:]
    assert "published live + history" in out.splitlines()[0], out
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"warning: Prefect's API ({api}) stopped answering during the run")
    assert last.endswith("the run's state in the Prefect UI is not its outcome, ingest_runs has it")


def _waits_for_a_lock(url: str) -> bool:
    with psycopg.connect(url) as conn:
        waiting = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
            "AND wait_event_type = 'Lock'",
            (APP,),
        ).fetchone()
    return bool(waiting and waiting[0])


def test_a_run_waiting_for_the_lock_says_so_once(db_url):
    """A run waiting for another's writer lock (up to LOCK_WAIT_SECONDS, 10 minutes by
    default) showed 'Running' with no log line at all."""
    from streamflow import locking
    from streamflow.errors import LockTimeout

    said: list[str] = []
    with (
        psycopg.connect(db_url, autocommit=True) as holder,
        psycopg.connect(db_url, autocommit=True) as waiting,
    ):
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        pid = holder.info.backend_pid
        with pytest.raises(LockTimeout), locking.writer_lock(waiting, 1.0, said.append):
            pass

    assert said == [
        f"another ingestion is running (held by backend pid {pid}): waiting for it, up to 1s "
        "(LOCK_WAIT_SECONDS)"
    ]
