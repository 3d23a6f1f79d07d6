"""The docker-compose topology, as plain processes on this machine (issue 4).

    compose service   here
    ---------------   -------------------------------------------------------------
    postgres          one PostgreSQL holding the `prefect` metadata database (owned by
                      a non-superuser login, like db/init/000_prefect_db.sh) and the
                      pipeline database (db/init/*.sql, plus a login that is only a
                      member of `streamflow_ingest`, like db/init/002_ingest_login.sh)
    prefect-server    `python -m prefect server start`, PREFECT_SERVER_DATABASE_* (driver
                      postgresql+asyncpg, host, port, name, user, password) as in compose
    runner            `python ingest_flow.py serve` in services/prefect (the image's CMD,
                      cwd /app there), PREFECT_API_URL at the server, POSTGRES_* as in compose

Runs are triggered the way a person does it: `prefect deployment run … --watch`.
Everything is then checked through the Prefect REST API (flow run, task runs,
artifacts, logs), in the pipeline database, and in the Prefect UI (headless Chromium).

PostgreSQL: Prefect's PostgreSQL migrations run `CREATE EXTENSION pg_trgm`. The
`postgres:16` image ships it; the pgserver 0.1.4 wheel behind ``pg_admin_url`` does
not (no contrib modules). So the topology uses the test server when it offers
pg_trgm (e.g. TEST_DATABASE_URL at a real PostgreSQL), and otherwise starts its own
throwaway cluster from the distribution's PostgreSQL binaries (Debian:
/usr/lib/postgresql/<v>/bin, which include contrib), listening on 127.0.0.1 like the
compose `postgres` service. Override with STREAMFLOW_TOPOLOGY_PG_BIN=<bin dir>.

The screenshot of the UI goes to the test's temp dir; it is also written to
reports/img/prefect_ui_runs.png when that file is missing or UPDATE_UI_SCREENSHOT=1.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import psycopg
import pytest
from conftest import DATA_SEEDS, FLOW_DIR, REPO, SHARED_SEEDS, scalar, with_database
from month_files import prefect_server_command
from streamflow import bootstrap
from streamflow.settings import RUN_VARIABLES

pytestmark = pytest.mark.slow

FLOW_NAME = "ingest_month"
DEPLOYMENT = f"{FLOW_NAME}/ingest-month"
GOOD_AS_OF = "2024-01-31"
BAD_AS_OF = "2024-02-29"
EXPECTED_TASKS = Counter({"upsert_csv": 6, "validate_with_ge": 1, "snapshot_month": 1})
HUMAN_ERROR = "validation failed: usage_agg_30d.csv, column watch_hours_30d: 1 value(s) below 0"
SCREENSHOT = REPO / "reports" / "img" / "prefect_ui_runs.png"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    # Without it, under --virtual-time-budget the UI's route fade-in sometimes never
    # finishes: the page stays dimmed and the run list unrendered (seen 2 in 8 runs).
    "--run-all-compositor-stages-before-draw",
]
# Measured wall times, printed when the module ends (see docs/prefect_topology.md).
TIMINGS: dict[str, float] = {}
PG_LABEL: dict[str, str] = {}


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(prefect_home: Path, **extra: str) -> dict[str, str]:
    """The machine's environment without anything that steers Prefect, the flow or libpq."""
    drop = ("PREFECT_", "POSTGRES_", "GX_", "PG")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    for name in ("DATABASE_URL", *RUN_VARIABLES, "TEST_DATABASE_URL"):
        env.pop(name, None)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(prefect_home),
        DO_NOT_TRACK="1",
        GX_ANALYTICS_ENABLED="False",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Proc:
    """A long-running child in its own process group, logging to a file."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        *,
        env: dict[str, str],
        cwd: Path | None,
        log: Path,
        user: pwd.struct_passwd | None = None,
    ) -> None:
        self.name, self.log, self.env, self.cwd = name, log, env, cwd
        self._out = log.open("wb")
        kwargs = {}
        if user is not None:
            kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        self.popen = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **kwargs,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return f"--- last lines of {self.name} ({self.log}) ---\n" + "\n".join(text[-lines:])

    def stop(self, sig: int = signal.SIGTERM, grace: float = 20.0) -> float:
        """Signal the group, wait, then SIGKILL it; returns the seconds it took to exit."""
        start = time.perf_counter()
        try:
            if self.alive():
                self._signal(sig)
                try:
                    self.popen.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    self.popen.wait(timeout=10)
            # Children left in the group (none expected) go too.
            self._signal(signal.SIGKILL)
        finally:
            self._out.close()
        return time.perf_counter() - start

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass


def run_bounded(
    cmd: list[str],
    *,
    env: dict[str, str],
    timeout: float,
    cwd: Path | None = None,
    stderr: Path | None = None,
) -> tuple[int, str, float]:
    """Run to completion in its own process group; the whole group dies on time-out.

    Returns (exit code, output, seconds); stderr joins the output unless given a file.
    """
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, stderr.open("ab") if stderr else out as err:
        popen = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            rc = popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()
            rc = -9
        try:  # stragglers of a finished command (e.g. Chromium helpers)
            os.killpg(popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out.seek(0)
        text = out.read().decode(errors="replace")
    return rc, text, time.perf_counter() - start


def wait_until(what: str, check, timeout: float, *procs: Proc, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            if not p.alive():
                pytest.fail(
                    f"{p.name} exited (rc {p.popen.returncode}) while waiting for {what}\n"
                    f"{p.tail()}"
                )
        try:
            result = check()
        except Exception:  # not up yet
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out after {timeout:.0f}s waiting for {what}\n"
                + "\n".join(p.tail() for p in procs)
            )
        time.sleep(every)


# --------------------------------------------------------------------------- PostgreSQL


@dataclass
class Postgres:
    """A PostgreSQL server: its superuser URL, and how clients reach it."""

    admin_url: str
    dedicated: bool
    host: str  # an IP/name, or a Unix-socket directory
    port: int | None
    version: str = ""
    _cleanup: list = field(default_factory=list)

    @property
    def tcp(self) -> bool:
        return not self.host.startswith("/")

    def url(self, user: str, password: str, dbname: str, driver: str = "postgresql") -> str:
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}"
        if self.tcp:
            return f"{driver}://{auth}@{self.host}:{self.port or 5432}/{dbname}"
        port = f"&port={self.port}" if self.port else ""
        return f"{driver}://{auth}@/{dbname}?host={self.host}{port}"

    def runner_env(self, user: str, password: str, dbname: str) -> dict[str, str]:
        """What the runner container gets: POSTGRES_* (compose), or a URL for a socket."""
        if self.tcp:
            return {
                "POSTGRES_HOST": self.host,
                "POSTGRES_PORT": str(self.port or 5432),
                "POSTGRES_DB": dbname,
                "POSTGRES_USER": user,
                "POSTGRES_PASSWORD": password,
                "DATABASE_URL": "",
            }  # empty: a developer's .env must not win
        return {"DATABASE_URL": self.url(user, password, dbname)}

    def admin(self, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(with_database(self.admin_url, dbname), autocommit=True)


def has_pg_trgm(url: str) -> bool:
    with psycopg.connect(url) as conn:
        return (
            conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'").fetchone()
            is not None
        )


def find_pg_bin() -> Path | None:
    """A PostgreSQL bin dir whose installation has pg_trgm (Debian's postgresql-NN)."""
    override = os.environ.get("STREAMFLOW_TOPOLOGY_PG_BIN")
    if override:
        return Path(override)
    found = []
    for postgres in glob.glob("/usr/lib/postgresql/*/bin/postgres"):
        bindir = Path(postgres).parent
        version = bindir.parent.name
        if Path(f"/usr/share/postgresql/{version}/extension/pg_trgm.control").is_file():
            found.append((int(version) if version.isdigit() else 0, bindir))
    return max(found)[1] if found else None


def start_dedicated_postgres(bindir: Path) -> tuple[Postgres, Proc, Path]:
    """initdb + postgres in a new temp dir, 127.0.0.1:<free port> and a socket there."""
    user = None
    if os.geteuid() == 0:  # postgres refuses to run as root
        for name in ("postgres", "pgserver"):
            try:
                user = pwd.getpwnam(name)
                break
            except KeyError:
                continue
        else:
            pytest.skip("running as root and no 'postgres' system user to run PostgreSQL as")
    root = Path(tempfile.mkdtemp(prefix="sf-topo-pg-"))  # short: socket paths are limited
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
    init = subprocess.run(
        [
            str(bindir / "initdb"),
            "-D",
            str(root / "data"),
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        **as_user,
    )
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"initdb failed:\n{init.stdout}\n{init.stderr}")
    port = free_port()
    proc = Proc(
        "postgres",
        [
            str(bindir / "postgres"),
            "-D",
            str(root / "data"),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={root}",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ],
        env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"},
        cwd=root,
        log=Path(tempfile.gettempdir()) / f"{root.name}.log",
        user=user,
    )
    admin_url = f"postgresql://postgres@/postgres?host={root}&port={port}"
    wait_until(
        "PostgreSQL to accept connections",
        lambda: psycopg.connect(admin_url, connect_timeout=2).close() or True,
        60,
        proc,
    )
    server = Postgres(admin_url, dedicated=True, host="127.0.0.1", port=port)
    return server, proc, root


@pytest.fixture(scope="module")
def postgres(pg_admin_url: str) -> Iterator[Postgres]:
    """The compose `postgres` service: the test server if it can host Prefect, else our own."""
    if has_pg_trgm(pg_admin_url):
        parts = urlsplit(pg_admin_url)
        query = parse_qs(parts.query)
        host = parts.hostname or query.get("host", ["/tmp"])[0]
        port = parts.port or (int(query["port"][0]) if "port" in query else None)
        server = Postgres(pg_admin_url, dedicated=False, host=host, port=port)
        proc = root = None
    else:
        bindir = find_pg_bin()
        if bindir is None:
            pytest.skip(
                "the test PostgreSQL (pgserver wheel) has no pg_trgm, which Prefect's "
                "migrations need, and no PostgreSQL with contrib was found "
                "(apt-get install postgresql, or set STREAMFLOW_TOPOLOGY_PG_BIN)"
            )
        server, proc, root = start_dedicated_postgres(bindir)
    with server.admin() as conn:
        server.version = conn.execute("SHOW server_version").fetchone()[0]
    where = "own cluster, 127.0.0.1" if server.dedicated else "the test server"
    PG_LABEL["label"] = f"PostgreSQL {server.version}, {where}"
    try:
        yield server
    finally:
        for undo in reversed(server._cleanup):
            undo()
        if proc is not None:
            proc.stop(signal.SIGINT)  # fast shutdown
            proc.log.unlink(missing_ok=True)
            shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class Login:
    user: str
    password: str
    dbname: str


def suffix(pg: Postgres, name: str) -> str:
    """Compose's names on our own server; unique ones on a shared test server."""
    return name if pg.dedicated else f"{name}_{os.getpid()}"


def create_prefect_db(pg: Postgres) -> Login:
    """What db/init/000_prefect_db.sh does: a plain login owning the `prefect` database."""
    # A password a URL cannot hold as is: compose gives it to Prefect apart from its URL.
    password = "p@ss/w%rd:#?" + os.urandom(8).hex()
    login = Login(suffix(pg, "prefect"), password, suffix(pg, "prefect"))
    with pg.admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{login.dbname}" WITH (FORCE)')
        conn.execute(f'DROP ROLE IF EXISTS "{login.user}"')
        conn.execute(
            f"CREATE ROLE \"{login.user}\" LOGIN PASSWORD '{login.password}' "
            "NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION"
        )
        conn.execute(f'CREATE DATABASE "{login.dbname}" OWNER "{login.user}"')
        conn.execute(f'REVOKE ALL ON DATABASE "{login.dbname}" FROM PUBLIC')
    pg._cleanup.append(lambda: _drop(pg, login.dbname, login.user))
    return login


def create_pipeline_db(pg: Postgres, name: str) -> Login:
    """db/init/001_schema.sql, plus db/init/002_ingest_login.sh's member of streamflow_ingest."""
    login = Login(suffix(pg, "streamflow_app"), "app-" + os.urandom(8).hex(), suffix(pg, name))
    with pg.admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{login.dbname}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{login.dbname}"')
    with psycopg.connect(with_database(pg.admin_url, login.dbname)) as conn:
        bootstrap.apply_init_sql(conn)
    with pg.admin() as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (login.user,)).fetchone():
            conn.execute(
                f"CREATE ROLE \"{login.user}\" LOGIN PASSWORD '{login.password}' NOSUPERUSER "
                "NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT"
            )
            pg._cleanup.append(lambda: _drop(pg, None, login.user))
        else:
            conn.execute(f"ALTER ROLE \"{login.user}\" PASSWORD '{login.password}'")
        conn.execute(f'GRANT streamflow_ingest TO "{login.user}"')
    pg._cleanup.append(lambda: _drop(pg, login.dbname, None))
    return login


def _drop(pg: Postgres, dbname: str | None, role: str | None) -> None:
    with pg.admin() as conn:
        if dbname:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        if role:
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


# --------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    pg: Postgres
    api_url: str
    ui_url: str
    pipeline: Login
    tmp: Path
    server: Proc
    runner: Proc

    def pipeline_url(self, login: Login | None = None) -> str:
        """Superuser URL of the pipeline database (for checks)."""
        return with_database(self.pg.admin_url, (login or self.pipeline).dbname)

    def cli_env(self, name: str) -> dict[str, str]:
        return clean_env(self.tmp / f"home-{name}", PREFECT_API_URL=self.api_url)

    def client(self):
        """A sync Prefect API client for this server (settings only inside the block)."""
        from contextlib import contextmanager

        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        @contextmanager
        def session():
            with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
                with get_client(sync_client=True) as client:
                    yield client

        return session()


@pytest.fixture(scope="module")
def stack(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("topology")
    prefect_login = create_prefect_db(postgres)
    pipeline = create_pipeline_db(postgres, "streamflow")

    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    if postgres.tcp:  # as compose gives it: by parts, the password unescaped
        database = {
            "PREFECT_SERVER_DATABASE_DRIVER": "postgresql+asyncpg",
            "PREFECT_SERVER_DATABASE_HOST": postgres.host,
            "PREFECT_SERVER_DATABASE_PORT": str(postgres.port or 5432),
            "PREFECT_SERVER_DATABASE_NAME": prefect_login.dbname,
            "PREFECT_SERVER_DATABASE_USER": prefect_login.user,
            "PREFECT_SERVER_DATABASE_PASSWORD": prefect_login.password,
        }
    else:  # a socket folder is no host name: a URL
        url = postgres.url(
            prefect_login.user,
            prefect_login.password,
            prefect_login.dbname,
            driver="postgresql+asyncpg",
        )
        database = {"PREFECT_API_DATABASE_CONNECTION_URL": url}
    server_env = clean_env(
        tmp / "home-server",
        **database,
        # `--port` alone does not reach the UI: its API URL is derived from these settings
        # (default :4200). Compose sets PREFECT_SERVER_API_PORT and PREFECT_UI_API_URL too.
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_UI_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    started = time.perf_counter()
    server = Proc(
        "prefect-server",
        prefect_server_command(port),
        env=server_env,
        cwd=tmp,
        log=tmp / "prefect-server.log",
    )
    runner = None
    try:
        wait_until(
            "the Prefect server's /api/ready",
            lambda: urllib.request.urlopen(f"{api_url}/ready", timeout=3).status == 200,
            180,
            server,
            every=0.2,
        )
        TIMINGS["server startup to /api/ready (migrations on an empty DB)"] = (
            time.perf_counter() - started
        )

        # Prefect's runner keeps its storage in $TMPDIR/runner_storage, one folder for
        # every user of the machine: made by another (root's runs), it refused this one.
        (tmp / "runner-tmp").mkdir()
        runner_env = clean_env(
            tmp / "home-runner",
            TMPDIR=str(tmp / "runner-tmp"),
            PREFECT_API_URL=api_url,
            PREFECT_LOGGING_LEVEL="INFO",  # the container's default; conftest lowers it
            GX_DOCS_DIR=str(tmp / "gx_docs"),
            **postgres.runner_env(pipeline.user, pipeline.password, pipeline.dbname),
        )
        started = time.perf_counter()
        runner = Proc(
            "runner",
            [sys.executable, "ingest_flow.py", "serve"],
            env=runner_env,
            cwd=FLOW_DIR,
            log=tmp / "runner.log",
        )
        s = Stack(postgres, api_url, f"http://127.0.0.1:{port}", pipeline, tmp, server, runner)

        def deployment_served() -> bool:
            with s.client() as client:
                client.read_deployment_by_name(DEPLOYMENT)
            return "ingest-month" in runner.log.read_text(errors="replace")

        wait_until(
            f"deployment {DEPLOYMENT} and the runner's 'being served' line",
            deployment_served,
            120,
            server,
            runner,
            every=0.5,
        )
        TIMINGS["runner start to deployment served"] = time.perf_counter() - started
        yield s
    finally:
        if runner is not None:
            TIMINGS["runner stop on SIGTERM"] = runner.stop()
        TIMINGS["server stop on SIGTERM"] = server.stop()


@pytest.fixture(scope="module", autouse=True)
def print_timings(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the module (servers stopped too): the measured wall times, on the terminal."""
    yield
    if not TIMINGS:
        return
    lines = [f"\ntopology timings ({PG_LABEL.get('label', 'PostgreSQL')}):"]
    lines += [f"  {what:<62} {secs:6.1f} s" for what, secs in TIMINGS.items()]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print("\n".join(lines))
        return
    with capture.global_and_fixture_disabled():  # what capsys.disabled() does, module-wide
        print("\n".join(lines))


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def month_000() -> Path:
    """The real lab month (shared/seeds), else the generated one in data/seeds."""
    for root in (SHARED_SEEDS, DATA_SEEDS):
        if (root / "month_000" / "users.csv").is_file():
            return root / "month_000"
    pytest.skip(f"no month_000 in {SHARED_SEEDS} or {DATA_SEEDS}")


def csv_rows(path: Path) -> int:
    with path.open(newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


@dataclass
class Triggered:
    rc: int
    output: str
    seconds: float
    flow_run_id: str


def trigger(stack: Stack, seed_dir: Path, as_of: str, name: str) -> Triggered:
    """`prefect deployment run … --watch`: exit 0 on Completed, 1 on any other final state."""
    rc, out, seconds = run_bounded(
        [
            sys.executable,
            "-m",
            "prefect",
            "deployment",
            "run",
            DEPLOYMENT,
            "--param",
            f"seed_dir={seed_dir}",
            "--param",
            f"as_of={as_of}",
            "--watch",
            "--watch-timeout",
            "150",
        ],
        env=stack.cli_env(name),
        timeout=170,
    )
    match = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert match, f"no flow run created (rc {rc}):\n{out[-3000:]}\n{stack.runner.tail()}"
    return Triggered(rc, out, seconds, match.group(1))


def task_runs(client, flow_run_id: str) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    )


def logs(client, flow_run_id: str) -> list:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    found: list = []
    while True:  # the API pages at 200
        page = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
            limit=200,
            offset=len(found),
        )
        found += page
        if len(page) < 200:
            return found


def artifacts(client, flow_run_id: str) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return client.read_artifacts(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    )


def task_name(task_run) -> str:
    return task_run.name.rsplit("-", 1)[0]  # "upsert_csv-2ae" -> "upsert_csv"


@pytest.fixture(scope="module")
def good_run(stack: Stack, month_000: Path) -> Triggered:
    run = trigger(stack, month_000, GOOD_AS_OF, "good")
    assert run.rc == 0, f"{run.output[-3000:]}\n{stack.runner.tail()}"
    TIMINGS["served: trigger to Completed (`deployment run --watch`)"] = run.seconds
    return run


@pytest.fixture(scope="module")
def bad_month(month_000: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bad = tmp_path_factory.mktemp("bad") / "month_000"
    shutil.copytree(month_000, bad, copy_function=shutil.copyfile)  # the lab's may be read-only
    path = bad / "usage_agg_30d.csv"
    lines = path.read_text().splitlines(keepends=True)
    header = lines[0].rstrip("\r\n").split(",")
    col = header.index("watch_hours_30d")
    fields = lines[100].split(",")
    fields[col] = "-3.5"
    lines[100] = ",".join(fields)
    path.write_text("".join(lines))
    return bad


@pytest.fixture(scope="module")
def bad_run(stack: Stack, good_run: Triggered, bad_month: Path) -> Triggered:
    run = trigger(stack, bad_month, BAD_AS_OF, "bad")
    assert run.rc == 1, f"{run.output[-3000:]}\n{stack.runner.tail()}"
    TIMINGS["served: trigger to Failed (`deployment run --watch`)"] = run.seconds
    return run


# --------------------------------------------------------------------------- tests


def test_the_runners_healthcheck_passes_once_the_deployment_is_served(stack: Stack):
    """docker-compose.yml's runner healthcheck, run as the image would (cwd /app, the
    runner's environment): healthy once `serve` has registered the deployment, so that
    `docker compose up -d --wait` returns when `prefect deployment run` can work."""
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
    kind, program, *args = compose["services"]["runner"]["healthcheck"]["test"]
    assert (kind, program) == ("CMD", "python")
    command = [sys.executable, *args]

    def healthcheck() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, env=stack.runner.env, cwd=stack.runner.cwd, capture_output=True, text=True
        )

    # The server marks the deployment READY in the background once the runner polls:
    # a few seconds after the fixture saw it registered, on a busy machine (compose
    # retries the healthcheck every 5 s).
    deadline = time.monotonic() + 90
    while (served := healthcheck()).returncode != 0 and time.monotonic() < deadline:
        time.sleep(1)
    assert served.returncode == 0, served.stderr
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/api"
        down = subprocess.run(
            command,
            env={**stack.runner.env, "PREFECT_API_URL": closed},
            cwd=stack.runner.cwd,
            capture_output=True,
            text=True,
        )
    assert down.returncode == 1
    assert down.stderr.startswith(f"Prefect API at {closed} not reachable")
    # A deployment not (yet) served is a 404: unhealthy too; so is the record of one
    # whose runner stopped (serve pauses it on the way out).
    from streamflow import served

    with stack.client() as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        client.pause_deployment(deployment.id)
        try:
            paused = subprocess.run(
                command, env=stack.runner.env, cwd=stack.runner.cwd, capture_output=True, text=True
            )
        finally:
            client.resume_deployment(deployment.id)
    assert paused.returncode == 1
    assert "is not being served (status READY, paused True)" in paused.stderr

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(served, "DEPLOYMENT_NAME", "not-served")
        mp.setenv("PREFECT_API_URL", stack.api_url)
        assert served.main() == 1


def test_served_month_is_recorded_completed(stack: Stack, good_run: Triggered, month_000: Path):
    from prefect.client.schemas.objects import StateType

    assert "Flow run finished successfully in 'Completed'" in good_run.output
    with stack.client() as client:
        run = client.read_flow_run(good_run.flow_run_id)
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        assert client.read_flow(run.flow_id).name == FLOW_NAME
        assert run.deployment_id == deployment.id
        assert run.state_type == StateType.COMPLETED and run.state_name == "Completed"
        assert run.parameters == {"seed_dir": str(month_000), "as_of": GOOD_AS_OF}

        tasks = task_runs(client, good_run.flow_run_id)
        assert Counter(task_name(t) for t in tasks) == EXPECTED_TASKS
        assert {t.state_type for t in tasks} == {StateType.COMPLETED}

        by_key = {a.key: a for a in artifacts(client, good_run.flow_run_id)}
        summary = by_key[f"ingest-{GOOD_AS_OF}-summary"]
        table = by_key[f"ingest-{GOOD_AS_OF}-tables"]
        messages = [log.message for log in logs(client, good_run.flow_run_id)]

    assert summary.type == "markdown" and "✅ published" in summary.data
    assert table.type == "table"
    rows = table.data if isinstance(table.data, list) else json.loads(table.data)
    users = csv_rows(month_000 / "users.csv")
    assert {r["table"]: r["rows read"] for r in rows}["users"] == users
    assert len(rows) == 6
    assert any(f"users.csv: {users} rows staged" in m for m in messages)
    assert any("published live + history" in m for m in messages)

    # The runner wrote through its least-privilege login into the pipeline database.
    url = stack.pipeline_url()
    assert scalar(url, "SELECT count(*) FROM users") == users
    if month_000.parent == SHARED_SEEDS:
        assert users == 7043
    assert scalar(url, "SELECT status FROM ingest_runs WHERE as_of = %s", (GOOD_AS_OF,)) == (
        "succeeded"
    )


def test_failing_month_is_recorded_failed_with_the_human_line(
    stack: Stack, good_run: Triggered, bad_run: Triggered
):
    from prefect.client.schemas.objects import StateType

    assert "Flow run finished in state 'Failed'" in bad_run.output
    with stack.client() as client:
        run = client.read_flow_run(bad_run.flow_run_id)
        assert run.state_type == StateType.FAILED
        tasks = {task_name(t): t for t in task_runs(client, bad_run.flow_run_id)}
        messages = [log.message for log in logs(client, bad_run.flow_run_id)]
        keys = {a.key for a in artifacts(client, bad_run.flow_run_id)}

    assert tasks["validate_with_ge"].state_type == StateType.FAILED
    # Publishing ran alongside validation, then was rolled back on its verdict.
    assert tasks["snapshot_month"].state_type == StateType.FAILED
    assert "nothing published" in tasks["snapshot_month"].state.message
    human = [m for m in messages if HUMAN_ERROR in m]
    assert human, "no log line names the file and column:\n" + "\n".join(messages[-15:])
    assert all("-3.5" in m for m in human)
    assert f"ingest-{BAD_AS_OF}-summary" in keys

    # Nothing of the bad month was published; the ledger says why.
    url = stack.pipeline_url()
    assert scalar(url, "SELECT count(*) FROM ingest_months WHERE as_of = %s", (BAD_AS_OF,)) == 0
    with psycopg.connect(url) as conn:
        status, error = conn.execute(
            "SELECT status, error FROM ingest_runs WHERE as_of = %s", (BAD_AS_OF,)
        ).fetchone()
    assert status == "failed" and HUMAN_ERROR in error


def test_a_parameter_the_flow_does_not_take_is_refused_by_name(
    stack: Stack, good_run: Triggered, month_000: Path
):
    """A run sent with a misspelt parameter (the API, the UI's JSON editor) was created,
    then ended Crashed before the flow began, with no log line: the reason was only on
    the runner's console. The served deployment's schema names its parameters: the
    server refuses the run and says which name, as Prefect's CLI does."""
    from prefect.exceptions import PrefectHTTPStatusError

    with stack.client() as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        runs_before = len(client.read_flow_runs())
        with pytest.raises(PrefectHTTPStatusError) as refused:
            client.create_flow_run_from_deployment(
                deployment.id,
                parameters={"seed_dir": str(month_000), "as_of": "2024-03-31", "replce": True},
            )
        runs_after = len(client.read_flow_runs())

    assert refused.value.response.status_code == 409
    assert "Additional properties are not allowed ('replce' was unexpected)" in str(refused.value)
    assert runs_after == runs_before


def test_served_runs_start_from_the_flow_in_memory(stack: Stack, monkeypatch):
    """serve registers its flow with the runner, as Flow.serve does: a run starts from
    that flow object in a child process, not by importing the entrypoint again
    (``prefect.serve(deployment)`` would, another path than the one measured here)."""
    import ingest_flow
    from prefect.runner import Runner
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from streamflow import cli

    seen: dict[str, object] = {}

    async def started(self, *args, **kwargs) -> None:  # the runner as it would start
        [deployment_id] = self._deployment_registry.get_deployment_ids()
        seen["flow"] = self._deployment_registry.get_flow(deployment_id)

    monkeypatch.setattr(Runner, "start", started)
    with temporary_settings(updates={PREFECT_API_URL: stack.api_url}):
        cli.serve_closed(ingest_flow.ingest_month, "in-memory-probe")
    with stack.client() as client:
        probe = client.read_deployment_by_name(f"{FLOW_NAME}/in-memory-probe")
        client.delete_deployment(probe.id)

    assert seen["flow"] is ingest_flow.ingest_month


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_ui_lists_the_runs(stack: Stack, good_run: Triggered, bad_run: Triggered):
    browser = find_chromium()
    if browser is None:
        pytest.skip("no chromium binary (Debian: apt-get install -y chromium)")
    with stack.client() as client:
        names = [client.read_flow_run(r.flow_run_id).name for r in (good_run, bad_run)]

    def chromium(*args: str, budget: int) -> tuple[int, str, float]:
        profile = Path(tempfile.mkdtemp(prefix="sf-chromium-"))
        try:
            return run_bounded(
                [
                    browser,
                    *CHROMIUM_FLAGS,
                    f"--user-data-dir={profile}",
                    f"--virtual-time-budget={budget}",
                    *args,
                ],
                env=clean_env(stack.tmp / "home-chromium"),
                timeout=120,
                stderr=stack.tmp / "chromium.log",
            )
        finally:
            shutil.rmtree(profile, ignore_errors=True)

    runs_page = f"{stack.ui_url}/runs"
    for budget in (15000, 30000):  # the SPA fetches after it boots; a slow box needs longer
        started = time.perf_counter()
        # The run list is a virtual scroller: rows render only once it is in the viewport.
        rc, dom, _ = chromium("--window-size=1400,900", "--dump-dom", runs_page, budget=budget)
        (stack.tmp / f"runs-{budget}.html").write_text(dom)
        text = re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S))
        if all(n in text for n in names) and FLOW_NAME in text and "fade-enter-from" not in dom:
            break
    TIMINGS["chromium --dump-dom of /runs"] = time.perf_counter() - started
    assert rc == 0, dom[-2000:]
    assert "Can't connect to Server API" not in text, "the UI talks to the wrong API URL"
    for name in [*names, FLOW_NAME]:
        assert name in text, f"{name!r} not on {runs_page}:\n{' '.join(text.split())[:2000]}"

    shot = stack.tmp / "prefect_ui_runs.png"
    rc, out, _ = chromium(f"--screenshot={shot}", "--window-size=1400,900", runs_page, budget=15000)
    assert rc == 0 and shot.is_file(), out[-2000:]
    assert png_size(shot) == (1400, 900)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    if not SCREENSHOT.exists() or os.environ.get("UPDATE_UI_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)


def test_direct_cli_path_compared(stack: Stack, good_run: Triggered, month_000: Path):
    """The same month through `python ingest_flow.py --seed-dir … --as-of …` (runner's env)."""
    login = create_pipeline_db(stack.pg, "streamflow_cli")
    env = clean_env(
        stack.tmp / "home-cli-direct",
        PREFECT_API_URL=stack.api_url,
        GX_DOCS_DIR=str(stack.tmp / "gx_docs_cli"),
        **stack.pg.runner_env(login.user, login.password, login.dbname),
    )
    rc, out, seconds = run_bounded(
        [sys.executable, "ingest_flow.py", "--seed-dir", str(month_000), "--as-of", GOOD_AS_OF],
        env=env,
        cwd=FLOW_DIR,
        timeout=170,
    )
    assert rc == 0, out[-3000:]
    assert "published live + history" in out
    url = stack.pipeline_url(login)
    assert scalar(url, "SELECT count(*) FROM users") == csv_rows(month_000 / "users.csv")
    TIMINGS["direct CLI: process start to exit (same server, same month)"] = seconds

    def in_flow(db: str) -> float:
        timings = scalar(
            db,
            "SELECT timings FROM ingest_runs WHERE as_of = %s AND status = 'succeeded'",
            (GOOD_AS_OF,),
        )
        return sum(timings.values())

    TIMINGS["served: flow body (ledger timings)"] = in_flow(stack.pipeline_url())
    TIMINGS["direct CLI: flow body (ledger timings)"] = in_flow(url)
    with stack.client() as client:
        served = client.read_flow_run(good_run.flow_run_id)
    TIMINGS["served: flow run created -> started (dispatch)"] = (
        served.start_time - served.created
    ).total_seconds()
    TIMINGS["served: flow run started -> ended"] = (
        served.end_time - served.start_time
    ).total_seconds()
