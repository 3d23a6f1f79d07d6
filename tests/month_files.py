"""Helpers for tests that build month folders and run the flow outside ``run_flow``.

Small months: the first N users of the real lab months (the six files list the same
user_ids in the same order, so truncating each file keeps them consistent), or the
seed generator's output when the lab files are absent.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from conftest import (
    ALL_TABLES,
    FLOW_DIR,
    SHARED_SEEDS,
    STATE,
    docs_dir_of_a_run,
    main_in_process,
    with_database,
)
from psycopg import sql
from streamflow.locking import LOCK_KEY
from streamflow.registry import TABLES
from streamflow.settings import RUN_VARIABLES

MONTHS = ("month_000", "month_001")
AS_OF = {"month_000": "2024-01-31", "month_001": "2024-02-29"}


def child_processes(parent: int) -> dict[int, list[bytes]]:
    """The live processes whose parent is ``parent``, with their argv (from /proc)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent:
            found[int(pid)] = argv
    return found


def first_users(month: Path, users: int, into: Path) -> Path:
    """``month``'s six files cut to their first ``users`` users, in ``into``: they list the
    same users in the same order, so the cut month's files agree with each other."""
    into.mkdir(parents=True, exist_ok=True)
    for spec in TABLES:
        with (month / spec.file_name).open("rb") as f:
            head = b"".join(f.readline() for _ in range(users + 1))
        (into / spec.file_name).write_bytes(head)
    return into


def runs(url: str) -> list[dict]:
    """Every row of ingest_runs, oldest first."""
    with psycopg.connect(url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute("SELECT * FROM ingest_runs ORDER BY run_id").fetchall()


def small_months(root: Path, users: int = 200) -> Path:
    """``root/month_000`` and ``root/month_001`` with ``users`` users each; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    if (SHARED_SEEDS / "month_001" / "users.csv").is_file():
        for month in MONTHS:
            first_users(SHARED_SEEDS / month, users, root / month)
        return root
    try:
        from streamflow import seeds
    except ImportError:
        pytest.skip(f"neither the lab files in {SHARED_SEEDS} nor streamflow.seeds is available")
    seeds.generate(root, users=users, months=2, seed=42)
    return root


def read_rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def write_rows(path: Path, rows: list[list[str]], lineterminator: str = "\n", **fmt) -> None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator=lineterminator, **fmt).writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8", newline="")


def ok(result: tuple[int, str, str]) -> str:
    """The output of a run (rc, out, err) that must have succeeded."""
    rc, out, err = result
    assert rc == 0, err[-3000:]
    return out


def with_value(
    months: Path, folder: Path, file: str, column: str, value: str, row: int = 3
) -> Path:
    """``folder``: a copy of ``months/month_000`` whose ``file`` has ``value`` in
    ``column`` on data row ``row`` (file line ``row + 1``)."""
    shutil.copytree(months / "month_000", folder)
    rows = read_rows(folder / file)
    rows[row][rows[0].index(column)] = value
    write_rows(folder / file, rows)
    return folder


def flow_env(url: str, **extra: str) -> dict[str, str]:
    """Environment for a flow subprocess: this interpreter's env, the DB, nothing else steering."""
    env = {k: v for k, v in os.environ.items() if k not in RUN_VARIABLES}
    env.update(DATABASE_URL=url, PYTHONPATH=str(FLOW_DIR), PYTHONUNBUFFERED="1")
    env["GX_DOCS_DIR"] = docs_dir_of_a_run()
    env.update(extra)
    return env


def flow_command(seed_dir: Path | str, as_of: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(FLOW_DIR / "ingest_flow.py"),
        "--seed-dir",
        str(seed_dir),
        "--as-of",
        as_of,
        *extra,
    ]


def ingest(url: str, seed_dir: Path | str, as_of: str, *extra: str) -> int:
    """The real CLI in-process, for module-scoped setup where ``run_flow`` is unavailable."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATABASE_URL", url)
        return main_in_process(["--seed-dir", str(seed_dir), "--as-of", as_of, *extra])


def disconnect_all(admin_url: str, dbname: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )


@contextmanager
def database_copy(
    admin_url: str, template: str, name: str, *, file_copy: bool = False
) -> Iterator[str]:
    """A new database cloned from ``template`` (whose sessions are ended first).

    ``file_copy``: copy the files after a checkpoint instead of WAL-logging every
    block; much faster for a big template.
    """
    disconnect_all(admin_url, template)
    strategy = " STRATEGY FILE_COPY" if file_copy else ""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"{strategy}')
    try:
        yield with_database(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def table_digests(url: str, tables: tuple[str, ...] = ALL_TABLES) -> dict[str, tuple]:
    """Per table: row count and two order-independent 64-bit hash sums of its rows.

    Computed in PostgreSQL (no rows fetched, no sort: ~3x faster than an md5 over
    sorted rows at 200k users). ``ingest_months`` is compared on (as_of, fingerprint):
    its run_id and published_at name the run, not the data.
    """
    out = {}
    with psycopg.connect(url) as conn:
        for t in tables:
            cols = sql.SQL("as_of, fingerprint" if t == "ingest_months" else "*")
            q = sql.SQL(
                "SELECT count(*), sum(hashtextextended(r, 0)::numeric), "
                "sum(hashtextextended(r, 1)::numeric) "
                "FROM (SELECT ROW(t.*)::text AS r FROM (SELECT {} FROM {}) t) x"
            ).format(cols, sql.Identifier(t))
            row = conn.execute(q).fetchone()
            assert row is not None
            out[t] = tuple(row)
    return out


def prefect_server_command(port: int) -> list[str]:
    """``prefect server start`` (the compose service's command) on 127.0.0.1:``port``."""
    return [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
            "--port", str(port)]  # fmt: skip


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """``prefect server start`` (SQLite in ``home``) on a free port; yields its API URL.

    Flow processes given PREFECT_API_URL use it instead of each starting a temporary
    server of their own (10-20 s apiece), as the deployed runner does.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false")
    log_path = home / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            prefect_server_command(port),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(api + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prefect server did not start in 120 s"
            time.sleep(0.5)
        yield api
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


_migrated_home: Path | None = None


def migrated_prefect_home(home: Path) -> Path:
    """``home``, made a PREFECT_HOME as a user's is after their first run: Prefect's
    SQLite database migrated and its block types registered. Returns ``home``.

    A first start in an empty home migrates that database: ~6 s of CPU of the ~11 s a
    200-user month costs the CLI, paid once on a user's machine but by every CLI test
    given a fresh home. They copy one made per test process instead; the tests about a
    first start, or about a home left untouched, keep an empty one.
    """
    global _migrated_home
    if _migrated_home is None:
        made = STATE / "migrated-prefect-home"
        shutil.rmtree(made, ignore_errors=True)  # a start that failed before (its error shown)
        made.mkdir()
        # Prefect's own server start (migrations, blocks), in the environment of no test:
        # one may have set a server setting (an auth string) with monkeypatch.
        with pytest.MonkeyPatch.context() as mp:
            for name in [n for n in os.environ if n.startswith("PREFECT_SERVER_")]:
                mp.delenv(name)
            with prefect_server(made):
                pass
        (made / "server.log").unlink()
        _migrated_home = made
    shutil.copytree(_migrated_home, home, dirs_exist_ok=True)
    return home


def end_writer_lock_holder(url: str) -> None:
    """Terminate the backend holding the pipeline's writer lock (a run's control
    connection), and wait until it has exited: pg_terminate_backend only signals it,
    and the lock goes with the process."""
    held = "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid = %s"
    with psycopg.connect(url, autocommit=True) as admin:
        ended = admin.execute(
            f"SELECT pg_terminate_backend(pid) FROM ({held}) AS h",  # noqa: S608
            (LOCK_KEY,),
        ).fetchall()
        assert ended == [(True,)]
        deadline = time.monotonic() + 30
        while admin.execute(held, (LOCK_KEY,)).fetchone():
            assert time.monotonic() < deadline, "the control backend did not exit"
            time.sleep(0.02)
