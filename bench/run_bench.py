"""StreamFlow ingest benchmark: one run, one PostgreSQL server, every variant.

    python bench/run_bench.py --users 1000000 [--skip a,d] [--out docs/benchmarks.md]

Variants (each in its own fresh database, each step in its own process):
  a   the lab's reference way: pandas read_csv + to_sql + INSERT ... ON CONFLICT
  b   the floor: bare COPY of the six files into an empty copy of the live schema
  c   the pipeline end to end, run as users run it: the flow CLI
      (services/prefect/ingest_flow.py), Prefect's ephemeral server
  c0  the same flow body with Prefect bypassed (bench/workers.py core)
  d   the peer: dlt 1.31 (pyarrow reader, parquet via ADBC, merge upsert)
  d+  the same with a UNIQUE constraint on user_id (dlt creates no key index itself)
  o   Prefect's own overhead on a tiny month: no Prefect vs ephemeral server vs a
      running `prefect server start`

Steps: month 1 into an empty database, month 2 on top, month 2 again (unchanged).
The floor (b) runs month 1 only. Wall time is the process from spawn to exit; peak
RSS is the process's own high-water mark (VmHWM), PostgreSQL's backends apart.

The N-user month pair comes from streamflow.seeds and is cached in bench/out/.
Each run writes bench/results/users_<N>.json; --out is regenerated from all of them.
Needs: pip install --require-hashes -r services/prefect/requirements.lock (the image's
       packages) && pip install -r requirements/embedded.txt -r requirements/bench.txt
       && pip install --no-deps -e .
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
OUT = BENCH / "out"
RESULTS = BENCH / "results"
WORKERS = BENCH / "workers.py"
TINY_MONTHS = REPO / "data" / "seeds"
# The code under test: the working tree, or a `git archive` of --ref (set by main()).
SRC = REPO

AS_OF = ("2024-01-31", "2024-02-29")
STEPS = ("month1", "month2", "rerun")
STEP_TITLES = {
    "month1": "month 1, empty db",
    "month2": "month 2 on top",
    "rerun": "month 2 again (unchanged)",
}
VARIANTS = {
    "a": "(a) lab way: pandas + to_sql + ON CONFLICT",
    "b": "(b) floor: bare COPY",
    "c": "(c) pipeline, flow CLI (Prefect ephemeral)",
    "c0": "(c0) pipeline, Prefect bypassed",
    "d": "(d) dlt 1.31 parquet/ADBC upsert",
    "d+": "(d+) the same + UNIQUE (user_id)",
}
ALL_KEYS = ("a", "b", "c", "c0", "d", "d+", "o")
MB = 1024 * 1024


# ---------------------------------------------------------------------------
# PostgreSQL: a throwaway server from the pgserver wheel's binaries, on TCP.
# ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One PostgreSQL for the whole run: ours (pgserver binaries) or the given URL's."""

    def __init__(self, admin_url: str, pgdata: Path | None, bin_dir: Path | None) -> None:
        self.admin_url = admin_url
        self.pgdata = pgdata
        self.bin_dir = bin_dir
        self.run_as: str | None = None

    @classmethod
    def start(cls, root: Path, settings: dict[str, str]) -> Server:
        from pgserver._commands import POSTGRES_BIN_PATH

        run_as = None
        if os.geteuid() == 0:  # postgres refuses to run as root: pgserver's system user
            import stat

            from pgserver.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

            run_as = "pgserver"
            ensure_user_exists(run_as)
            ensure_prefix_permissions(POSTGRES_BIN_PATH)
            readable = stat.S_IRGRP | stat.S_IROTH
            ensure_folder_permissions(POSTGRES_BIN_PATH, readable | stat.S_IXGRP | stat.S_IXOTH)
            ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", readable)
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        pgdata, sockets = root / "data", root / "sock"
        pgdata.mkdir()
        sockets.mkdir()
        if run_as:
            ensure_prefix_permissions(root)
            for p in (root, pgdata, sockets):
                shutil.chown(p, run_as, run_as)
        port = _free_port()
        subprocess.run(
            [
                str(POSTGRES_BIN_PATH / "initdb"),
                "-D",
                str(pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=utf8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            user=run_as,
        )
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets}"
        for key, value in settings.items():
            opts += f" -c {key}={value}"
        subprocess.run(
            [
                str(POSTGRES_BIN_PATH / "pg_ctl"),
                "-D",
                str(pgdata),
                "-w",
                "-t",
                "60",
                "-l",
                str(pgdata / "server.log"),
                "-o",
                opts,
                "start",
            ],
            check=True,
            capture_output=True,
            user=run_as,
        )
        # Trust auth ignores the password, but dlt's config insists on one.
        url = f"postgresql://postgres:bench@127.0.0.1:{port}/postgres"
        server = cls(url, pgdata, POSTGRES_BIN_PATH)
        server.run_as = run_as
        return server

    def stop(self, save_log: Path | None = None) -> None:
        if self.pgdata is None:
            return
        if save_log is not None and (self.pgdata / "server.log").is_file():
            save_log.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.pgdata / "server.log", save_log)
        subprocess.run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "stop"],
            check=False,
            capture_output=True,
            user=self.run_as,
        )
        shutil.rmtree(self.pgdata.parent, ignore_errors=True)

    def postmaster_pid(self) -> int | None:
        if self.pgdata is None:
            return None
        try:
            return int((self.pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def url(self, dbname: str) -> str:
        return urlunsplit(urlsplit(self.admin_url)._replace(path="/" + dbname))

    def fresh_database(self, dbname: str) -> str:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{dbname}"')
        return self.url(dbname)

    def drop_database(self, dbname: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')

    def describe(self) -> dict[str, str]:
        import psycopg

        names = (
            "server_version",
            "shared_buffers",
            "work_mem",
            "maintenance_work_mem",
            "max_wal_size",
            "fsync",
            "synchronous_commit",
            "wal_level",
        )
        with psycopg.connect(self.admin_url) as conn:
            info = {n: conn.execute(f"SHOW {n}").fetchone()[0] for n in names}
            info["version"] = conn.execute("SELECT version()").fetchone()[0]
        info["where"] = (
            "pgserver wheel binaries, started by the bench" if self.pgdata else "given URL"
        )
        return info


# ---------------------------------------------------------------------------
# Memory: the child's own peak (VmHWM), its descendants, PostgreSQL's backends.
# ---------------------------------------------------------------------------
def _status_kb(pid: int, field_name: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process, from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, ValueError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


class Monitor(threading.Thread):
    """Polls /proc every 50 ms while a step runs.

    VmHWM is the kernel's high-water mark of a process's RSS, so the last value read
    is exact up to the final interval. PostgreSQL is reported as the peak of the sum
    of its processes' private memory (RssAnon; shared_buffers are not counted).
    """

    def __init__(self, pid: int, pg_pid: int | None, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.pg_pid, self.interval = pid, pg_pid, interval
        self.main_hwm_kb = 0
        self.child_hwm_kb: dict[int, int] = {}
        self.pg_peak_kb = 0
        self.pg_cpu_start: dict[int, float] = {}
        self.pg_cpu_last: dict[int, float] = {}
        self._first = True
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def sample(self) -> None:
        hwm = _status_kb(self.pid, "VmHWM")
        if hwm:
            self.main_hwm_kb = max(self.main_hwm_kb, hwm)
        for child in _children(self.pid):
            h = _status_kb(child, "VmHWM")
            if h:
                self.child_hwm_kb[child] = max(self.child_hwm_kb.get(child, 0), h)
        if self.pg_pid:
            pids = [self.pg_pid, *_children(self.pg_pid)]
            total = sum(_status_kb(p, "RssAnon") or 0 for p in pids)
            self.pg_peak_kb = max(self.pg_peak_kb, total)
            for p in pids:
                cpu = _cpu_seconds(p)
                if cpu is None:
                    continue
                if p not in self.pg_cpu_last:  # new backends start from zero
                    self.pg_cpu_start[p] = cpu if self._first else 0.0
                self.pg_cpu_last[p] = cpu
            self._first = False

    @property
    def pg_cpu(self) -> float:
        """CPU seconds PostgreSQL's processes used during the step (sampled)."""
        return sum(last - self.pg_cpu_start.get(p, 0.0) for p, last in self.pg_cpu_last.items())

    def stop(self) -> None:
        self._halt.set()
        self.join()


@dataclass
class Run:
    variant: str
    step: str
    wall: float | None = None
    work: float | None = None
    cpu: float | None = None
    pg_cpu: float | None = None
    rss_mb: float | None = None
    children_mb: float | None = None
    pg_mb: float | None = None
    ok: bool = False
    error: str | None = None
    detail: dict = field(default_factory=dict)


def run_process(
    cmd: list[str], env: dict[str, str], log: Path, pg_pid: int | None
) -> tuple[float, int, dict]:
    """Spawn, wait with wait4 (exact rusage of that child), return (wall, rc, memory)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        monitor = Monitor(proc.pid, pg_pid)
        monitor.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        monitor.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
    # VmHWM belongs to the process image, so it starts afresh at exec. ru_maxrss does
    # not: it also counts the driver's pages the child had between fork and exec (an
    # early run showed the driver's 111 MB for a 35 MB worker), so it is only a
    # fallback when polling saw nothing (a process that lived under 50 ms).
    main_kb = monitor.main_hwm_kb or usage.ru_maxrss
    memory = {
        "cpu": usage.ru_utime + usage.ru_stime,
        "pg_cpu": monitor.pg_cpu if pg_pid else None,
        "rss_mb": main_kb / 1024,
        "children_mb": sum(monitor.child_hwm_kb.values()) / 1024 if monitor.child_hwm_kb else None,
        "pg_mb": monitor.pg_peak_kb / 1024 if pg_pid else None,
    }
    return wall, proc.returncode, memory


def bench_result(log: Path) -> dict:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT ") :])
    return {}


def tail(log: Path, lines: int = 5) -> str:
    text = log.read_text(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:])[-600:]


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------
def base_env() -> dict[str, str]:
    """This process's environment for a variant's process: the pipeline's own variables
    of the caller's shell removed, the bench's Prefect and GX homes under bench/out."""
    env = {k: v for k, v in os.environ.items()}
    for name in (
        "DATABASE_URL",
        "POSTGRES_HOST",
        "SEED_DIR",
        "AS_OF",
        "REPLACE",
        "ALLOW_GAP",
        "ALLOW_DROP",
        "MAX_USERS_DROP_PERCENT",
        "PREFECT_API_URL",
        "PREFECT_PROFILE",
    ):
        env.pop(name, None)
    env.update(
        PREFECT_HOME=str(OUT / "prefect_home"),
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # Prefect waits 20 s by default for its ephemeral server; on this shared
        # 2-core machine a first start (SQLite migrations) took longer and the flow
        # failed. A bench measures time, so it waits instead (docs/performance.md).
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        GX_ANALYTICS_ENABLED="False",
        GX_DOCS_DIR=str(OUT / "gx_docs"),
        RUNTIME__DLTHUB_TELEMETRY="false",
        PYTHONUNBUFFERED="1",
        BENCH_FLOW_DIR=str(SRC / "services" / "prefect"),
    )
    return env


def latest_run(url: str) -> dict:
    """The flow's latest ingest_runs row: as_of, status, mode and per-step seconds."""
    import psycopg

    try:
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT run_id, as_of, status, mode, timings FROM ingest_runs "
                "ORDER BY run_id DESC LIMIT 1"
            ).fetchone()
    except psycopg.Error:
        return {}
    if row is None:
        return {}
    run_id, as_of, status, mode, timings = row
    return {
        "run_id": run_id,
        "as_of": as_of,
        "status": status,
        "mode": mode,
        "timings": timings or {},
    }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.users = args.users
        self.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
        unknown = self.skip - set(ALL_KEYS)
        if unknown:
            raise SystemExit(f"--skip: unknown variant(s) {', '.join(sorted(unknown))}")
        self.logs = OUT / "logs" / f"users_{self.users}"
        self.runs: list[Run] = []
        self.overhead: dict = {}
        self.server: Server | None = None
        self.env = self._base_env()

    def _base_env(self) -> dict[str, str]:
        return base_env()

    # -- data ---------------------------------------------------------------
    def months(self) -> tuple[list[Path], float | None]:
        from streamflow import seeds

        root = OUT / "seeds" / f"users_{self.users}"
        done = root / ".complete"
        folders = [root / "month_000", root / "month_001"]
        if done.is_file() and all((f / "labels.csv").is_file() for f in folders):
            return folders, None
        print(f"generating {self.users:,} users x 2 months into {root} ...", flush=True)
        start = time.perf_counter()
        seeds.generate(root, self.users, 2, seed=42)
        took = time.perf_counter() - start
        done.write_text(f"users={self.users} months=2 seed=42\n")
        return folders, took

    # -- steps --------------------------------------------------------------
    def step(self, variant: str, step: str, cmd: list[str], env: dict[str, str]) -> Run:
        log = self.logs / f"{variant}_{step}.log"
        pg_pid = self.server.postmaster_pid() if self.server else None
        run = Run(variant, step)
        try:
            wall, rc, memory = run_process(cmd, env, log, pg_pid)
        except OSError as exc:
            run.error = repr(exc)
            return run
        run.wall = wall
        run.cpu, run.pg_cpu = memory["cpu"], memory["pg_cpu"]
        run.rss_mb, run.children_mb, run.pg_mb = (
            memory["rss_mb"],
            memory["children_mb"],
            memory["pg_mb"],
        )
        result = bench_result(log)
        run.work = result.pop("work", None)
        run.detail.update(result)
        run.ok = rc == 0
        if rc != 0:
            run.error = f"exit {rc}: {tail(log)}"
        status = "ok" if run.ok else "FAILED"
        print(
            f"  {variant:>2} {step:<7} {status:<6} wall {wall:7.2f}s  "
            f"rss {run.rss_mb:7.1f} MB" + (f"  ({run.error})" if run.error else ""),
            flush=True,
        )
        self.runs.append(run)
        return run

    def worker_cmd(self, variant: str, url: str, month: Path, as_of: str, *extra: str) -> list[str]:
        return [sys.executable, str(WORKERS), variant, url, str(month), as_of, *extra]

    def flow_cmd(self, month: Path, as_of: str) -> list[str]:
        flow = SRC / "services" / "prefect" / "ingest_flow.py"
        return [sys.executable, str(flow), "--seed-dir", str(month), "--as-of", as_of]

    def counts(self, url: str, tables: list[str], schema: str = "public") -> dict[str, int]:
        import psycopg
        from psycopg import sql

        out = {}
        with psycopg.connect(url) as conn:
            for t in tables:
                q = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, t))
                try:
                    out[t] = conn.execute(q).fetchone()[0]
                except psycopg.Error:
                    conn.rollback()
        return out

    def apply_schema(self, url: str) -> None:
        import psycopg

        try:
            from streamflow.bootstrap import apply_init_sql
        except ImportError:  # a --ref from before db.py was split (7ebff19 and earlier)
            from streamflow.db import apply_init_sql

        with psycopg.connect(url) as conn:
            apply_init_sql(conn)

    # -- variants -------------------------------------------------------------
    def variant_a(self, months: list[Path]) -> None:
        from streamflow.registry import LIVE_TABLES

        url = self.server.fresh_database("bench_a")
        self.apply_schema(url)
        for step, month, as_of in self._plan(months):
            run = self.step("a", step, self.worker_cmd("baseline", url, month, as_of), self.env)
            if not run.ok:
                break
        self._finish("a", url, "bench_a", list(LIVE_TABLES))

    def variant_b(self, months: list[Path]) -> None:
        from streamflow.registry import LIVE_TABLES

        url = self.server.fresh_database("bench_b")
        self.apply_schema(url)
        self.step("b", "month1", self.worker_cmd("floor", url, months[0], AS_OF[0]), self.env)
        self._finish("b", url, "bench_b", list(LIVE_TABLES))

    def variant_c(self, months: list[Path], *, core: bool) -> None:
        from streamflow.registry import LIVE_TABLES, SNAPSHOT_TABLES

        key = "c0" if core else "c"
        dbname = f"bench_{key}"
        url = self.server.fresh_database(dbname)  # empty: the flow creates its schema
        env = dict(self.env, DATABASE_URL=url)
        for step, month, as_of in self._plan(months):
            cmd = (
                self.worker_cmd("core", url, month, as_of) if core else self.flow_cmd(month, as_of)
            )
            run = self.step(key, step, cmd, env)
            run.detail["ledger"] = latest_run(url)
            if core and run.ok:
                run.detail.pop("flow", None)
            if not run.ok:
                break
        self._finish(key, url, dbname, list(LIVE_TABLES + SNAPSHOT_TABLES))

    def variant_d(self, months: list[Path], *, unique: bool) -> None:
        from streamflow.registry import LIVE_TABLES

        key, worker = ("d+", "dlt-unique") if unique else ("d", "dlt")
        dbname = "bench_du" if unique else "bench_d"
        url = self.server.fresh_database(dbname)
        state = OUT / "dlt_pipelines" / f"users_{self.users}_{worker}"
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir(parents=True)
        for step, month, as_of in self._plan(months):
            cmd = self.worker_cmd(worker, url, month, as_of, str(state))
            if not self.step(key, step, cmd, self.env).ok:
                break
        self._finish(key, url, dbname, list(LIVE_TABLES), schema="streamflow")

    def _plan(self, months: list[Path]) -> list[tuple[str, Path, str]]:
        return [
            ("month1", months[0], AS_OF[0]),
            ("month2", months[1], AS_OF[1]),
            ("rerun", months[1], AS_OF[1]),
        ]

    def _finish(
        self, key: str, url: str, dbname: str, tables: list[str], schema: str = "public"
    ) -> None:
        counts = self.counts(url, tables, schema)
        for run in self.runs:
            if run.variant == key:
                run.detail["final_counts"] = counts
        if not self.args.keep_dbs:
            self.server.drop_database(dbname)

    # -- Prefect's overhead ----------------------------------------------------
    def prefect_overhead(self) -> None:
        """Tiny month (the committed 7,043-user seeds), first month on a fresh db each time."""
        month = TINY_MONTHS / "month_000"
        repeats = self.args.repeats
        print(f"Prefect overhead on {month} ({repeats} runs per mode) ...", flush=True)
        # A first ever ephemeral run creates and migrates the SQLite db in PREFECT_HOME:
        # time it once in an empty PREFECT_HOME, as the cold start a new user sees.
        cold_home = OUT / f"prefect_home_cold-{os.getpid()}"
        shutil.rmtree(cold_home, ignore_errors=True)
        cold_env = dict(self.env, PREFECT_HOME=str(cold_home))
        cold = self._overhead_run("ephemeral-cold", month, cold_env, flow=True)
        shutil.rmtree(cold_home, ignore_errors=True)
        # Warm runs use the bench's PREFECT_HOME: make sure it has been used once.
        self._overhead_run("ephemeral-warmup", month, self.env, flow=True)
        modes: dict[str, list[Run]] = {"none": [], "ephemeral": [], "server": []}
        server = PrefectServer.start(OUT / "prefect_server_home", self.env, self.logs)
        try:
            server_env = dict(self.env, PREFECT_API_URL=server.api_url)
            # one unmeasured run registers the flow with the fresh server
            self._overhead_run("server-warmup", month, server_env, flow=True)
            for i in range(repeats):
                modes["none"].append(self._overhead_run(f"none-{i}", month, self.env, flow=False))
                modes["ephemeral"].append(
                    self._overhead_run(f"ephemeral-{i}", month, self.env, flow=True)
                )
                modes["server"].append(
                    self._overhead_run(f"server-{i}", month, server_env, flow=True)
                )
        finally:
            server.stop()
        self.overhead = {
            "month": str(month.relative_to(REPO)),
            "repeats": repeats,
            "cold": asdict(cold),
            "modes": {m: [asdict(r) for r in rs] for m, rs in modes.items()},
            "server_startup": server.startup,
        }

    def _overhead_run(self, label: str, month: Path, env: dict[str, str], *, flow: bool) -> Run:
        dbname = "bench_o"
        url = self.server.fresh_database(dbname)
        env = dict(env, DATABASE_URL=url)
        cmd = (
            self.flow_cmd(month, AS_OF[0])
            if flow
            else self.worker_cmd("core", url, month, AS_OF[0])
        )
        run = self.step("o", label, cmd, env)
        self.runs.remove(run)
        run.detail["ledger"] = latest_run(url)
        run.detail.pop("flow", None)
        self.server.drop_database(dbname)
        return run

    # -- everything -------------------------------------------------------------
    def run(self) -> dict:
        started = dt.datetime.now(dt.UTC)
        months, gen_seconds = self.months()
        sizes = {m.name: sum(f.stat().st_size for f in m.glob("*.csv")) for m in months}
        # Not DATABASE_URL: the bench drops its databases WITH (FORCE) on that server, and
        # the pipeline's own server is no place for that (the README has users export it).
        given = os.environ.get("BENCH_DATABASE_URL")
        if given and self.args.pg_conf:
            raise SystemExit(
                "--pg-conf configures the server the bench starts; with BENCH_DATABASE_URL "
                "set it would be ignored: configure that server instead, or unset it"
            )
        if given:
            self.server = Server(given, None, None)
        else:
            settings = dict(kv.split("=", 1) for kv in self.args.pg_conf)
            # One directory per run: never reuse (and wipe) another run's server.
            self.server = Server.start(OUT / f"pg-{os.getpid()}", settings)
        load_before = os.getloadavg()
        try:
            pg = self.server.describe()
            print(f"PostgreSQL {pg['server_version']} at {self.server.admin_url}", flush=True)
            if "o" not in self.skip:
                self.prefect_overhead()
            print(f"{self.users:,} users: {sizes}", flush=True)
            for key, call in (
                ("b", lambda: self.variant_b(months)),
                ("c", lambda: self.variant_c(months, core=False)),
                ("c0", lambda: self.variant_c(months, core=True)),
                ("d", lambda: self.variant_d(months, unique=False)),
                ("d+", lambda: self.variant_d(months, unique=True)),
                ("a", lambda: self.variant_a(months)),
            ):
                if key not in self.skip:
                    print(VARIANTS[key], flush=True)
                    call()
        finally:
            if not self.args.keep_server:
                self.server.stop(save_log=self.logs / "postgres.log")
        return {
            "users": self.users,
            "started": started.isoformat(timespec="seconds"),
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": "python bench/run_bench.py " + " ".join(sys.argv[1:]),
            "skipped": sorted(self.skip),
            "machine": machine(),
            "load_average": {"before": load_before, "after": os.getloadavg()},
            "postgres": pg,
            "data": {"csv_bytes": sizes, "generate_seconds": gen_seconds},
            "runs": [asdict(r) for r in self.runs],
            "overhead": self.overhead,
        }


class PrefectServer:
    """`prefect server start` on a free local port, its own PREFECT_HOME (SQLite)."""

    def __init__(self, proc: subprocess.Popen, api_url: str, startup: float, log) -> None:
        self.proc, self.api_url, self.startup, self._log = proc, api_url, startup, log

    @classmethod
    def start(cls, home: Path, env: dict[str, str], logs: Path) -> PrefectServer:
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        port = _free_port()
        env = dict(env, PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false")
        logs.mkdir(parents=True, exist_ok=True)
        log = (logs / "prefect_server.log").open("w")
        prefect = Path(sys.executable).with_name("prefect")
        start = time.perf_counter()
        proc = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        api = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited ({proc.returncode}); see {log.name}")
            try:
                with urllib.request.urlopen(api + "/health", timeout=2) as r:
                    if r.status == 200:
                        return cls(proc, api, time.perf_counter() - start, log)
            except OSError:
                time.sleep(0.5)
        proc.terminate()
        raise RuntimeError("prefect server did not answer /api/health within 120 s")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()


def checkout(ref: str | None) -> dict:
    """Point SRC at the code to measure: the working tree, or an export of ``ref``.

    Other people edit the working tree while a long run goes on; --ref HEAD measures
    one committed version whatever happens to the files meanwhile.
    """
    global SRC
    head = _git("rev-parse", "HEAD")
    if ref is None:
        SRC = REPO
        dirty = _git("status", "--porcelain", "--", "services/prefect", "db").splitlines()
        info = {"code": "working tree", "head": head, "dirty": dirty}
    else:
        sha = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
        dest = OUT / "src" / sha[:12]
        if not (dest / ".complete").is_file():
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            archive = subprocess.run(
                ["git", "archive", sha, "services/prefect", "db"],
                cwd=REPO,
                check=True,
                capture_output=True,
            )
            subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
            (dest / ".complete").write_text(sha + "\n")
        SRC = dest
        info = {"code": f"git archive of {ref}", "commit": sha, "head": head}
    sys.path.insert(0, str(SRC / "services" / "prefect"))
    return info


def side_bench(users: int, ref: str | None) -> tuple[Bench, list[Path]]:
    """The code and the cached month pair of a run, for a side script that starts its own server.

    Used by explain_publish.py and orphan_checks.py.
    """
    checkout(ref)
    bench = Bench(argparse.Namespace(users=users, skip="", keep_dbs=False, repeats=1, pg_conf=[]))
    months, _ = bench.months()
    return bench, months


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ratio(x: float | None, y: float | None) -> str:
    return "-" if not x or not y else f"{x / y:.2f}×"


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _runs(result: dict) -> dict[tuple[str, str], dict]:
    return {(r["variant"], r["step"]): r for r in result["runs"]}


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get("ok") and r.get(key) is not None]
    return statistics.median(values) if values else None


def _flow_seconds(run: dict) -> float | None:
    timings = run.get("detail", {}).get("ledger", {}).get("timings") or {}
    return round(sum(timings.values()), 3) if timings else None


def _wall(runs: dict, key: str, step: str) -> float | None:
    r = runs.get((key, step))
    return r["wall"] if r and r["ok"] else None


def _describe_source(src: dict) -> str:
    code = src.get("code", "?")
    if "commit" in src:
        return f"{code} = {src['commit'][:12]}"
    if src:
        dirty = src.get("dirty") or []
        state = f"uncommitted changes in {len(dirty)} file(s)" if dirty else "clean"
        return f"{code} at {src['head'][:12]}, {state}"
    return code


def render_header(result: dict) -> list[str]:
    m, pg = result["machine"], result["postgres"]
    load = result["load_average"]
    carried = result.get("carried", {})
    left = [k for k in result["skipped"] if k not in carried]
    skipped = f" (skipped: {', '.join(left)})" if left else ""
    sizes = ", ".join(f"{k} {v / MB:.1f} MB" for k, v in result["data"]["csv_bytes"].items())
    return [
        f"Run {result['started']} → {result['finished']} UTC: `{result['command']}`{skipped}",
        "",
        f"- Code measured: {_describe_source(result.get('source', {}))}",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM; "
        f"Python {m['python']}; {m['platform']}",
        f"- PostgreSQL {pg['server_version']} ({pg['where']}): "
        f"shared_buffers {pg['shared_buffers']}, work_mem {pg['work_mem']}, "
        f"max_wal_size {pg['max_wal_size']}, fsync {pg['fsync']}, "
        f"synchronous_commit {pg['synchronous_commit']}",
        "- Load average (1/5/15 min) before: {} after: {} (the machine is shared)".format(
            "/".join(f"{x:.2f}" for x in load["before"]),
            "/".join(f"{x:.2f}" for x in load["after"]),
        ),
        f"- Input (CSV): {sizes}",
    ] + [
        f"- Variant {k} not rerun: its figures are from the run started {when['started']} "
        f"(code: {_describe_source(when.get('source', {}))})"
        for k, when in sorted(carried.items())
    ]


def render_runs(runs: dict) -> list[str]:
    lines = [
        _row(
            "variant",
            "step",
            "wall s",
            "work s",
            "CPU s",
            "PG CPU s",
            "peak RSS MB",
            "+ children MB",
            "PG MB",
            "result",
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, title in VARIANTS.items():
        for step in STEPS:
            r = runs.get((key, step))
            if r is None:
                continue
            work = _flow_seconds(r) if key == "c" else r.get("work")
            outcome = "ok" if r["ok"] else f"FAILED: {r['error']}"
            led = r.get("detail", {}).get("ledger") or {}
            if led:
                outcome = f"{led.get('status')} ({led.get('mode')})"
            lines.append(
                _row(
                    title,
                    STEP_TITLES[step],
                    _fmt(r["wall"]),
                    _fmt(work),
                    _fmt(r.get("cpu")),
                    _fmt(r.get("pg_cpu")),
                    _fmt(r["rss_mb"], 0),
                    _fmt(r["children_mb"], 0),
                    _fmt(r["pg_mb"], 0),
                    outcome,
                )
            )
    return lines


def render_ratios(runs: dict) -> list[str]:
    lines = [
        _row("ratio (wall time)", "month 1", "month 2", "unchanged rerun", "target"),
        "|---|---:|---:|---:|---|",
    ]
    spec = [
        ("c / b (pipeline CLI / bare COPY)", "c", "b", "≤ 1.0× (month 1)", ("month1",)),
        ("c0 / b (pipeline w/o Prefect / bare COPY)", "c0", "b", "", ("month1",)),
        ("a / c (lab way / pipeline CLI)", "a", "c", "≥ 10×", STEPS),
        ("a / c0 (lab way / pipeline w/o Prefect)", "a", "c0", "", STEPS),
        ("c / d (pipeline CLI / dlt)", "c", "d", "≤ 1.0× every step", STEPS),
        ("c0 / d (pipeline w/o Prefect / dlt)", "c0", "d", "", STEPS),
        ("c / d+ (pipeline CLI / dlt + UNIQUE)", "c", "d+", "", STEPS),
    ]
    for label, num, den, target, steps in spec:
        cells = [
            _ratio(_wall(runs, num, s), _wall(runs, den, s)) if s in steps else "-" for s in STEPS
        ]
        lines.append(_row(label, *cells, target))
    return lines


def render_profile(runs: dict) -> list[str]:
    profile = [(k, s, runs.get((k, s))) for k in ("c", "c0") for s in STEPS]
    profile = [(k, s, r) for k, s, r in profile if r and _flow_seconds(r) is not None]
    if not profile:
        return []
    names: list[str] = []
    for _, _, r in profile:
        for name in r["detail"]["ledger"]["timings"]:
            if name not in names:
                names.append(name)
    lines = [
        _row("run", "step", *names, "sum", "wall", "wall − sum"),
        "|---|---|" + "---:|" * (len(names) + 3),
    ]
    for key, step, r in profile:
        t = r["detail"]["ledger"]["timings"]
        total = _flow_seconds(r)
        cells = [_fmt(t.get(nm), 3) for nm in names]
        lines.append(
            _row(
                key,
                STEP_TITLES[step],
                *cells,
                _fmt(total),
                _fmt(r["wall"]),
                _fmt(r["wall"] - total),
            )
        )
    return lines


def render_overhead(ov: dict) -> list[str]:
    if not ov.get("modes"):
        return []
    base = _median(ov["modes"]["none"], "wall")
    labels = {
        "none": "no Prefect (flow body, tasks as plain functions)",
        "ephemeral": "flow CLI, no PREFECT_API_URL (ephemeral server)",
        "server": "flow CLI, PREFECT_API_URL = running `prefect server start`",
    }
    lines = [
        _row(
            "mode",
            "wall s",
            "pipeline steps s",
            "wall − no-Prefect wall",
            "CPU s",
            "peak RSS MB",
            "+ children MB",
        ),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def line(label: str, rs: list[dict]) -> str:
        w = _median(rs, "wall")
        steps_s = [x for x in (_flow_seconds(r) for r in rs if r["ok"]) if x is not None]
        extra = None if w is None or base is None else w - base
        return _row(
            label,
            _fmt(w),
            _fmt(statistics.median(steps_s) if steps_s else None),
            _fmt(extra),
            _fmt(_median(rs, "cpu")),
            _fmt(_median(rs, "rss_mb"), 0),
            _fmt(_median(rs, "children_mb"), 0),
        )

    for mode, label in labels.items():
        lines.append(line(label, ov["modes"][mode]))
    cold = dict(ov["cold"], ok=True)
    lines.append(line("first ever ephemeral run (creates PREFECT_HOME's SQLite db)", [cold]))
    lines += [
        "",
        f"`prefect server start` took {ov['server_startup']:.1f} s to answer /api/health "
        "(paid once, not per run).",
    ]
    return lines


def render_targets(runs: dict) -> list[str]:
    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "**not met**")

    def both(x: float | None, y: float | None) -> bool:
        return x is not None and y is not None

    out = [_row("target", "measured", "verdict"), "|---|---|---|"]
    c1, b1 = _wall(runs, "c", "month1"), _wall(runs, "b", "month1")
    out.append(
        _row(
            "month 1 ≤ 1.0× bare COPY", _ratio(c1, b1), verdict(c1 <= b1 if both(c1, b1) else None)
        )
    )
    for step in STEPS:
        c, d = _wall(runs, "c", step), _wall(runs, "d", step)
        out.append(
            _row(
                f"{STEP_TITLES[step]} ≤ 1.0× dlt",
                _ratio(c, d),
                verdict(c <= d if both(c, d) else None),
            )
        )
    for step in STEPS:
        a, c = _wall(runs, "a", step), _wall(runs, "c", step)
        out.append(
            _row(
                f"{STEP_TITLES[step]}: lab way ≥ 10× slower",
                _ratio(a, c),
                verdict(a >= 10 * c if both(a, c) else None),
            )
        )
    peaks = [runs[("c", s)]["rss_mb"] for s in STEPS if runs.get(("c", s), {}).get("ok")]
    peak = max(peaks) if peaks else None
    out.append(
        _row(
            "flow process peak RSS ≤ 200 MB",
            f"{_fmt(peak, 0)} MB",
            verdict(None if peak is None else peak <= 200),
        )
    )
    rr = _wall(runs, "c", "rerun")
    out.append(
        _row("unchanged rerun ≤ 2 s", f"{_fmt(rr)} s", verdict(None if rr is None else rr <= 2))
    )
    return out


def render_section(result: dict) -> str:
    runs = _runs(result)
    lines = [f"## {result['users']:,} users", "", *render_header(result), ""]
    lines += render_runs(runs)
    lines += ["", "### Ratios", "", *render_ratios(runs)]
    profile = render_profile(runs)
    if profile:
        lines += ["", "### Where the pipeline's time goes (ledger `ingest_runs.timings`, s)", ""]
        lines += profile
    overhead = render_overhead(result.get("overhead") or {})
    if overhead:
        ov = result["overhead"]
        lines += [
            "",
            f"### Prefect's overhead (`{ov['month']}`, month 1 on a fresh database, "
            f"median of {ov['repeats']})",
            "",
            *overhead,
        ]
    lines += ["", "### Targets for the pipeline (c)", "", *render_targets(runs)]
    return "\n".join(lines) + "\n"


INTRO = """\
# Benchmarks

Generated by `bench/run_bench.py` from `bench/results/users_*.json`, one section per
user count (the latest run of each). Edit the script, not this file; see
[performance.md](performance.md) for what the numbers mean.

Everything runs on one PostgreSQL server, each variant in its own fresh database,
each step in its own process:

- **(a)** the lab's reference way, reimplemented in `bench/workers.py`: per table
  `pandas.read_csv` → `DataFrame.to_sql` (scratch table, pandas defaults) →
  `INSERT … SELECT … ON CONFLICT (user_id) DO UPDATE` of every column. Live tables
  only: no validation, no history, no ledger, so it does less work than (c).
- **(b)** the floor: `COPY … FROM STDIN` of the six files, streamed like `\\copy`,
  into the empty live tables (primary and foreign keys in place). Month 1 only.
- **(c)** the pipeline as users run it: `python services/prefect/ingest_flow.py
  --seed-dir … --as-of …` with `DATABASE_URL` set and no `PREFECT_API_URL`, so
  Prefect starts its ephemeral API server: stage (COPY), then validate (GX in
  PostgreSQL, driven from a child Python process) and, at the same time on another
  connection, publish live + as_of snapshots + ledger in one transaction that
  commits only once every expectation passed. Month 1 starts from an empty database
  (the flow creates its schema). An unchanged month is answered by the CLI before
  it imports Prefect or GX (since f7b8f7c).
- **(c0)** the same flow body with Prefect bypassed: the tasks called as plain
  functions (`Task.fn`), no flow or task runs, no API server.
- **(d)** dlt 1.31.0: one resource per file yielding record batches from pyarrow's
  streaming CSV reader, `loader_file_format="parquet"` (loaded through ADBC,
  `adbc-driver-postgresql`), `write_disposition={"disposition": "merge",
  "strategy": "upsert", "skip_unchanged_rows": True}`, `primary_key="user_id"`.
  dlt creates no primary key, index or foreign key on postgres (`primary_key` only
  drives the MERGE) and keeps no history; numerics load as double precision.
- **(d+)** the same with the column hint `{"user_id": {"unique": True}}`, which dlt
  turns into a UNIQUE constraint: the destination then maintains an index on the
  key, as the pipeline's primary keys do.

Environment of every step: its own `PREFECT_HOME` under `bench/out/`, analytics
off, and `PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120` (Prefect's default
is 20 s; on the loaded machine a first ephemeral start took longer and the flow
failed with "Timed out while attempting to connect to ephemeral Prefect API
server"). PostgreSQL runs with its defaults unless the run says otherwise.

Steps: month 1 (`month_000`, as_of 2024-01-31) into an empty database, month 2
(`month_001`, as_of 2024-02-29) on top, month 2 again, unchanged. Months come from
`streamflow.seeds` (seed 42); every user is in both months.

Columns: **wall** = process spawn to exit, interpreter start and imports included
(what the ratios use). **work** = the same minus start-up and imports (for (c): the
sum of the ledger's step timings). **CPU** = the process's user + system CPU
(`wait4`, its waited-for children included). **PG CPU** = PostgreSQL's processes'
CPU during the step (sampled every 50 ms from /proc). **peak RSS** = the process's
own high-water mark (VmHWM); **+ children** = the sum of its child processes' peaks
(for (c): Prefect's ephemeral API server and, since 1a0b353, the GX process);
**PG MB** = peak of PostgreSQL's private memory (sum of RssAnon over its processes;
shared_buffers not counted).
"""


def render_scaling(results: list[dict]) -> list[str]:
    """One line per user count: how (c) grows, next to the floor and the peer."""
    lines = [
        "## Scaling of the pipeline (c), all runs",
        "",
        _row("users", "code", "c month 1 s", "c month 2 s", "c rerun s", "c peak RSS MB",
             "b month 1 s", "d month 1 s", "c / b month 1", "load avg (1 min)"),
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    for r in results:
        runs = _runs(r)
        c1 = _wall(runs, "c", "month1")
        peaks = [runs[("c", s)]["rss_mb"] for s in STEPS if runs.get(("c", s), {}).get("ok")]
        load = r["load_average"]
        lines.append(
            _row(
                f"{r['users']:,}", _commit(r.get("source", {})), _fmt(c1),
                _fmt(_wall(runs, "c", "month2")),
                _fmt(_wall(runs, "c", "rerun")), _fmt(max(peaks) if peaks else None, 0),
                _fmt(_wall(runs, "b", "month1")), _fmt(_wall(runs, "d", "month1")),
                _ratio(c1, _wall(runs, "b", "month1")),
                f"{load['before'][0]:.1f} → {load['after'][0]:.1f}",
            )
        )  # fmt: skip
    return lines


def _commit(source: dict) -> str:
    """The measured commit, short; runs of different code share the scaling table."""
    if source.get("commit"):
        return f"`{source['commit'][:7]}`"
    if source.get("head"):
        return f"`{source['head'][:7]}`" + (" + changes" if source.get("dirty") else "")
    return "?"


def render(results: list[dict]) -> str:
    ordered = sorted(results, key=lambda r: r["users"])
    body = [render_section(r) for r in ordered]
    scaling = "\n".join(render_scaling(ordered)) + "\n"
    return INTRO + "\n" + scaling + "\n" + "\n".join(body)


def carry_over(result: dict, path: Path) -> None:
    """Keep the previous run's figures for the variants this run skipped."""
    if not path.is_file() or not result["skipped"]:
        return
    old = json.loads(path.read_text())
    carried: dict[str, dict] = {}
    for key in result["skipped"]:
        origin = {"started": old["started"], "source": old.get("source", {})}
        when = old.get("carried", {}).get(key, origin)
        if key == "o" and old.get("overhead"):
            result["overhead"] = old["overhead"]
            carried[key] = when
        runs = [r for r in old["runs"] if r["variant"] == key]
        if runs:
            result["runs"].extend(runs)
            carried[key] = when
    result["carried"] = carried


def write_outputs(result: dict, out: Path) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"users_{result['users']}.json"
    carry_over(result, path)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("users_*.json"))]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results))
    return path


def print_summary(result: dict) -> None:
    print()
    print(render_section(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    arg = parser.add_argument
    arg("--users", type=int, default=1_000_000, help="users per month (default 1,000,000)")
    arg("--skip", default="", help=f"comma-separated variants to skip, of {','.join(ALL_KEYS)}")
    arg(
        "--out",
        type=Path,
        default=REPO / "docs" / "benchmarks.md",
        help="Markdown report, regenerated from bench/results/ (default docs/benchmarks.md)",
    )
    arg(
        "--ref",
        help="measure this commit (a git archive of services/prefect and db) instead "
        "of the working tree, e.g. --ref HEAD",
    )
    arg("--repeats", type=int, default=3, help="runs per mode for Prefect's overhead (default 3)")
    arg(
        "--pg-conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra setting for the bench's PostgreSQL (default: PostgreSQL's defaults)",
    )
    arg("--keep-dbs", action="store_true", help="keep each variant's database")
    arg("--keep-server", action="store_true", help="leave the bench's PostgreSQL running")
    arg("--render-only", action="store_true", help="only regenerate --out from bench/results/")
    arg(
        "--no-save",
        action="store_true",
        help="print the figures, write no results (e.g. for a profiling run)",
    )
    args = parser.parse_args(argv)
    if args.render_only:
        results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("users_*.json"))]
        args.out.write_text(render(results))
        print(args.out)
        return 0
    source = checkout(args.ref)
    result = Bench(args).run()
    result["source"] = source
    print_summary(result)
    if args.no_save:
        return 0
    path = write_outputs(result, args.out)
    print(f"results: {path.relative_to(REPO)}; report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
