"""A server out of disk, memory or a limit on either: the run says so in words, keeps
its own error, and nothing already published changes (a resource audit filled a
tmpfs under PostgreSQL's data, capped its file sizes, used up its connections and set
temp_file_limit; these are the cases it found said badly)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import psycopg
import pytest
from conftest import scalar, with_database
from month_files import AS_OF, ok, read_rows, small_months, table_digests, write_rows
from psycopg import sql
from streamflow.diagnosis import explain_failure

JAN, FEB = AS_OF["month_000"], AS_OF["month_001"]
_names = count()


@pytest.fixture(scope="module")
def months(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_months(tmp_path_factory.mktemp("small"))


def raised(url: str, statement: str) -> psycopg.Error:
    """The error PostgreSQL raises for ``statement``, as the driver gives it."""
    with psycopg.connect(url) as conn, pytest.raises(psycopg.Error) as caught:
        conn.execute(statement)  # type: ignore[arg-type]
    return caught.value


def raise_as_server(errcode: str, message: str, hint: str | None = None) -> str:
    """A DO block raising ``message`` with SQLSTATE ``errcode``: the server's own error
    class and fields, for conditions a test cannot bring about on demand."""
    using = f"ERRCODE = '{errcode}'" + (f", HINT = '{hint}'" if hint else "")
    return f"DO $$ BEGIN RAISE EXCEPTION '{message}' USING {using}; END $$"


@pytest.mark.parametrize(
    ("errcode", "message", "hint", "said"),
    [
        (
            "53100",
            'could not extend file "base/16384/16547" with FileFallocate(): '
            "No space left on device",
            "Check free disk space.",
            'PostgreSQL could not write to its disk: could not extend file "base/16384/16547" '
            "with FileFallocate(): No space left on device",
        ),
        (
            # EFBIG (a file size ulimit on the server) is not disk_full: it was "unexpected
            # InternalError_" with a 95-line traceback.
            "XX000",
            'could not extend file "base/16711/16731": File too large',
            "Check free disk space.",
            'PostgreSQL could not write to its disk: could not extend file "base/16711/16731": '
            "File too large",
        ),
        (
            "53400",
            "temporary file size exceeds temp_file_limit (0kB)",
            None,
            "PostgreSQL refused the work: temporary file size exceeds temp_file_limit (0kB)",
        ),
        (
            "53200",
            "out of shared memory",
            "You might need to increase max_locks_per_transaction.",
            "PostgreSQL ran out of memory: out of shared memory",
        ),
        ("53200", "out of memory", None, "PostgreSQL ran out of memory: out of memory"),
    ],
)
def test_a_server_out_of_room_is_named(empty_db_url, errcode, message, hint, said):
    exc = raised(empty_db_url, raise_as_server(errcode, message, hint))
    assert exc.sqlstate == errcode
    words = explain_failure(exc)
    assert words is not None, f"{errcode} read as a bug"
    assert words.startswith(said + " (PL/pgSQL function inline_code_block"), words
    advice = words.split("; ", 1)[1]
    if errcode in ("53100", "XX000"):
        assert advice.startswith("free space on the server's data disk"), advice
    elif errcode == "53400":
        assert "a limit of DATABASE_URL's options or PGOPTIONS, the login" in advice
    elif hint:
        assert advice == hint
    else:
        assert "256MB of work_mem or maintenance_work_mem" in advice


def test_a_server_that_crashed_is_named_as_such(empty_db_url):
    """A server process crashed (a full WAL disk, the kernel's OOM killer): the others
    are ended (57P02), and a new login is refused while it recovers. Both read "could not
    be reached", which sent people looking at the network (resource audit)."""
    crashed = raised(
        empty_db_url,
        raise_as_server(
            "57P02",
            "terminating connection because of crash of another server process",
        ),
    )
    words = explain_failure(crashed)
    assert words is not None
    assert words.startswith("the database server stopped and is recovering"), words
    recovering = psycopg.OperationalError(
        'connection failed: connection to server at "127.0.0.1", port 55041 failed: '
        "FATAL:  the database system is in recovery mode"
    )  # libpq gives a refused login no SQLSTATE: its words are the error
    assert (explain_failure(recovering) or "").startswith(
        "the database server stopped and is recovering"
    )


def test_a_failed_run_keeps_its_own_error_when_the_ledger_cannot_record_it(
    run_flow, db_url, months, tmp_path, caplog
):
    """The run failed (here a month with a user twice), then the ledger's write of its
    outcome failed too (in the audit, the same full disk): the CLI's last line became the
    ledger's error, and the row stayed "running" until the next run called it abandoned
    "process killed or connection lost". The run's own error now stays its last word."""
    bad = tmp_path / "bad"
    shutil.copytree(months / "month_000", bad)
    rows = read_rows(bad / "labels.csv")
    write_rows(bad / "labels.csv", [*rows, rows[-1]])
    rc, _, err = run_flow(db_url, bad, JAN)
    assert rc == 1
    own_error = err.strip().splitlines()[-1]
    assert "labels.csv" in own_error, err[-2000:]

    with psycopg.connect(db_url, autocommit=True) as admin:
        # Stands in for the full disk: the server refuses the ledger's UPDATE of the run
        # with the disk's SQLSTATE.
        admin.execute(
            """
            CREATE FUNCTION refuse_outcome() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              RAISE EXCEPTION 'could not extend file "base/1/2": No space left on device'
                USING ERRCODE = 'disk_full';
            END $$;
            CREATE TRIGGER refuse_outcome BEFORE UPDATE ON ingest_runs
              FOR EACH ROW WHEN (NEW.status = 'failed') EXECUTE FUNCTION refuse_outcome();
            """
        )
    with caplog.at_level(logging.WARNING):
        rc, _, err = run_flow(db_url, bad, JAN)
    assert rc == 1
    assert err.strip().splitlines()[-1] == own_error, err[-2000:]
    run_id = scalar(db_url, "SELECT max(run_id) FROM ingest_runs")
    assert (
        f"the run's failed outcome could not be recorded in ingest_runs (run {run_id} stays "
        "'running' until the next run marks it abandoned): PostgreSQL could not write to "
        'its disk: could not extend file "base/1/2": No space left on device'
    ) in caplog.text
    by_id = "SELECT {} FROM ingest_runs WHERE run_id = %s"
    assert scalar(db_url, by_id.format("status"), (run_id,)) == "running"

    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute("DROP TRIGGER refuse_outcome ON ingest_runs")
    ok(run_flow(db_url, months / "month_000", JAN))
    assert scalar(db_url, by_id.format("error"), (run_id,)) == (
        "the run ended without recording its outcome (process killed, connection lost, or "
        "the ledger could not be written: see the run's log)"
    )


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 64 MB tmpfs, mounted for the test (root, and a kernel that lets it). Not under
    pytest's tmp_path, which the server's own user (pgserver's, under root) cannot reach."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a small disk is a tmpfs mount: needs root")
    base = Path(tempfile.mkdtemp(prefix="sf-small-disk-"))
    base.chmod(0o711)
    where = base / "disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def db_on_small_disk(pg_admin_url: str, template_db: str, small_disk: Path) -> Iterator[str]:
    """A database with the pipeline's schema whose tables live on ``small_disk`` (its
    default tablespace), its ledger on the server's own disk."""
    n = f"{os.getpid()}_{next(_names)}"
    space, name = f"sf_small_{n}", f"sf_small_{n}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        data_dir = Path(admin.execute("SHOW data_directory").fetchone()[0])  # type: ignore[index]
        if not data_dir.is_dir():
            pytest.skip("the test server is not on this machine")
        os.chown(small_disk, data_dir.stat().st_uid, data_dir.stat().st_gid)
        admin.execute(
            sql.SQL("CREATE TABLESPACE {} LOCATION {}").format(
                sql.Identifier(space), sql.Literal(str(small_disk))
            )
        )
    try:
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {} TABLESPACE {}").format(
                    sql.Identifier(name), sql.Identifier(template_db), sql.Identifier(space)
                )
            )
        url = with_database(pg_admin_url, name)
        with psycopg.connect(url, autocommit=True) as conn:
            # What is being tested is the month's failure, not the ledger's (above): the
            # ledger's tables and their indexes on the server's own disk.
            ledger = conn.execute(
                "SELECT c.oid::regclass::text, c.relkind FROM pg_class AS c "
                "LEFT JOIN pg_index AS i ON i.indexrelid = c.oid "
                "WHERE coalesce(i.indrelid, c.oid) IN ('ingest_runs'::regclass, "
                "'ingest_months'::regclass)"
            ).fetchall()
            for relation, kind in ledger:
                what = "INDEX" if kind == "i" else "TABLE"
                conn.execute(
                    sql.SQL("ALTER {} {} SET TABLESPACE pg_default").format(
                        sql.SQL(what), sql.Identifier(relation)
                    )
                )
        yield url
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            admin.execute(sql.SQL("DROP TABLESPACE IF EXISTS {}").format(sql.Identifier(space)))


def fill(disk: Path) -> Path:
    """Take every free byte of ``disk``."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with filler.open("wb") as f:
        os.posix_fallocate(f.fileno(), 0, free)
    return filler


def test_a_full_disk_while_publishing_is_named_and_changes_nothing(
    run_flow, db_on_small_disk, small_disk, months, monkeypatch
):
    """The disk fills once the month is staged and validation is under way: the
    publisher cannot write. The month is refused in words that say the disk is full
    (and which statement), the published month and the live tables are as they were,
    and once there is room again the same month publishes with no cleanup."""
    from streamflow import publishing

    url = db_on_small_disk
    ok(run_flow(url, months / "month_000", JAN))
    before = table_digests(url)
    real_publish = publishing.publish_month

    def on_a_full_disk(*args: object, **kwargs: object) -> object:
        fill(small_disk)
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(publishing, "publish_month", on_a_full_disk)
    rc, _, err = run_flow(url, months / "month_001", FEB)

    last = err.strip().splitlines()[-1]
    assert rc == 1
    assert last.startswith("ingest failed: PostgreSQL could not write to its disk: could not "), (
        last
    )
    assert "No space left on device" in last
    assert last.endswith(
        "; free space on the server's data disk (PGDATA's volume, or the tablespace's), or "
        "raise the quota or file size limit the error names"
    ), last
    assert table_digests(url) == before
    last_run = "SELECT status, 'ingest failed: ' || error FROM ingest_runs ORDER BY run_id DESC"
    with psycopg.connect(url) as conn:
        assert conn.execute(last_run).fetchone() == ("failed", last)

    (small_disk / "filler").unlink()
    monkeypatch.setattr(publishing, "publish_month", real_publish)
    ok(run_flow(url, months / "month_001", FEB))
    assert scalar(url, "SELECT count(*) FROM ingest_months") == 2


def test_a_publisher_that_fails_ends_the_run_without_waiting_for_validation(
    run_flow, db_url, months, monkeypatch
):
    """Publishing fails (the disk is full) while GX is still validating: the run used
    to wait for GX's verdict before it said so (at 10M users about 2 minutes, GX's
    queries on the same full server meanwhile: resource audit). Here validation is held
    by a session's locks on the staged tables, and the run ends at once with the
    publisher's error; nothing published changes."""
    from streamflow import publishing, validation
    from streamflow.registry import TABLES

    disk_full = raised(
        db_url,
        raise_as_server("53100", 'could not extend file "base/1/2": No space left on device'),
    )
    ok(run_flow(db_url, months / "month_000", JAN))
    before = table_digests(db_url)
    blocker = psycopg.connect(db_url)
    blocker.execute("SET lock_timeout = '20s'")
    staged = sql.SQL(", ").join(sql.Identifier("staging", t.name) for t in TABLES)
    real_run = validation.SuitesProcess.run

    def validation_held(self: validation.SuitesProcess, as_of: object, floor: int) -> object:
        blocker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(staged))
        return real_run(self, as_of, floor)  # type: ignore[arg-type]

    raised_at: list[float] = []

    def on_a_full_disk(*args: object, **kwargs: object) -> None:
        time.sleep(1)  # validation asked meanwhile, and held
        raised_at.append(time.monotonic())
        raise disk_full

    waiting_on_locks = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock'"
    )
    monkeypatch.setattr(validation.SuitesProcess, "run", validation_held)
    monkeypatch.setattr(publishing, "publish_month", on_a_full_disk)
    let_go = threading.Timer(120, blocker.rollback)  # without the stop: the run's end
    let_go.start()
    try:
        rc, _, err = run_flow(db_url, months / "month_001", FEB)
        took = time.monotonic() - raised_at[0]
        # GX's statement, killed with its process while it waited for the locks, is
        # ended by the server (client_connection_check_interval), not left waiting.
        deadline = time.monotonic() + 15
        while scalar(db_url, waiting_on_locks) and time.monotonic() < deadline:
            time.sleep(0.2)
        left_waiting = scalar(db_url, waiting_on_locks)
    finally:
        let_go.cancel()
        blocker.rollback()
        blocker.close()

    assert rc == 1
    assert err.strip().splitlines()[-1] == (
        'ingest failed: PostgreSQL could not write to its disk: could not extend file "base/1/2": '
        "No space left on device (PL/pgSQL function inline_code_block line 1 at RAISE); free "
        "space on the server's data disk (PGDATA's volume, or the tablespace's), or raise the "
        "quota or file size limit the error names"
    ), err[-2000:]
    assert took < 30, f"the run waited {took:.0f} s for validation"
    assert left_waiting == 0, "GX's statement still waits on the server"
    assert table_digests(db_url) == before


def test_only_the_servers_state_stops_validation_early(empty_db_url):
    """A failed publisher stops validation only for errors no month's values cause: a
    duplicate key or a key too big for its index is the data's, and validation names
    the file, column and rows (the duplicate month above reads so)."""
    from streamflow.diagnosis import about_the_server

    def error(errcode: str) -> psycopg.Error:
        return raised(empty_db_url, raise_as_server(errcode, "said by the server"))

    assert about_the_server(error("53100"))  # disk full
    assert about_the_server(error("55P03"))  # a lock not granted in time
    assert about_the_server(error("42501"))  # a right missing
    assert not about_the_server(error("23505"))  # a duplicate key
    assert not about_the_server(error("54000"))  # an index row too big
    assert not about_the_server(error("22003"))  # a number out of range
    assert not about_the_server(ZeroDivisionError("a bug"))
