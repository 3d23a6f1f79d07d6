"""``python -m streamflow.embedded``: the embedded default server, for people with psql.

Runs as a subprocess, as people run it, on a real pgserver PostgreSQL in a temporary
STREAMFLOW_PGDATA (no DATABASE_URL nor POSTGRES_HOST, so the flow would use it too).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest
from conftest import FLOW_DIR


def embedded(pgdata, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTGRES_")}
    # Empty, not absent: a developer's .env (read from the repo too) must not name a server.
    env.update(PYTHONPATH=str(FLOW_DIR), STREAMFLOW_PGDATA=str(pgdata), DATABASE_URL="")
    env.update(POSTGRES_HOST="", **extra)
    return subprocess.run(
        [sys.executable, "-m", "streamflow.embedded", *args],
        cwd=pgdata.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_uri_psql_and_stop_reach_the_server_the_flow_would_use(tmp_path):
    pgdata = tmp_path / "pgdata"
    try:
        uri = embedded(pgdata, "uri")
        assert uri.returncode == 0, uri.stderr
        url = uri.stdout.strip()
        with psycopg.connect(url) as conn:
            conn.execute("CREATE TABLE counted (n int); INSERT INTO counted VALUES (41), (1)")

        psql = embedded(pgdata, "psql", "-At", "-c", "SELECT sum(n) FROM counted")
        assert (psql.returncode, psql.stdout.strip()) == (0, "42"), psql.stderr
        # psql's own -d names another database on the same server (it replaced the URI)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE other")
        other = embedded(pgdata, "psql", "-d", "other", "-At", "-c", "SELECT current_database()")
        assert (other.returncode, other.stdout.strip()) == (0, "other"), other.stderr

        stop = embedded(pgdata, "stop")
        assert (stop.returncode, stop.stdout.strip()) == (0, f"stopped {pgdata}"), stop.stderr
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=5).close()
    finally:
        embedded(pgdata, "stop")

    again = embedded(pgdata, "stop")
    assert (again.returncode, again.stdout.strip()) == (0, f"not running: {pgdata}")

    # The data stayed: the next uri starts the same server with the same table.
    try:
        url = embedded(pgdata, "uri").stdout.strip()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT sum(n) FROM counted").fetchone() == (42,)
    finally:
        embedded(pgdata, "stop")


def test_the_uri_names_the_servers_port_whatever_pgport_says(tmp_path, monkeypatch):
    """The URI named no port and pgserver starts postgres without -p: the socket took the
    PGPORT of the run that started the server, each client that of its own run, and a
    run with another PGPORT said 'could not be reached: ... .s.PGSQL.5433: No such file'.
    A PGPORT that is no port stopped the server from starting at all."""
    pgdata = tmp_path / "pgdata"

    def pgport(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv("PGPORT", raising=False)
        else:
            monkeypatch.setenv("PGPORT", value)

    try:
        for started, later in ((None, "5433"), ("5433", None), ("abc", "5433")):
            pgport(started)
            first = embedded(pgdata, "uri")
            assert first.returncode == 0, (started, first.stderr)
            pgport(later)
            url = embedded(pgdata, "uri").stdout.strip()
            with psycopg.connect(url, connect_timeout=5) as conn:  # as the flow connects
                assert conn.execute("SELECT 1").fetchone() == (1,)
            psql = embedded(pgdata, "psql", "-At", "-c", "SELECT 41 + 1")
            assert (psql.returncode, psql.stdout.strip()) == (0, "42"), (started, psql.stderr)
            assert embedded(pgdata, "stop").returncode == 0

        # A server already running on another port (started by hand, or before PGPORT
        # was ignored) keeps its port, and the URI names it.
        pgport(None)
        import pgserver

        pg_ctl = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_ctl"
        socket_dir = _socket_dir(pgdata)
        owner = pgdata.stat()  # pg_ctl refuses root: the server runs as pgserver's user
        subprocess.run(
            [str(pg_ctl), "-D", str(pgdata), "-w", "-l", str(pgdata / "log")]
            + ["-o", f"-p 5499 -h '' -k {socket_dir}", "start"],
            user=owner.st_uid if os.geteuid() == 0 else None,
            group=owner.st_gid if os.geteuid() == 0 else None,
            capture_output=True,
            timeout=60,
            check=True,
        )
        uri = embedded(pgdata, "uri")
        assert uri.returncode == 0, uri.stderr
        assert uri.stdout.strip().endswith("&port=5499")
        with psycopg.connect(uri.stdout.strip(), connect_timeout=5) as conn:
            assert conn.execute("SHOW port").fetchone() == ("5499",)
    finally:
        embedded(pgdata, "stop")


def _socket_dir(pgdata: Path) -> str:
    """The socket folder pgserver chose for ``pgdata`` (postmaster.pid's 5th line), the
    server started and stopped once to learn it."""
    try:
        assert embedded(pgdata, "uri").returncode == 0
        return (pgdata / "postmaster.pid").read_text().splitlines()[4]
    finally:
        embedded(pgdata, "stop")


def test_only_psql_takes_arguments(tmp_path):
    """`stop now` or `uri x` is a mistake, not a stop or a uri: a usage error, nothing run."""
    pgdata = tmp_path / "pgdata"
    for command in ("uri", "stop"):
        proc = embedded(pgdata, command, "now")
        assert proc.returncode == 2, proc.stderr
        assert f"{command} takes no arguments" in proc.stderr
    assert not pgdata.exists()


def test_psql_is_refused_when_runs_use_another_server(tmp_path):
    """With DATABASE_URL set the flow never writes to the embedded server: counts read
    there would mislead, so no embedded server is started."""
    pgdata = tmp_path / "pgdata"
    proc = embedded(pgdata, "psql", DATABASE_URL="postgresql://postgres@127.0.0.1:9/x")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "embedded: DATABASE_URL or POSTGRES_HOST is set, so runs use that server, "
        "not the embedded one: connect to it instead"
    )
    assert not pgdata.exists()


@pytest.mark.parametrize("name", ["with space & co", "pg%41data"])
def test_a_data_folder_with_shell_or_url_characters_works(tmp_path, name):
    """A checkout under 'My Projects' put the default .pgdata in a path pg_ctl's shell
    splits (an empty AssertionError); a '%41' in it made the URI name another folder."""
    # Short, as a checkout's: pgserver keeps the socket in the data folder only while
    # the socket's path fits (108 bytes), and pytest's folders are longer than that.
    root = Path(tempfile.mkdtemp(prefix="sf-"))
    pgdata = root / name / ".pgdata"
    pgdata.parent.mkdir()
    try:
        uri = embedded(pgdata, "uri")
        assert uri.returncode == 0, uri.stderr
        with psycopg.connect(uri.stdout.strip()) as conn:
            assert conn.execute("SHOW data_directory").fetchone()[0]
        psql = embedded(pgdata, "psql", "-At", "-c", "SELECT 41 + 1")
        assert (psql.returncode, psql.stdout.strip()) == (0, "42"), psql.stderr
        assert (pgdata / "PG_VERSION").is_file()  # the data is in the folder named
    finally:
        stop = embedded(pgdata, "stop")
        shutil.rmtree(root, ignore_errors=True)
    assert (stop.returncode, stop.stdout.strip()) == (0, f"stopped {pgdata}"), stop.stderr


def test_a_data_folder_that_is_not_one_is_named(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("")

    for path, expected in (
        (afile, f"embedded: STREAMFLOW_PGDATA {str(afile)!r} is a file; expected a folder"),
        (other, f"embedded: STREAMFLOW_PGDATA {str(other)!r} holds files but no PostgreSQL"),
    ):
        proc = embedded(path, "uri")
        assert proc.returncode == 1
        assert proc.stderr.strip().startswith(expected), proc.stderr


def test_the_uri_encodes_its_socket_folder():
    """A server started at a '%41' path before such paths went through a link: libpq
    decodes the URI's host, so it must be encoded."""
    from psycopg.conninfo import conninfo_to_dict
    from streamflow.embedded import socket_uri

    uri = socket_uri(Path("/tmp/pg%41data x/.pgdata"), 5432)

    assert conninfo_to_dict(uri) == {
        "user": "postgres",
        "dbname": "postgres",
        "host": "/tmp/pg%41data x/.pgdata",
        "port": "5432",
    }


@pytest.mark.skipif(not Path("/proc/self/comm").exists(), reason="Linux: /proc names a process")
def test_a_stale_pid_file_naming_another_live_process_is_not_a_server(tmp_path):
    """After a crash the pid in postmaster.pid may belong to another process by the next
    start (pids wrap): the server was taken for running, every run said 'could not be
    reached', and only deleting the data folder helped. The data is kept."""
    pgdata = tmp_path / "pgdata"
    url = embedded(pgdata, "uri").stdout.strip()
    # A live process that is no postgres, of the server's own user: pg_ctl can signal it.
    owner = pgdata.stat().st_uid
    other = subprocess.Popen(["sleep", "60"], user=owner if os.geteuid() == 0 else None)
    try:
        with psycopg.connect(url) as conn:
            conn.execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (7)")
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        assert embedded(pgdata, "stop").returncode == 0
        stale = "\n".join([str(other.pid), *lines[1:]]) + "\n"
        (pgdata / "postmaster.pid").write_text(stale)
        stop = embedded(pgdata, "stop")  # pg_ctl would have sent that process SIGINT
        assert (stop.returncode, stop.stdout.strip()) == (0, f"not running: {pgdata}")
        assert other.poll() is None
        (pgdata / "postmaster.pid").write_text(stale)

        uri = embedded(pgdata, "uri")
        assert uri.returncode == 0, uri.stderr
        with psycopg.connect(uri.stdout.strip()) as conn:
            assert conn.execute("SELECT n FROM kept").fetchone() == (7,)
    finally:
        other.kill()
        other.wait()
        embedded(pgdata, "stop")


def test_a_server_that_cannot_start_is_one_line_naming_its_log(tmp_path):
    """A data folder of another PostgreSQL version: pgserver printed the server's whole
    log twice, then a traceback, and the flow said 'unexpected AssertionError: '."""
    pgdata = _of_another_version(tmp_path / "pgdata")

    proc = embedded(pgdata, "uri")

    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"embedded: the embedded PostgreSQL in {pgdata} did not start: database files are "
        "incompatible with server (The data directory was initialized by PostgreSQL "
        f"version 15, which is not compatible with this version {_server_version()}.) (its "
        f"log: {pgdata / 'log'}; STREAMFLOW_PGDATA names another folder)"
    ], proc.stderr


def test_the_cli_says_in_one_line_that_the_embedded_server_did_not_start(tmp_path):
    pgdata = _of_another_version(tmp_path / "pgdata")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "PREFECT_"))}
    env.update(
        PYTHONPATH=str(FLOW_DIR),
        STREAMFLOW_PGDATA=str(pgdata),
        DATABASE_URL="",
        POSTGRES_HOST="",
        PREFECT_HOME=str(tmp_path / "prefect"),
    )
    month = FLOW_DIR.parent.parent / "data" / "seeds" / "month_000"
    proc = subprocess.run(
        [sys.executable, str(FLOW_DIR / "ingest_flow.py"), "--seed-dir", str(month)]
        + ["--as-of", "2024-01-31"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"ingest failed: the embedded PostgreSQL in {pgdata} did not start: database files "
        "are incompatible with server"
    ), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Showing contents" not in proc.stderr


def _server_version() -> str:
    """The wheel's PostgreSQL version, as its server names itself (16.2)."""
    import pgserver

    postgres = Path(pgserver.__file__).parent / "pginstall" / "bin" / "postgres"
    return subprocess.run(
        [str(postgres), "--version"], capture_output=True, text=True
    ).stdout.split()[-1]


def _of_another_version(pgdata: Path) -> Path:
    """A data folder the embedded server made, then marked as PostgreSQL 15's."""
    try:
        assert embedded(pgdata, "uri").returncode == 0
    finally:
        embedded(pgdata, "stop")
    (pgdata / "PG_VERSION").write_text("15\n")
    return pgdata


def test_the_test_server_is_asked_again_after_a_slow_start(tmp_path, monkeypatch):
    """pgserver gives pg_ctl 10 s to start a server; under load (xdist workers starting
    theirs, helpers busy) one worker's start took longer, and its every test errored.
    conftest asks pgserver again, which finds the postmaster started or starts it."""
    import pgserver
    from conftest import _connect_once_up, _started

    cut = _first_start_cut_short(monkeypatch)
    server = _started(pgserver, tmp_path / "pg")
    try:
        assert cut, "the start was never cut short"
        with _connect_once_up(server.get_uri()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        server.cleanup()


def test_the_embedded_server_is_asked_again_after_a_slow_start(tmp_path, monkeypatch):
    """The same on a user's loaded machine: a first start past pg_ctl's 10 s said 'did
    not start: no answer within 10 s' though the server came up a moment later."""
    from streamflow.embedded import embedded_database_url

    cut = _first_start_cut_short(monkeypatch)
    pgdata = tmp_path / "pgdata"
    try:
        url = embedded_database_url(pgdata)
        assert cut, "the start was never cut short"
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        embedded(pgdata, "stop")


def _first_start_cut_short(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """pgserver's first pg_ctl start runs, then raises as if past its 10 s: the server is
    up, pgserver's call failed. The list gets that call's arguments."""
    from pgserver import postgres_server

    real = postgres_server.pg_ctl
    cut: list[list[str]] = []

    def impatient(args, **kwargs):
        done = real(args, **kwargs)
        if "start" in args and not cut:
            cut.append(args)
            raise subprocess.TimeoutExpired(args, kwargs.get("timeout") or 10)
        return done

    monkeypatch.setattr(postgres_server, "pg_ctl", impatient)
    return cut
