"""Test fixtures: a real, throwaway PostgreSQL for the whole run, a fresh database per test.

The server is the ``pgserver`` wheel's PostgreSQL (real binaries, started in a temp
dir) unless TEST_DATABASE_URL points at a server whose role may CREATE DATABASE.
Under pytest-xdist each worker starts its own server; database names carry the
worker's pid, so workers sharing a TEST_DATABASE_URL server do not collide.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from streamflow.settings import RUN_VARIABLES  # pyproject's pythonpath; imports no Prefect

STATE = Path(tempfile.mkdtemp(prefix="streamflow-tests-"))
# Left behind, each run's folder (Prefect's database, Data Docs: up to 75 MB) piled up in
# /tmp. Registered first, this runs last, after Prefect's own exit stops its server.
atexit.register(shutil.rmtree, STATE, ignore_errors=True)
# Prefect and GX read their settings at import time: keep their state out of $HOME.
os.environ.setdefault("PREFECT_HOME", str(STATE / "prefect"))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
SHARED_DOCS = str(STATE / "gx_docs")
os.environ.setdefault("GX_DOCS_DIR", SHARED_DOCS)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# The temporary Prefect server gets 20 s to start by default: too short on a busy box.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# A developer's shell must not steer the tests: the run's inputs, the database (libpq
# reads PG* under any URL), a Prefect server or profile of their own.
for _name in (
    *("DATABASE_URL", "POSTGRES_HOST", *RUN_VARIABLES),
    *("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "PGOPTIONS", "PGSERVICE"),
    *("PGDATESTYLE", "PGTZ"),
    *("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_API_AUTH_STRING"),
):
    os.environ.pop(_name, None)

import logging  # noqa: E402

import prefect.main  # noqa: E402, F401  (prefect alone imports lazily: main configures logging)
import psycopg  # noqa: E402
import pytest  # noqa: E402
from prefect.logging.handlers import PrefectConsoleHandler  # noqa: E402
from psycopg import sql  # noqa: E402

# Prefect configures logging when it is first imported: now, before any test. Imported
# by a test, it replaced the root logger's handlers, pytest's log capture among them, so
# that test's caplog saw nothing (7 tests failed when run alone); and its console
# handler kept that test's stderr, closed after it ("--- Logging error ---" later).
# The console now writes to sys.stderr as it is at each write: capsys's in a test.
for _handler in logging.getLogger().handlers:
    if isinstance(_handler, PrefectConsoleHandler):
        _handler.setStream(sys.__stderr__)  # its flush; pytest's capture file closes first
        _handler.console.file = None  # rich then writes to the sys.stderr of the moment
        _handler.console.stderr = True

REPO = Path(__file__).resolve().parents[1]
FLOW_DIR = REPO / "services" / "prefect"
sys.path.insert(0, str(FLOW_DIR))

import gx_forkserver  # noqa: E402
from streamflow import bootstrap  # noqa: E402
from streamflow import validation as sfvalidation  # noqa: E402
from streamflow.registry import LIVE_TABLES, SNAPSHOT_TABLES  # noqa: E402

SHARED_SEEDS = Path(os.environ.get("SHARED_SEEDS_DIR", REPO.parent / "shared" / "seeds"))
DATA_SEEDS = REPO / "data" / "seeds"
DATA_TABLES = LIVE_TABLES + SNAPSHOT_TABLES
ALL_TABLES = DATA_TABLES + ("ingest_months",)
_counter = itertools.count()
_REAL_CHILD_COMMAND = sfvalidation.child_command


# Handed to the workers first, one module per worker at a time (scripts/test.sh runs
# --dist loadfile --no-loadscope-reorder): xdist otherwise hands out the modules with
# the most tests first, and the one-test crash-recovery module (~90 s) ran last, alone
# on one core. A schedule of the 2026-12-07 durations: 832 s → 791 s on two workers.
_LONGEST_MODULES = ("test_crash_recovery.py", "test_cli_startup.py", "test_rerun_rules.py")


def pytest_configure(config: pytest.Config) -> None:
    # As root, pgserver runs PostgreSQL as a 'pgserver' system user that it creates with
    # useradd when missing. On a fresh machine the xdist workers each created it at once:
    # the user was made twice (uid 1001, then 1002), one worker's data folder was chowned
    # to the lost uid, and every test of that worker errored ("initdb: could not access
    # directory ...: Permission denied"; 2 runs of 3). The controller makes it first.
    if (
        hasattr(config, "workerinput")  # an xdist worker: the controller has done it
        or os.environ.get("TEST_DATABASE_URL")
        or os.name != "posix"
        or os.geteuid() != 0
    ):
        return
    from pgserver.utils import ensure_user_exists

    ensure_user_exists("pgserver")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return _LONGEST_MODULES.index(name) if name in _LONGEST_MODULES else len(_LONGEST_MODULES)

    items.sort(key=rank)  # stable: each module's tests, and the other modules, keep their order


def with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


@pytest.fixture(scope="session", autouse=True)
def gx_template() -> Iterator[gx_forkserver.Template]:
    """In-process flows fork their GX process from one warm interpreter (see
    gx_forkserver.py): ~4 s of CPU saved per flow run. Started on first use."""
    template = gx_forkserver.Template(dict(os.environ))
    sfvalidation.child_command = template.command
    yield template
    sfvalidation.child_command = _REAL_CHILD_COMMAND
    template.stop()


@pytest.fixture
def real_gx_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """This test's flows start the real ``python -m streamflow.validation``."""
    monkeypatch.setattr(sfvalidation, "child_command", _REAL_CHILD_COMMAND)


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Superuser URL of the run's PostgreSQL server."""
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield external
        return
    import pgserver

    pgdata = tmp_path_factory.mktemp("pgdata")
    server = _started(pgserver, pgdata)
    url = server.get_uri()
    with _connect_once_up(url) as conn:
        # Throwaway data: durability buys nothing here, speed does.
        conn.execute("ALTER SYSTEM SET fsync = off")
        conn.execute("ALTER SYSTEM SET synchronous_commit = off")
        conn.execute("ALTER SYSTEM SET full_page_writes = off")
        conn.execute("SELECT pg_reload_conf()")
    yield url
    server.cleanup()


def _started(pgserver: object, pgdata: Path) -> object:
    """pgserver's server for ``pgdata``. pgserver gives pg_ctl 10 s to start it, and a
    loaded machine (the suite's own xdist workers starting theirs) can take longer: the
    worker's every test then errored. The postmaster goes on starting after pg_ctl is
    cut off; asked again, pgserver finds it running."""
    from pgserver.postgres_server import PostgresServer

    for attempt in range(3):
        try:
            return pgserver.get_server(pgdata, cleanup_mode="delete")  # type: ignore[attr-defined]
        except subprocess.TimeoutExpired:
            # pgserver keeps the half-made server and would hand it out as it is.
            PostgresServer._instances.pop(pgdata.resolve(), None)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _connect_once_up(url: str, seconds: float = 60) -> psycopg.Connection:
    """A connection, once a server that is still starting up takes it."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return psycopg.connect(url, autocommit=True)
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> str:
    """A database with db/init applied, cloned for each test."""
    name = f"sf_template_{os.getpid()}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
        # The init SQL also creates cluster-wide roles: xdist workers sharing one
        # TEST_DATABASE_URL server apply it one at a time.
        admin.execute("SELECT pg_advisory_lock(hashtext('streamflow-tests-init'))")
        with psycopg.connect(with_database(pg_admin_url, name)) as conn:
            bootstrap.apply_init_sql(conn)
    return name


@pytest.fixture
def empty_db_url(pg_admin_url: str) -> Iterator[str]:
    """A brand-new database with no schema at all."""
    name = f"sf_empty_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield with_database(pg_admin_url, name)
    _drop(pg_admin_url, name)


@pytest.fixture
def db_url(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A fresh database with the StreamFlow schema, as a superuser URL."""
    name = f"sf_test_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield with_database(pg_admin_url, name)
    _drop(pg_admin_url, name)


def _drop(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main_in_process(argv: list[str]) -> int:
    """``ingest_flow.main(argv)`` in this process. Its flow runs against Prefect's own
    temporary server, with no flow heartbeats, as the CLI's runs against the CLI's
    (warmup.py): Prefect joins the heartbeat thread, which sleeps in 1 s steps, at the
    end of each run (0.66 s per run of a 200-user month, measured)."""
    import ingest_flow
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with (
        pytest.MonkeyPatch.context() as mp,
        temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    ):
        mp.setenv("GX_DOCS_DIR", docs_dir_of_a_run())
        return ingest_flow.main(argv)


_RUN_DOCS: list[Path] = []  # this test's per-run docs folders, removed when it ends


def docs_dir_of_a_run() -> str:
    """GX_DOCS_DIR as a test set it, else a folder of the run's own, removed when the
    test ends. The Data Docs keep every run's results, and their index lists them all:
    in one folder for the whole session, each run's docs took longer to build than the
    last's; kept, a folder per run (4.6 MB) added up to gigabytes."""
    docs = os.environ["GX_DOCS_DIR"]
    if docs != SHARED_DOCS:
        return docs
    _RUN_DOCS.append(STATE / "gx_docs_runs" / str(next(_counter)))
    return str(_RUN_DOCS[-1])


@pytest.fixture(autouse=True)
def _run_docs_removed() -> Iterator[None]:
    yield
    while _RUN_DOCS:  # the test's flows have ended, and nothing reads their docs
        shutil.rmtree(_RUN_DOCS.pop(), ignore_errors=True)


@pytest.fixture
def run_flow(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    """Run the real flow's CLI in-process: returns (exit code, stdout, stderr)."""

    def run(url: str, seed_dir: Path | str, as_of: str, *extra: str) -> tuple[int, str, str]:
        monkeypatch.setenv("DATABASE_URL", url)
        capsys.readouterr()
        rc = main_in_process(["--seed-dir", str(seed_dir), "--as-of", as_of, *extra])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def dump(url: str, tables: tuple[str, ...] = ALL_TABLES) -> dict[str, list[tuple]]:
    """Every row of every pipeline table, sorted: equal dumps mean equal databases."""
    with psycopg.connect(url) as conn:
        return {
            t: sorted(conn.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr)  # noqa: S608
            for t in tables
        }


@pytest.fixture
def shared_seeds() -> Path:
    if not (SHARED_SEEDS / "month_000" / "users.csv").is_file():
        pytest.skip(f"real lab files not found in {SHARED_SEEDS}")
    return SHARED_SEEDS


def scalar(url: str, query: str, params: tuple = ()) -> object:
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchone()[0]  # type: ignore[arg-type]


@dataclass
class SilentServer:
    port: int
    taken: list[socket.socket]
    """The connections it took, and will never answer."""


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    """A port that takes TCP connections and never answers: a stuck proxy, say."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    server = SilentServer(listener.getsockname()[1], [])
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                server.taken.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(5)
        for conn in server.taken:
            conn.close()
        listener.close()


_logins = itertools.count()


def as_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(user)}:{quote(password)}@{host}"))


@contextmanager
def member_login(db_url: str, admin_url: str, group: str, password: str) -> Iterator[str]:
    """The URL of a new LOGIN role whose only privilege is membership in ``group``;
    the role is dropped after."""
    role = f"sf_{group}_login_{os.getpid()}_{next(_logins)}"
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                sql.Identifier(role), sql.Literal(password), sql.Identifier(group)
            )
        )
    try:
        yield as_user(db_url, role, password)
    finally:  # a failed test leaves no role behind (nor its settings)
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
