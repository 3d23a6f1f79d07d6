"""``python ingest_flow.py`` with no Prefect API: the CLI's own temporary server.

The CLI starts Prefect's API server and the GX process before importing Prefect
(streamflow/warmup.py). These tests hold it to what Prefect's own temporary server
gave: the run, its task runs, logs and artifacts in ``PREFECT_HOME``'s database;
the one-line outcome on the terminal; and no process left behind, whatever the end.
The month is read once: the flow knows the files the CLI hashed by their stat.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from conftest import scalar
from month_files import (
    AS_OF,
    flow_command,
    flow_env,
    ingest,
    migrated_prefect_home,
    read_rows,
    small_months,
    with_value,
    write_rows,
)
from streamflow import validation, warmup
from streamflow.registry import TABLES

JAN = AS_OF["month_000"]
pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")


@pytest.fixture(scope="module")
def months(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_months(tmp_path_factory.mktemp("small"))


def _processes_with(marker: str) -> dict[int, str]:
    """Processes whose environment holds ``marker``: their command lines by pid."""
    found = {}
    for pid in [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if marker.encode() in environ:
            found[pid] = cmdline.decode(errors="replace")
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent's reaping is left


def _cli(db_url: str, seed_dir: Path, home: Path, *python_flags: str, **env: str):
    env.setdefault("GX_DOCS_DIR", str(home / "gx_docs"))
    full_env = flow_env(db_url, PREFECT_HOME=str(home), PREFECT_LOGGING_LEVEL="INFO", **env)
    full_env.pop("PREFECT_API_URL", None)
    # Prefect's own default, as on a user's machine (conftest raises it for the rest).
    full_env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    python, *script = flow_command(seed_dir, JAN)
    return subprocess.run(
        [python, *python_flags, *script], env=full_env, capture_output=True, text=True, timeout=600
    )


def _validated_suites(docs: Path) -> set[str]:
    """Suites with a validation page in the Data Docs site (GX writes one per run)."""
    assert (docs / "index.html").is_file()
    return {
        p.relative_to(docs / "validations").parts[0] for p in (docs / "validations").rglob("*.html")
    }


def _prefect_db(home: Path, query: str, *params: object) -> list[tuple]:
    with sqlite3.connect(home / "prefect.db") as conn:
        return conn.execute(query, params).fetchall()


def test_a_month_runs_against_the_clis_own_server_and_is_recorded(db_url, months, tmp_path):
    """The run is a Prefect flow run with its task runs, logs and artifacts, as with
    Prefect's temporary server; the CLI never imports ``prefect.server`` itself, and
    neither the server nor the GX process outlives it."""
    jan = tmp_path / "month_000"
    shutil.copytree(months / "month_000", jan)
    time.sleep(2.2)  # older than the racy margin when hashed: its stat can be trusted
    home = tmp_path / "prefect"
    proc = _cli(db_url, jan, home, "-X", "importtime")

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "published live + history" in proc.stdout.splitlines()[0]
    imported = {
        line.split("|")[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "prefect.flows" in imported
    assert not {m for m in imported if m.startswith("prefect.server")}
    assert "View at http" not in proc.stderr  # no UI behind this server
    [(run_id, state, name)] = _prefect_db(home, "SELECT id, state_type, name FROM flow_run")
    assert (state, name) == ("COMPLETED", f"ingest-{JAN}")  # the month, in the UI's list
    # The ledger names the flow run whose logs and task runs the UI shows.
    ledger_run = scalar(db_url, "SELECT flow_run_id::text FROM ingest_runs ORDER BY run_id DESC")
    assert ledger_run == str(run_id)
    tasks = _prefect_db(home, "SELECT name, state_type FROM task_run WHERE flow_run_id = ?", run_id)
    assert len(tasks) == 8 and {s for _, s in tasks} == {"COMPLETED"}, tasks
    assert {n.rsplit("-", 1)[0] for n, _ in tasks} == {
        "upsert_csv",
        "validate_with_ge",
        "snapshot_month",
    }
    assert {n for n, _ in tasks if n.startswith("upsert_csv")} == {
        f"upsert_csv-{t.name}" for t in TABLES
    }
    # The last lines the flow logs are shipped before the server stops.
    logs = [
        m for (m,) in _prefect_db(home, "SELECT message FROM log WHERE flow_run_id = ?", run_id)
    ]
    assert any("published live + history" in m for m in logs), logs[-5:]
    assert (
        _prefect_db(home, "SELECT count(*) FROM artifact WHERE flow_run_id = ?", run_id)[0][0] >= 1
    )
    assert _processes_with(f"PREFECT_HOME={home}") == {}
    # Built after the verdict, alongside the commit, and there when the CLI returns.
    assert _validated_suites(home / "gx_docs") == {f"{t.name}_suite" for t in TABLES}
    # The CLI hashed the files to look for a no-op; the flow knew them by their stat.
    timings = scalar(db_url, "SELECT timings FROM ingest_runs ORDER BY run_id DESC LIMIT 1")
    assert "stat_check" in timings and "fingerprint" not in timings, timings


def test_the_temporary_server_holds_no_database_password(monkeypatch, tmp_path):
    """It keeps Prefect's history in SQLite: the pipeline's credentials are not its own
    to hold (it used to get the CLI's whole environment, DATABASE_URL included)."""
    secret = f"pw-{os.getpid()}-not-for-the-server"
    monkeypatch.setenv("DATABASE_URL", f"postgresql://streamflow_app:{secret}@db/streamflow")
    for name in ("POSTGRES_PASSWORD", "INGEST_DB_PASSWORD", "PREFECT_DB_PASSWORD", "PGPASSWORD"):
        monkeypatch.setenv(name, secret)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    server = warmup.TemporaryApiServer()
    try:
        pid = server._proc.pid
        deadline = time.monotonic() + 30
        # Before its exec the child still shows this process's environment.
        while b"uvicorn" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the server was never executed"
            time.sleep(0.01)
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"PREFECT_HOME={tmp_path / 'prefect'}".encode() in environ
        assert not [v for v in environ if secret.encode() in v]
    finally:
        server.stop()


def test_a_failed_month_is_recorded_failed_and_leaves_nothing_behind(db_url, months, tmp_path):
    bad = with_value(months, tmp_path / "month_000", "usage_agg_30d.csv", "watch_hours_30d", "-4")
    home = migrated_prefect_home(tmp_path / "prefect")

    proc = _cli(db_url, bad, home)

    assert proc.returncode == 1, proc.stdout[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "ingest failed: validation failed: usage_agg_30d.csv, "
        "column watch_hours_30d: 1 value(s) below 0"
    ), last
    [(run_id, state)] = _prefect_db(home, "SELECT id, state_type FROM flow_run")
    assert state == "FAILED"
    logs = [
        m for (m,) in _prefect_db(home, "SELECT message FROM log WHERE flow_run_id = ?", run_id)
    ]
    assert any(m.startswith("ingest failed: validation failed") for m in logs), logs[-5:]
    # Prefect still logs each failure, in the UI and on the terminal, without the
    # stack of an error whose message says what is wrong.
    assert any(m.startswith("Task run failed with exception: ValidationFailed(") for m in logs)
    # The reason in full once in the run's records (the failed task), once in the
    # flow's own line, and last on its own; Prefect's later records of it point above
    # (it was written five times on the terminal, six with the last line).
    reason = "column watch_hours_30d: 1 value(s) below 0"
    assert proc.stderr.count(reason) == 3, proc.stderr[-3000:]
    assert sum(reason in m for m in logs) == 2, [m for m in logs if reason in m]
    assert "Encountered exception during execution: ValidationFailed('(see above)')" in logs
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not any("Traceback" in m for m in logs), [m for m in logs if "Traceback" in m][:1]
    assert _processes_with(f"PREFECT_HOME={home}") == {}
    assert "usage_agg_30d_suite" in _validated_suites(home / "gx_docs")
    # Where to see the failing check with its examples (it was in the log only).
    assert proc.stdout.splitlines() == [f"GX Data Docs: {home / 'gx_docs' / 'index.html'}"]
    # The table artifact has each suite's counts, and no published counts of 0 (it had
    # "-" expectations for every table, and 0 rows inserted, updated, unchanged).
    [(stored,)] = _prefect_db(
        home, "SELECT data FROM artifact WHERE flow_run_id = ? AND type = 'table'", run_id
    )
    rows = {r["table"]: r for r in json.loads(json.loads(stored))}
    usage = rows["usage_agg_30d"]
    assert (usage["expectations failed"], usage["inserted"], usage["unchanged"]) == (1, "-", "-")
    assert usage["expectations passed"] > 0
    assert all(r["expectations failed"] == 0 for t, r in rows.items() if t != "usage_agg_30d")


def test_a_refused_month_names_its_flow_run_in_the_ledger(db_url, months, tmp_path):
    """A rerun rule's refusal is a flow run (Failed in the UI) and a ledger row; the row
    had no flow_run_id and the run no artifact naming the row, so neither led to the
    other (every other run links both ways)."""
    assert ingest(db_url, months / "month_000", JAN) == 0
    home = migrated_prefect_home(tmp_path / "prefect")

    proc = _cli(db_url, months / "month_001", home)  # other files for a published as_of

    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "changed" in proc.stderr.strip().splitlines()[-1]
    [(flow_run, state)] = _prefect_db(home, "SELECT id, state_type FROM flow_run")
    assert state == "FAILED"
    run_id, mode, ledger_flow_run = (
        psycopg.connect(db_url)
        .execute(
            "SELECT run_id, mode, flow_run_id::text FROM ingest_runs ORDER BY run_id DESC LIMIT 1"
        )
        .fetchone()
    )
    assert (mode, ledger_flow_run) == ("refused", str(flow_run))
    # Its log says it in the words of every failed run's (only Prefect's repr was there).
    logs = [m for (m,) in _prefect_db(home, "SELECT message FROM log")]
    assert any(m.startswith("ingest failed: as_of 2024-01-31 was already") for m in logs), logs
    [(stored,)] = _prefect_db(
        home, "SELECT data FROM artifact WHERE flow_run_id = ? AND type = 'markdown'", flow_run
    )
    summary = json.loads(stored)
    assert f"| ledger run_id | {run_id} |" in summary
    assert "| mode | refused |" in summary and "❌ failed" in summary


def test_prefects_default_retries_do_not_hide_why_a_month_failed(db_url, months, tmp_path):
    """PREFECT_TASKS_DEFAULT_RETRIES (read when the tasks are defined) retried
    validate_with_ge, whose GX process had answered and exited: the run said "validation
    could not run (GX process): exit code 0" (environment audit). The flow's default
    retries would record the refusal twice."""
    month = tmp_path / "month_000"
    shutil.copytree(months / "month_000", month)
    path = month / "usage_agg_30d.csv"
    rows = read_rows(path)
    rows[7][rows[0].index("watch_hours_30d")] = "-3.5"
    write_rows(path, rows)
    home = migrated_prefect_home(tmp_path / "prefect")

    proc = _cli(
        db_url, month, home, PREFECT_TASKS_DEFAULT_RETRIES="2", PREFECT_FLOWS_DEFAULT_RETRIES="1"
    )

    assert proc.returncode == 1, proc.stderr[-2000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith(
        "ingest failed: validation failed: usage_agg_30d.csv, column watch_hours_30d"
    ), message
    assert scalar(db_url, "SELECT count(*) FROM ingest_runs") == 1
    assert scalar(db_url, "SELECT count(*) FROM users") == 0


def test_no_temporary_server_when_prefect_forbids_one(db_url, months, tmp_path):
    """``PREFECT_SERVER_EPHEMERAL_ENABLED=false``: the CLI stops the server it started
    early and lets Prefect say that an API URL is needed; nothing is run."""
    home = tmp_path / "prefect"
    proc = _cli(db_url, months / "month_000", home, PREFECT_SERVER_EPHEMERAL_ENABLED="false")

    assert proc.returncode == 1
    assert "PREFECT_API_URL" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert _processes_with(f"PREFECT_HOME={home}") == {}


def test_a_server_that_cannot_start_is_reported_with_its_last_words(db_url, months, tmp_path):
    """The temporary server's metadata database is unreachable: the CLI says the server
    did not start and why (the exception in its log), records nothing, leaves no process."""
    home = tmp_path / "prefect"
    proc = _cli(
        db_url,
        months / "month_000",
        home,
        PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://nobody@127.0.0.1:9/none",
    )

    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ingest failed: the temporary Prefect API server did not start: ")
    assert "ConnectionRefusedError" in last  # the cause, not uvicorn's "startup failed"
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert scalar(db_url, "SELECT count(*) FROM ingest_runs") == 0
    assert _processes_with(f"PREFECT_HOME={home}") == {}


def test_the_clis_server_has_time_for_a_first_start_unless_prefect_says_otherwise(
    monkeypatch, tmp_path
):
    """A first start migrates PREFECT_HOME's database, longer than Prefect's 20 s default
    on a 2-core machine; a value given to Prefect (here its environment variable) wins."""
    from prefect.settings import Settings

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))  # no profile of the machine's
    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    assert Settings().server.ephemeral.startup_timeout_seconds == 20
    assert warmup.startup_timeout(Settings().server.ephemeral) == warmup.FIRST_START_SECONDS
    assert warmup.FIRST_START_SECONDS > 20

    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "7")
    assert warmup.startup_timeout(Settings().server.ephemeral) == 7


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no folder", "ingest failed: seed_dir '{month}' does not exist"),
        ("no folder, --replace", "ingest failed: seed_dir '{month}' does not exist"),
        (
            "relative folder",  # a deployment's working folder is the image's WORKDIR
            "ingest failed: seed_dir 'no/such/month_000' does not exist (from the working "
            "folder {cwd})",
        ),
        (
            "a file for the folder",
            "ingest failed: seed_dir '{month}' is a file; expected the month's folder, which "
            "holds the six files",
        ),
        ("missing file", "ingest failed: {month}: missing file labels.csv (a month folder holds"),
        ("bad as_of", "ingest failed: as_of '2024-02-30' is not a valid date; expected YYYY-MM-DD"),
        ("future as_of", "ingest failed: as_of 2204-02-29 is after today ("),
        ("as_of before 1900", "ingest failed: as_of 1899-12-31 is before 1900-01-01"),
        (
            "mid-month as_of",
            "ingest failed: as_of 2024-01-15 is not the last day of its month; a month is "
            "published as of its end (2024-01-31)",
        ),
        ("bad setting", "ingest failed: LOCK_WAIT_SECONDS 'soon' is not a number of seconds"),
        ("bad REPLACE", "ingest failed: REPLACE 'maybe' is neither yes nor no"),
        ("bad ALLOW_GAP", "ingest failed: ALLOW_GAP 'sure' is neither yes nor no"),
        ("bad ALLOW_DROP", "ingest failed: ALLOW_DROP 'ok' is neither yes nor no"),
        (
            "bad drop limit",
            "ingest failed: MAX_USERS_DROP_PERCENT '150' is not a percentage from 0 to 100",
        ),
        ("bad docs dir", "ingest failed: GX_DOCS_DIR '{docs}' cannot be written: Not a directory"),
        ("docs dir a file", "ingest failed: GX_DOCS_DIR '{afile}' is a file; expected a folder"),
        ("bad DATABASE_URL", "ingest failed: DATABASE_URL is not a PostgreSQL connection string"),
        (
            "bad Prefect setting",  # Prefect itself would stop in a pydantic traceback
            "ingest failed: PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS 'abc' is not a "
            "whole number of seconds",
        ),
    ],
)
def test_bad_inputs_are_answered_before_prefect_starts(db_url, months, tmp_path, case, expected):
    """A wrong folder, file, as_of or setting: one line and exit 1 at once, with no
    Prefect server started (its PREFECT_HOME stays empty), no GX process, no run."""
    home = tmp_path / "prefect"
    month, as_of, extra, env = tmp_path / "month_000", JAN, [], {}
    if case == "missing file":
        shutil.copytree(months / "month_000", month)
        (month / "labels.csv").unlink()
    elif case == "bad as_of":
        month, as_of = months / "month_000", "2024-02-30"
    elif case == "future as_of":  # 2204 for 2024: it would make every later month a backfill
        month, as_of = months / "month_000", "2204-02-29"
    elif case == "as_of before 1900":  # below every signup date the checks accept
        month, as_of = months / "month_000", "1899-12-31"
    elif case == "bad setting":
        month, env = months / "month_000", {"LOCK_WAIT_SECONDS": "soon"}
    elif case == "bad REPLACE":
        month, env = months / "month_000", {"REPLACE": "maybe"}
    elif case == "bad ALLOW_GAP":
        month, env = months / "month_000", {"ALLOW_GAP": "sure"}
    elif case == "bad ALLOW_DROP":
        month, env = months / "month_000", {"ALLOW_DROP": "ok"}
    elif case == "bad drop limit":
        month, env = months / "month_000", {"MAX_USERS_DROP_PERCENT": "150"}
    elif case == "mid-month as_of":  # a second snapshot of January, under another date
        month, as_of = months / "month_000", "2024-01-15"
    elif case == "bad docs dir":  # under a file: the GX process could never write there
        (tmp_path / "a_file").write_text("")
        month, env = months / "month_000", {"GX_DOCS_DIR": str(tmp_path / "a_file" / "docs")}
    elif case == "bad DATABASE_URL":  # libpq would quote it, password and all
        month, env = months / "month_000", {"DATABASE_URL": "mysql://u:s3cret@h/db"}
    elif case == "docs dir a file":
        (tmp_path / "a_file").write_text("")
        month, env = months / "month_000", {"GX_DOCS_DIR": str(tmp_path / "a_file")}
    elif case == "bad Prefect setting":
        month = months / "month_000"
        env = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "abc"}
    elif case == "no folder, --replace":
        extra = ["--replace"]
    elif case == "relative folder":
        month = Path("no/such/month_000")
    elif case == "a file for the folder":
        month = months / "month_000" / "users.csv"
    python, *script = flow_command(month, as_of, *extra)
    full_env = flow_env(db_url, PREFECT_HOME=str(home))
    full_env.update(env)
    full_env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [python, *script], env=full_env, capture_output=True, text=True, timeout=120
    )

    assert proc.returncode == 1, proc.stderr[-2000:]
    docs = tmp_path / "a_file" / "docs"
    afile = tmp_path / "a_file"
    said = expected.format(month=month, docs=docs, afile=afile, cwd=os.getcwd())
    assert proc.stderr.strip().startswith(said), proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert "s3cret" not in proc.stderr + proc.stdout
    assert not home.exists() or not any(home.iterdir())
    assert scalar(db_url, "SELECT count(*) FROM ingest_runs") == 0
    assert _processes_with(f"PREFECT_HOME={home}") == {}


@pytest.mark.parametrize("seed_dir", ["", "  "])
def test_an_empty_seed_dir_is_refused_not_read_as_the_working_folder(seed_dir, tmp_path):
    """A deployment run can send seed_dir="" (the CLI says "set SEED_DIR"): it was read as
    the runner's working folder, and refused as a folder missing the six files."""
    from streamflow.errors import InputError
    from streamflow.inputs import check_run
    from streamflow.settings import load_settings

    with pytest.raises(InputError) as err:
        check_run(seed_dir, JAN, load_settings())
    assert str(err.value) == (
        f"seed_dir {seed_dir!r} is empty; expected the month's folder, e.g. /data/seeds/month_000"
    )


def test_help_is_the_full_help_and_starts_nothing(db_url, months, tmp_path):
    """``--help`` with a complete command line: the description, exit 0, no no-op check,
    no server, no GX process."""
    home = tmp_path / "prefect"
    python, *script = flow_command(months / "month_000", JAN)
    env = flow_env(db_url, PREFECT_HOME=str(home))
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [python, *script, "--help"], env=env, capture_output=True, text=True, timeout=120
    )

    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "StreamFlow monthly ingestion, as a Prefect flow." in proc.stdout
    assert not (home / "prefect.db").exists()
    assert scalar(db_url, "SELECT count(*) FROM ingest_runs") == 0
    assert _processes_with(f"PREFECT_HOME={home}") == {}


def test_an_ascii_terminal_gets_the_folders_name_escaped_and_exit_0(db_url, months, tmp_path):
    """An ASCII stdout (PYTHONIOENCODING, a C locale) and a month folder, and a Data Docs
    folder, named with an é and an emoji: the month is published, its lines printed
    with those characters escaped, exit 0; the rerun's "nothing to do" too. Both
    crashed with UnicodeEncodeError and exit 1, the first once the month was in."""
    seed_dir = tmp_path / "données_🙂" / "month_000"
    shutil.copytree(months / "month_000", seed_dir)
    home = tmp_path / "prefect"
    docs = tmp_path / "docs_é"

    def shown(path: Path) -> str:
        return str(path).encode("ascii", "backslashreplace").decode()

    first = _cli(db_url, seed_dir, home, PYTHONIOENCODING="ascii", GX_DOCS_DIR=str(docs))

    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.isascii(), first.stdout
    lines = first.stdout.splitlines()
    assert lines[0].startswith(f"{shown(seed_dir)} as_of {JAN}: published live + history"), lines
    assert f"GX Data Docs: {shown(docs / 'index.html')}" in lines, lines
    assert "\\U0001f642" in lines[0] and "\\xe9" in lines[0], lines
    assert (docs / "index.html").is_file()
    published = "SELECT status, seed_dir FROM ingest_runs ORDER BY run_id"
    with psycopg.connect(db_url) as conn:
        assert conn.execute(published).fetchall() == [("succeeded", str(seed_dir))]
    assert scalar(db_url, "SELECT count(*) FROM users") == 200

    again = _cli(db_url, seed_dir, home, PYTHONIOENCODING="ascii", GX_DOCS_DIR=str(docs))

    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines() == [
        f"{shown(seed_dir)} as_of {JAN}: already published from the same files; nothing to do"
    ]
    with psycopg.connect(db_url) as conn:
        statuses = [s for (s,) in conn.execute("SELECT status FROM ingest_runs ORDER BY run_id")]
    assert statuses == ["succeeded", "noop"]


def test_help_reaches_an_ascii_terminal_with_its_diagram_escaped(tmp_path):
    """The help is the module's docstring, whose diagram draws with ─ and ▶: an ASCII
    stdout gets them escaped, exit 0 (a UnicodeEncodeError traceback, exit 1)."""
    python, *script = flow_command(tmp_path, JAN)
    env = flow_env("postgresql://postgres@127.0.0.1:9/x", PREFECT_HOME=str(tmp_path / "p"))
    env.update(PYTHONIOENCODING="ascii")
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [python, *script, "--help"], env=env, capture_output=True, text=True, timeout=120
    )

    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "StreamFlow monthly ingestion, as a Prefect flow." in proc.stdout
    assert "\\u2500" in proc.stdout and "\\u25b6" in proc.stdout, proc.stdout


def test_a_mistyped_flag_is_a_usage_error_even_for_a_published_month(db_url, months, tmp_path):
    """``--replce`` for ``--replace``: refused at once (exit 2), not answered "nothing to
    do" because the month happens to be unchanged, and no server or GX process."""
    assert ingest(db_url, months / "month_000", JAN) == 0
    home = tmp_path / "prefect"
    python, *script = flow_command(months / "month_000", JAN, "--replce")
    env = flow_env(db_url, PREFECT_HOME=str(home))
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([python, *script], env=env, capture_output=True, text=True, timeout=120)

    assert proc.returncode == 2, proc.stdout + proc.stderr[-2000:]
    assert "unrecognized arguments: --replce" in proc.stderr
    assert "nothing to do" not in proc.stdout
    assert scalar(db_url, "SELECT count(*) FROM ingest_runs") == 1  # no no-op recorded
    assert not (home / "prefect.db").exists()
    assert _processes_with(f"PREFECT_HOME={home}") == {}


@pytest.mark.parametrize("command", [["serve"], ["--as-of", JAN]])
def test_a_bad_prefect_setting_is_named_for_every_command(command, tmp_path):
    """Prefect refuses it at import, whatever the command: serve (the Docker runner's)
    and an incomplete run included."""
    env = flow_env("", PREFECT_HOME=str(tmp_path / "prefect"))
    env.update(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="abc")
    python, script = flow_command("x", JAN)[:2]
    proc = subprocess.run(
        [python, script, *command], env=env, capture_output=True, text=True, timeout=120
    )

    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip() == (
        "ingest failed: PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS 'abc' is not a whole "
        "number of seconds (e.g. PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120)"
    )


def test_serve_refuses_the_flags_of_a_run(tmp_path):
    """``serve --as-of ...`` started serving and ignored them: each deployment run
    brings its own parameters."""
    env = flow_env("", PREFECT_HOME=str(tmp_path / "prefect"))
    python, script = flow_command("x", JAN)[:2]
    proc = subprocess.run(
        [python, script, "serve", "--as-of=2024-01-31", "--replace", "--allow-gap"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "serve takes no --as-of=2024-01-31, --replace, --allow-gap: a deployment run gets "
            "seed_dir, as_of, replace, allow_gap and allow_drop as its parameters"
        )
    ), proc.stderr[-2000:]
    assert not (tmp_path / "prefect" / "prefect.db").exists()


@pytest.mark.parametrize("command", [["serve", "--seed", "x"], ["--seed", "x", "--as", JAN]])
def test_a_flag_is_spelled_out_not_abbreviated(command, tmp_path):
    """argparse took --seed for --seed-dir: ``serve --seed x`` then slipped past serve's
    refusal of a run's flags and served, the folder ignored without a word."""
    env = flow_env("", PREFECT_HOME=str(tmp_path / "prefect"))
    python, script = flow_command("x", JAN)[:2]
    proc = subprocess.run(
        [python, script, *command], env=env, capture_output=True, text=True, timeout=120
    )

    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("ingest_flow.py: error: ")
    assert "--seed" in proc.stderr or "'x'" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "prefect" / "prefect.db").exists()


def test_a_prefect_api_url_with_no_server_is_named(db_url, months, tmp_path):
    home = tmp_path / "prefect"
    python, *script = flow_command(months / "month_000", JAN)
    env = flow_env(db_url, PREFECT_HOME=str(home), PREFECT_API_URL="http://127.0.0.1:9/api")
    proc = subprocess.run([python, *script], env=env, capture_output=True, text=True, timeout=120)

    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "ingest failed: Failed to reach API at http://127.0.0.1:9/api/ (PREFECT_API_URL, or "
        "the CLI's temporary server): is that server up, and does the URL end in /api?"
    ), proc.stderr[-2000:]
    assert scalar(db_url, "SELECT count(*) FROM ingest_runs") == 0


def test_a_prefect_api_url_that_never_answers_is_named(db_url, months, tmp_path, silent_server):
    """A server that takes the connection and never answers: Prefect's client retried
    for ~7 minutes without a word."""
    from streamflow import warmup

    api = f"http://127.0.0.1:{silent_server.port}/api"
    python, *script = flow_command(months / "month_001", "2024-02-29")
    env = flow_env(db_url, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=api)
    start = time.monotonic()
    proc = subprocess.run([python, *script], env=env, capture_output=True, text=True, timeout=300)

    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ingest failed: the Prefect API at {api} did not answer within "
        f"{warmup.API_ANSWER_SECONDS} s (PREFECT_API_URL): is that server up and reachable "
        "from here?"
    ), proc.stderr[-2000:]
    assert len(silent_server.taken) == 1  # the CLI's one look; Prefect never called
    assert time.monotonic() - start < warmup.API_ANSWER_SECONDS + 90  # not ~7 minutes
    assert scalar(db_url, "SELECT count(*) FROM ingest_runs") == 0


def test_help_does_not_wait_for_a_prefect_api_that_never_answers(tmp_path, silent_server):
    """Help and usage errors need no API: the check of PREFECT_API_URL is for runs."""
    env = flow_env("", PREFECT_HOME=str(tmp_path / "prefect"))
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{silent_server.port}/api"
    python, script = flow_command("x", JAN)[:2]
    proc = subprocess.run(
        [python, script, "--help"], env=env, capture_output=True, text=True, timeout=120
    )

    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--seed-dir" in proc.stdout
    assert silent_server.taken == []


def test_the_flow_takes_the_gx_process_started_for_its_database(db_url, tmp_path):
    """The CLI's early GX process is used only for the database and docs it was started
    for; any other is stopped and replaced."""
    docs = tmp_path / "docs"
    validation.SuitesProcess.prestart(db_url, docs)
    early = validation.SuitesProcess._prestarted
    assert early is not None
    same = validation.SuitesProcess.take(db_url, docs)
    assert same is early and validation.SuitesProcess._prestarted is None
    same.close()

    validation.SuitesProcess.prestart(db_url, docs)
    early = validation.SuitesProcess._prestarted
    other = validation.SuitesProcess.take(db_url, tmp_path / "other_docs")
    try:
        assert other is not early
        assert not early.alive and other.alive
    finally:
        other.close()
    validation.SuitesProcess.prestart(db_url, docs)
    validation.SuitesProcess.discard_prestarted()
    assert validation.SuitesProcess._prestarted is None


def test_a_missing_run_parameter_is_named(monkeypatch, capsys, tmp_path):
    """Without SEED_DIR or AS_OF the CLI says which one is missing: a usage error (2)."""
    import ingest_flow
    from streamflow import settings

    monkeypatch.chdir(tmp_path)  # no .env here, nor in the stand-in app dir
    monkeypatch.setattr(settings, "APP_DIR", tmp_path)
    for name in ("SEED_DIR", "AS_OF"):
        monkeypatch.delenv(name, raising=False)

    assert ingest_flow.main(["--as-of", JAN]) == 2
    assert capsys.readouterr().err.strip() == "ingest failed: set SEED_DIR (or --seed-dir)"
    assert ingest_flow.main([]) == 2
    assert capsys.readouterr().err.strip() == (
        "ingest failed: set SEED_DIR (or --seed-dir) and AS_OF (or --as-of)"
    )


def test_a_replace_that_is_neither_yes_nor_no_is_refused_in_process(monkeypatch, capsys, months):
    """main() as a deployment's wrapper or a test calls it: one line, exit 1, no run."""
    import ingest_flow

    monkeypatch.setenv("REPLACE", "maybe")
    assert ingest_flow.main(["--seed-dir", str(months / "month_000"), "--as-of", JAN]) == 1
    assert capsys.readouterr().err.strip() == (
        "ingest failed: REPLACE 'maybe' is neither yes nor no (1/true/yes/y/on or 0/false/no/n/off)"
    )


def test_a_flow_run_checks_the_docs_dir_before_its_run(run_flow, db_url, months, tmp_path):
    """The same check in the flow itself (a deployment's run does not go through the
    CLI's early look): refused before the ledger, nothing staged."""
    (tmp_path / "a_file").write_text("")
    docs = tmp_path / "a_file" / "docs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GX_DOCS_DIR", str(docs))
        rc, _, err = run_flow(db_url, months / "month_000", JAN)

    assert rc == 1
    assert err.strip().splitlines()[-1] == (
        f"ingest failed: GX_DOCS_DIR '{docs}' cannot be written: Not a directory"
    )
    assert scalar(db_url, "SELECT count(*) FROM ingest_runs") == 0
    assert scalar(db_url, "SELECT count(*) FROM staging.users") == 0


def test_an_unreachable_database_is_one_line(run_flow, months):
    """libpq's error runs over several lines ("Is the server running…"): the last line
    on stderr still says what is wrong."""
    rc, _, err = run_flow("postgresql://nobody@127.0.0.1:9/none", months / "month_000", JAN)

    assert rc == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("ingest failed: the database could not be reached: "), err[-2000:]
    assert "127.0.0.1" in last and "9" in last


def test_an_unexpected_error_is_still_one_line(monkeypatch, capsys, months):
    """A bug's message may span lines: the CLI's last line on stderr still holds all of it."""
    import ingest_flow

    def broken(**_: object) -> dict:
        raise RuntimeError("first part\n  second part")

    monkeypatch.setattr(ingest_flow, "ingest_month", broken)
    assert ingest_flow.main(["--seed-dir", str(months / "month_000"), "--as-of", JAN]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "ingest failed: unexpected RuntimeError: first part second part"
    )


def test_only_errors_that_explain_themselves_lose_their_traceback():
    """The flow's filter on Prefect's run loggers: a bug keeps its stack."""
    import logging

    import ingest_flow  # noqa: F401 - installs the filter
    from streamflow.errors import ValidationFailed

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("prefect.task_runs")
    prefects = logger.handlers[:]  # its API handler wants a flow run
    logger.handlers[:] = [handler]
    try:
        for exc in (ValidationFailed("validation failed: labels.csv …"), RuntimeError("a bug")):
            try:
                raise exc
            except Exception:
                logger.error("Task run failed with exception: %r", exc, exc_info=True)
    finally:
        logger.handlers[:] = prefects

    explained, bug = records
    assert explained.exc_info is None
    assert "ValidationFailed('validation failed: labels.csv …')" in explained.getMessage()
    assert bug.exc_info is not None and isinstance(bug.exc_info[1], RuntimeError)
    assert "Traceback" in logging.Formatter().format(bug)


def test_a_reason_is_written_once_per_flow_run():
    """Prefect's engines repeat a failure in each record of it: the first keeps the
    reason, the engines' later records of that run point above, our own lines and
    another run's records keep theirs."""
    import logging

    from streamflow.errors import MonthConflict, SaidOnce

    said = SaidOnce()
    reason = "2024-01-31 is already published from different files (users.csv's 'x')"

    def record(run: str, module: str, msg: str, *args: object, exc=None) -> str:
        rec = logging.makeLogRecord(
            {"msg": msg, "args": args, "module": module, "flow_run_id": run}
        )
        rec.exc_info = (type(exc), exc, None) if exc else None
        assert said.filter(rec)
        return rec.getMessage()

    exc = MonthConflict(reason)
    assert record("a", "runs", "ingest failed: %s", reason) == f"ingest failed: {reason}"
    first = record("a", "flow_engine", "Encountered exception during execution: %r", exc, exc=exc)
    assert first == f"Encountered exception during execution: {exc!r}"
    assert '"' in repr(exc)  # the reason's quote made repr choose the other one
    again = record("a", "flow_engine", "Encountered exception during execution: %r", exc, exc=exc)
    assert again == 'Encountered exception during execution: MonthConflict("(see above)")'
    finished = f"Finished in state Failed('Flow run encountered an exception: {reason}')"
    assert record("a", "flow_engine", finished) == (
        "Finished in state Failed('Flow run encountered an exception: (see above)')"
    )
    assert record("a", "runs", "ingest failed: %s", reason) == f"ingest failed: {reason}"
    assert record("b", "flow_engine", finished) == finished  # another run: not said there
    # A bug's message is no reason for people: it stays wherever it is repeated.
    bug = RuntimeError("a bug")
    record("a", "task_engine", "Task run failed with exception: %r", bug, exc=bug)
    assert record("a", "flow_engine", "%r", bug) == "RuntimeError('a bug')"
    # A record whose words cannot be formed is left to the handlers, as without the
    # filter: an error raised from a filter would reach Prefect's engine.
    broken = logging.makeLogRecord(
        {"msg": "%d tasks", "args": ("x",), "module": "flow_engine", "flow_run_id": "a"}
    )
    assert said.filter(broken) and broken.msg == "%d tasks"


def test_as_of_may_be_tomorrow_for_a_zone_ahead_of_this_machine():
    """The machine's date may still be yesterday where the month has ended: one day of
    slack, not two."""
    from datetime import date

    from streamflow.errors import InputError
    from streamflow.inputs import parse_as_of

    today = date(2024, 1, 30)
    assert parse_as_of("2024-01-31", today=today) == date(2024, 1, 31)
    with pytest.raises(InputError, match="as_of 2024-02-01 is after today"):
        parse_as_of("2024-02-01", today=today)


@pytest.mark.parametrize(
    "value", ["20240131", "2024-W05-3", "2024W053", "2024-1-31", "2024-01-31T00"]
)
def test_as_of_is_written_yyyy_mm_dd_and_nothing_else(value):
    """Python's fromisoformat takes compact and week dates too; the message promised
    YYYY-MM-DD, and a week date in the ledger reads as no date anyone wrote."""
    from streamflow.errors import InputError
    from streamflow.inputs import parse_as_of

    with pytest.raises(InputError) as err:
        parse_as_of(value)
    assert str(err.value) == (
        f"as_of {value!r} is not a valid date; expected YYYY-MM-DD, e.g. 2024-01-31"
    )


# --------------------------------------------------------------------------- interrupts


@pytest.fixture(scope="module")
def bigger_month(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Big enough (200,000 users: ~5 s of work) that a signal lands while the month is in
    progress, however long the test takes to send it once it sees the run start: with
    40,000 users a loaded machine once let the run finish first (exit 0). The tests stop
    the run early: the size costs them the month's generation (~1 s) and its hashing."""
    from streamflow import seeds

    root = tmp_path_factory.mktemp("bigger")
    seeds.generate(root, users=200_000, months=1, seed=3)
    return root / "month_000"


def _live_servers(home: Path) -> list[int]:
    """Pids of the temporary API servers of ``PREFECT_HOME=home`` (zombies excluded)."""
    servers = _processes_with(f"PREFECT_HOME={home}").items()
    return [pid for pid, cmd in servers if "uvicorn" in cmd and _alive(pid)]


def _start_as_a_job(db_url: str, month: Path, home: Path) -> subprocess.Popen:
    """The CLI in a process group of its own, as a terminal runs a job, with its own
    temporary API server (no PREFECT_API_URL)."""
    env = flow_env(db_url, PREFECT_HOME=str(home))
    env.pop("PREFECT_API_URL", None)
    return subprocess.Popen(
        flow_command(month, JAN),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _start_mid_run(db_url: str, month: Path, home: Path) -> tuple[subprocess.Popen, list[int]]:
    """The CLI (its own process group, as a terminal's job), once its run is under way
    and its temporary API server up: (process, server pids)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        last = conn.execute("SELECT coalesce(max(run_id), 0) FROM ingest_runs").fetchone()[0]
    proc = _start_as_a_job(db_url, month, migrated_prefect_home(home))
    deadline = time.monotonic() + 120
    with psycopg.connect(db_url, autocommit=True) as conn:
        while not conn.execute(
            "SELECT 1 FROM ingest_runs WHERE run_id > %s AND status = 'running'", (last,)
        ).fetchone():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.05)
    servers = _live_servers(home)
    assert len(servers) == 1, servers
    return proc, servers


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_ctrl_c_mid_run_stops_the_run_and_its_server_at_once(db_url, bigger_month, tmp_path):
    """A terminal's Ctrl-C reaches the whole foreground group: the server died with the
    CLI, which then retried the dead API for 80-166 s and ended in 'unexpected
    ConnectError'. Now the server is outside that group: the CLI says it was
    interrupted, exits 130 at once, and stops its server; nothing is published."""
    proc, servers = _start_mid_run(db_url, bigger_month, tmp_path / "prefect")

    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=120)

    # The line says what the ledger says: it was "ingest interrupted" alone.
    assert (proc.returncode, err.strip().splitlines()[-1]) == (
        130,
        "ingest interrupted: nothing was published",
    )
    assert time.monotonic() - sent < 20
    assert _gone_within(servers, 10)
    assert scalar(db_url, "SELECT count(*) FROM ingest_months") == 0
    assert scalar(db_url, "SELECT error FROM ingest_runs ORDER BY run_id DESC LIMIT 1") == (
        "interrupted (Ctrl-C or SIGINT); nothing was published"
    )


def test_sigterm_mid_run_stops_the_run_like_ctrl_c(db_url, bigger_month, tmp_path):
    """What timeout, systemd and docker stop send: the CLI died of it again after
    Prefect's own handling, with no last line, and the ledger said 'TerminationSignal()'."""
    proc, servers = _start_mid_run(db_url, bigger_month, tmp_path / "prefect")

    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)

    assert (proc.returncode, err.strip().splitlines()[-1]) == (
        143,
        "ingest terminated (SIGTERM): nothing was published",
    )
    assert _gone_within(servers, 10)
    assert scalar(db_url, "SELECT count(*) FROM ingest_months") == 0
    assert scalar(db_url, "SELECT error FROM ingest_runs ORDER BY run_id DESC LIMIT 1") == (
        "interrupted (SIGTERM); nothing was published"
    )


def _sigterm_ends_it_while_the_reader_waits(
    proc: subprocess.Popen, reader: psycopg.Connection
) -> str:
    """SIGTERM to the CLI: it exits 143 within 20 s, the reader's transaction (and its
    lock) still open, then let go. Returns the CLI's stderr."""
    os.kill(proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert time.monotonic() - sent < 20
    assert reader.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    reader.rollback()
    return err


def test_sigterm_stops_a_run_whose_copy_waits_for_a_readers_lock(db_url, bigger_month, tmp_path):
    """Someone looks at the staging tables in an open transaction (the README invites it
    for a refused month): the next run's COPY waits for that lock. SIGTERM logged
    "interrupted", then the run waited on, holding the writer lock, until the reader let
    go (operator audit: 45 s, and 11 minutes once). A stop now cancels the COPYs."""
    with psycopg.connect(db_url) as reader:
        reader.execute("SELECT count(*) FROM staging.users")  # its lock lasts until rollback
        proc, servers = _start_mid_run(db_url, bigger_month, tmp_path / "prefect")
        deadline = time.monotonic() + 60
        with psycopg.connect(db_url, autocommit=True) as watch:
            while not watch.execute(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE 'TRUNCATE%%staging%%'"
            ).fetchone():
                assert proc.poll() is None, proc.communicate()[1][-2000:]
                assert time.monotonic() < deadline, "no COPY waited for the reader"
                time.sleep(0.05)

        err = _sigterm_ends_it_while_the_reader_waits(proc, reader)
        assert err.strip().splitlines()[-1] == "ingest terminated (SIGTERM): nothing was published"
        # The COPY waiting for the reader, and the files queued behind it, say why they
        # stopped (queued ones said "the month was refused while it was being written").
        assert "users.csv: not staged, the run was stopped" in err, err[-3000:]
        assert "refused while it was being written" not in err, err[-3000:]
    assert _gone_within(servers, 10)
    assert scalar(db_url, "SELECT error FROM ingest_runs ORDER BY run_id DESC LIMIT 1") == (
        "interrupted (SIGTERM); nothing was published"
    )


def test_sigterm_after_a_failure_cancels_the_copy_still_waiting(db_url, bigger_month, tmp_path):
    """A bad users.csv fails the run while subscriptions.csv's COPY waits for a reader's
    lock: the run records its failure, then waits for that COPY inside its writer lock.
    A SIGTERM then went unheeded until the reader let go (diff review); it now cancels
    the COPY, and the failure stays recorded as it was."""
    month = tmp_path / "month_000"
    shutil.copytree(bigger_month, month)
    lines = (month / "users.csv").read_bytes().split(b"\n")
    lines[2] = lines[2].rsplit(b",", 1)[0] + b",2022-13-45"
    (month / "users.csv").write_bytes(b"\n".join(lines))
    with psycopg.connect(db_url) as reader:
        reader.execute("SELECT count(*) FROM staging.subscriptions")
        proc = _start_as_a_job(db_url, month, migrated_prefect_home(tmp_path / "prefect"))
        deadline = time.monotonic() + 120
        with psycopg.connect(db_url, autocommit=True) as watch:
            while not (
                watch.execute("SELECT 1 FROM ingest_runs WHERE status = 'failed'").fetchone()
                and watch.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE 'TRUNCATE%%subscriptions%%'"
                ).fetchone()
            ):
                assert proc.poll() is None, proc.communicate()[1][-2000:]
                assert time.monotonic() < deadline, "the run never waited for the COPY"
                time.sleep(0.05)
            time.sleep(1)  # the run is in its wait for the COPY

        err = _sigterm_ends_it_while_the_reader_waits(proc, reader)
    error = scalar(db_url, "SELECT error FROM ingest_runs ORDER BY run_id DESC LIMIT 1")
    assert error.startswith("users.csv, line 3, column "), error
    # Why the run had failed, which the stop had hidden behind "ingest terminated".
    assert err.strip().splitlines()[-1] == (
        f"ingest terminated (SIGTERM): nothing was published; the run had failed: {error}"
    )


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_the_temporary_server_dies_with_the_cli(db_url, bigger_month, tmp_path, how):
    """SIGTERM or SIGKILL of the CLI skipped its stopping of the server, which lived on,
    190 MB each time. The server now gets SIGTERM when the CLI process ends, however it
    ends."""
    proc, servers = _start_mid_run(db_url, bigger_month, tmp_path / "prefect")

    os.kill(proc.pid, how)
    proc.communicate(timeout=120)

    assert _gone_within(servers, 15), f"server {servers} outlived the CLI"


@pytest.mark.parametrize(
    ("how", "code", "line"),
    [
        (signal.SIGINT, 130, "ingest interrupted"),
        (signal.SIGTERM, 143, "ingest terminated (SIGTERM)"),
    ],
    ids=["SIGINT", "SIGTERM"],
)
def test_ctrl_c_while_starting_is_one_line(db_url, months, tmp_path, how, code, line):
    """Ctrl-C while Prefect imports printed the import's KeyboardInterrupt traceback
    (SIGTERM: no line at all); the CLI now says it was stopped, exits 128 + the signal,
    and leaves no server behind."""
    home = tmp_path / "prefect"
    proc = _start_as_a_job(db_url, months / "month_000", home)
    deadline = time.monotonic() + 60
    # The CLI spawns its API server after installing its Ctrl-C handler and before it
    # imports Prefect: the signal comes during that import, however slow the machine
    # (a fixed sleep after Python's own handler came too early under load).
    while not _live_servers(home):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)

    os.killpg(proc.pid, how)  # a terminal's Ctrl-C reaches the group; kill, the group too
    _, err = proc.communicate(timeout=60)

    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == line
    assert _gone_within(_live_servers(home), 10)


@pytest.mark.parametrize(
    ("stop", "code", "line"),
    [
        ("KeyboardInterrupt", 130, "ingest interrupted"),
        ("Terminated", 143, "ingest terminated (SIGTERM)"),
    ],
    ids=["SIGINT", "SIGTERM"],
)
def test_a_signal_once_validation_passed_says_the_month_was_published(
    db_url, months, tmp_path, stop, code, line
):
    """The publisher commits a month that passed validation whatever signal comes
    next; the CLI said only "ingest interrupted" of a month that had landed. The signal
    is raised the moment the verdict is given (as its handler would), in the real CLI."""
    wrapper = tmp_path / "stopped_after_the_verdict.py"
    wrapper.write_text(
        "import runpy, sys\n"
        "from streamflow import interrupts\n"
        "from streamflow.verdict import Verdict\n"
        "accept = Verdict.accept\n"
        "def accept_then_stop(self):\n"
        "    accept(self)\n"
        f"    raise getattr(interrupts, {stop!r}, KeyboardInterrupt)\n"
        "Verdict.accept = accept_then_stop\n"
        "sys.argv.pop(0)\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    home = migrated_prefect_home(tmp_path / "prefect")
    proc = _cli(db_url, months / "month_000", home, str(wrapper))

    assert proc.returncode == code, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"{line} once the month was published (its Data Docs were not built)"
    assert scalar(db_url, "SELECT status FROM ingest_runs") == "succeeded"
    # The UI's run has the summary artifact of a published month, as any published run.
    [(stored,)] = _prefect_db(home, "SELECT data FROM artifact WHERE type = 'markdown'")
    assert "✅ published" in json.loads(stored)
    # And its log, for a deployment run (a cancel is a SIGTERM): no CLI line there.
    logged = [m for (m,) in _prefect_db(home, "SELECT message FROM log")]
    said = f"{last}: run 1 is recorded as succeeded"
    assert said in logged, logged[-5:]
    rows = len(read_rows(months / "month_000" / "labels.csv")) - 1  # the header
    assert scalar(db_url, "SELECT count(*) FROM labels_snapshots") == rows


def test_nothing_reaches_the_terminal_after_the_last_line():
    """The CLI prints its last line ("ingest interrupted", "ingest failed: ...") and then
    ships the run's queued logs and events, and Prefect logged while it did ("Still
    processing items: 18 items remaining..."), below that line. The terminal's handlers
    are silenced for the drain; the logs still reach the API."""
    terminal, api = io.StringIO(), []

    class ToTheApi(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            api.append(record.getMessage())

    logger = logging.getLogger("EventsWorker.test")
    logger.addHandler(logging.StreamHandler(terminal))
    logger.addHandler(ToTheApi())
    # It silences every handler of the process: Prefect's console handler stayed silent
    # for the tests after this one in the same worker (their runs' log lines missing).
    levels = [(h, h.level) for h in warmup.terminal_handlers()]
    try:
        warmup.quiet_terminal()
        logger.warning("Still processing items: 18 items remaining...")
        logger.error("Failed to send 3 events")
    finally:
        logger.handlers.clear()
        for handler, level in levels:
            handler.setLevel(level)
    assert terminal.getvalue() == ""
    assert api == ["Still processing items: 18 items remaining...", "Failed to send 3 events"]


@pytest.mark.parametrize(
    ("signum", "where", "code", "line", "published"),
    [
        ("SIGTERM", "validation", 143, "ingest terminated (SIGTERM): nothing was published", False),
        ("SIGINT", "validation", 130, "ingest interrupted: nothing was published", False),
        (
            "SIGTERM",
            "verdict",
            143,
            "ingest terminated (SIGTERM) once the month was published (its Data Docs were not "
            "built)",
            True,
        ),
        ("SIGTERM", "end", 143, "ingest terminated (SIGTERM) once the month was published", True),
        # Not swallowed: the flow's own handling had ended, and the CLI said only
        # "ingest terminated (SIGTERM)" of a month that was in.
        (
            "SIGTERM",
            "end-raised",
            143,
            "ingest terminated (SIGTERM) once the month was published",
            True,
        ),
    ],
    ids=[
        "SIGTERM-validating",
        "SIGINT-validating",
        "SIGTERM-after-verdict",
        "SIGTERM-at-end",
        "SIGTERM-at-end-not-swallowed",
    ],
)
def test_a_signal_python_swallows_in_a_finalizer_still_stops_the_run(
    db_url, months, tmp_path, signum, where, code, line, published
):
    """A handler that raises while the main thread runs a ``__del__`` has its exception
    swallowed ("Exception ignored in ..."): a SIGTERM went that way once in CI, and the
    run published its month and exited 0. The run keeps what Python swallowed and stops
    at its checkpoints: before the verdict (nothing published), once recorded, and at its
    end (published, and said so)."""
    module, owner, name = {
        "validation": ("streamflow.validation", "SuitesProcess", "run"),
        "verdict": ("streamflow.verdict", "Verdict", "accept"),
        "end": ("streamflow.reporting", "", "publish_artifacts"),  # the run's last step
        "end-raised": ("streamflow.reporting", "", "publish_artifacts"),
    }[where]
    swallowed = where != "end-raised"
    wrapper = tmp_path / "swallowed.py"
    wrapper.write_text(
        "import importlib, os, runpy, signal, sys\n"
        f"owner = importlib.import_module({module!r})\n"
        f"owner = getattr(owner, {owner!r}) if {owner!r} else owner\n"
        f"real = getattr(owner, {name!r})\n"
        "class Finalizer:\n"
        "    def __del__(self):\n"
        f"        os.kill(os.getpid(), signal.{signum})\n"
        "        for _ in range(1000):  # the handler runs here, inside __del__\n"
        "            pass\n"
        "def swallow_then_go_on(*args, **kwargs):\n"
        f"    if {where!r} != 'validation':\n"
        "        done = real(*args, **kwargs)\n"
        f"    Finalizer() if {swallowed} else Finalizer.__del__(None)  # collected at once\n"
        f"    return real(*args, **kwargs) if {where!r} == 'validation' else done\n"
        f"setattr(owner, {name!r}, swallow_then_go_on)\n"
        "sys.argv.pop(0)\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    home = migrated_prefect_home(tmp_path / "prefect")
    proc = _cli(db_url, months / "month_000", home, str(wrapper))

    assert ("Exception ignored in" in proc.stderr) == swallowed, proc.stderr[-2000:]
    assert proc.returncode == code, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == line
    assert scalar(db_url, "SELECT count(*) FROM ingest_months") == int(published)
    if not published:
        by = "SIGTERM" if signum == "SIGTERM" else "Ctrl-C or SIGINT"
        assert scalar(db_url, "SELECT error FROM ingest_runs") == (
            f"interrupted ({by}); nothing was published"
        )


def test_prefects_own_sigterm_handler_stays_installed_during_a_run(
    run_flow, db_url, months, monkeypatch
):
    """A runner's cancel (the UI, `prefect flow-run cancel`, docker stop of the runner) is
    acknowledged by the run's process only while Prefect's own SIGTERM handler is the
    installed one. The first version of the swallowed-signal check wrapped it for the
    whole run (review): a cancelled served run would have been recorded Crashed. That
    check reads sys.unraisablehook instead."""
    from prefect.utilities.engine import _prefect_sigterm_handler

    seen = []
    real = validation.SuitesProcess.run

    def look_then_run(self, *args, **kwargs):
        seen.append(signal.getsignal(signal.SIGTERM))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(validation.SuitesProcess, "run", look_then_run)
    rc, _, err = run_flow(db_url, months / "month_000", JAN)

    assert rc == 0, err[-2000:]
    assert seen == [_prefect_sigterm_handler]
