"""``python -m streamflow.verify``: the counts on success, one line and exit 1 otherwise.

verify runs as a subprocess (the way people run it), so exit codes, stdout and stderr
are the real ones; the databases are the real PostgreSQL of conftest.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
from conftest import DATA_SEEDS, FLOW_DIR, REPO
from month_files import read_rows, write_rows
from streamflow.registry import TABLES

MONTH_000 = DATA_SEEDS / "month_000"
AS_OF_000 = "2024-01-31"
# Port 9 (discard) on loopback: nothing listens there, the connection is refused at once.
UNREACHABLE = "postgresql://postgres@127.0.0.1:9/x"
LEDGER_HEADER = re.compile(r"^run_id \| as_of +\| status +\| mode +\| duration +\| error")


def verify(url: str, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    # Only DATABASE_URL steers it: no POSTGRES_* from the developer's shell.
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTGRES_")}
    env.update(DATABASE_URL=url, PYTHONPATH=str(FLOW_DIR), **extra_env)
    return subprocess.run(
        [sys.executable, "-m", "streamflow.verify", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def block(stdout: str, name: str) -> list[str]:
    """The lines of one ``-- name`` section of verify's output, the title excluded.

    Every column is padded to its width, the last one too: trailing spaces are dropped.
    """
    sections = {s.splitlines()[0]: s.splitlines()[1:] for s in stdout.strip().split("\n\n")}
    return [line.rstrip() for line in sections[f"-- {name}"]]


def dbname(url: str) -> str:
    with psycopg.connect(url) as conn:
        return conn.info.dbname


def test_counts_and_ledger_after_month_000(db_url, run_flow):
    rc, _, err = run_flow(db_url, MONTH_000, AS_OF_000)
    assert rc == 0, err

    proc = verify(db_url)

    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    live = block(proc.stdout, "live_tables")
    assert live[0] == "table_name       | row_count"
    assert [r.split(" | ")[0].strip() for r in live[2:]] == [t.name for t in TABLES]
    assert "users            | 7043" in live
    assert "labels           | 7043" in live
    [header, rule, *rows] = block(proc.stdout, "snapshots_by_as_of")
    assert header.startswith("as_of      | subscriptions_profile | usage_agg_30d")
    assert [r.split(" | ")[0] for r in rows] == ["2024-01-31"]
    # Every column against the tables themselves: the five histories, then the churners.
    with psycopg.connect(db_url) as conn:
        expected = [
            conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # noqa: S608
            for t in (
                "subscriptions_profile_snapshots",
                "usage_agg_30d_snapshots",
                "payments_agg_90d_snapshots",
                "support_agg_90d_snapshots",
                "labels_snapshots",
            )
        ]
        expected.append(
            conn.execute("SELECT count(*) FROM labels_snapshots WHERE churn_label").fetchone()[0]
        )
    assert [int(c) for c in rows[0].split(" | ")[1:]] == expected
    assert expected[0] == 7043 and 0 < expected[-1] < 7043
    [header, rule, *rows] = block(proc.stdout, "ledger")
    assert LEDGER_HEADER.match(header), header
    assert set(rule) <= {"-", "+"}
    [row] = rows
    # A run that succeeded has no error: the column stays empty, not "None".
    assert re.fullmatch(r"1      \| 2024-01-31 \| succeeded \| \w+ +\| +\d+\.\d{3} s +\|", row), row


def failed_run(db_url: str, run_flow, tmp_path: Path, watch_hours: str) -> None:
    """A first month refused for one user's watch_hours_30d (file line 6)."""
    bad = tmp_path / "month_000"
    shutil.copytree(MONTH_000, bad)
    rows = read_rows(bad / "usage_agg_30d.csv")
    rows[5][rows[0].index("watch_hours_30d")] = watch_hours
    write_rows(bad / "usage_agg_30d.csv", rows)
    rc, _, err = run_flow(db_url, bad, AS_OF_000)
    assert rc == 1, err


def test_a_failed_run_says_why_in_the_ledger(db_url, run_flow, tmp_path: Path):
    failed_run(db_url, run_flow, tmp_path, "-3.5")

    proc = verify(db_url)

    assert proc.returncode == 0, proc.stderr
    assert "users            | 0" in block(proc.stdout, "live_tables")
    [header, _, row] = block(proc.stdout, "ledger")
    assert LEDGER_HEADER.match(header), header
    [run_id, as_of, status, mode, duration, error] = row.split(" | ", 5)
    assert (run_id.strip(), as_of, status.strip()) == ("1", AS_OF_000, "failed"), row
    assert error.startswith(
        "validation failed: usage_agg_30d.csv, column watch_hours_30d: 1 value(s) below 0"
    ), row
    # The whole message (with the user_id) is longer: clipped, and marked as clipped.
    assert len(error) == 100 and error.endswith("…"), error  # clipped by verify.sql


def test_an_error_an_ascii_terminal_cannot_show_is_printed_escaped(db_url, run_flow, tmp_path):
    """An ASCII stdout (PYTHONIOENCODING, a C locale) and a run whose error quotes a
    cell with an emoji, clipped with "…": the counts are printed, each character it
    cannot encode as its escape, exit 0 (it crashed with UnicodeEncodeError, exit 1)."""
    failed_run(db_url, run_flow, tmp_path, "3.5 🙂")
    with psycopg.connect(db_url) as conn:
        [(error,)] = conn.execute("SELECT error FROM ingest_runs").fetchall()
    assert "🙂" in error.splitlines()[0][:99] and len(error.splitlines()[0]) > 100, error

    proc = verify(db_url, PYTHONIOENCODING="ascii")

    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.isascii()
    [header, _, row] = block(proc.stdout, "ledger")
    assert LEDGER_HEADER.match(header), header
    shown = row.split(" | ", 5)[5]
    assert shown == error.splitlines()[0][:99].encode("ascii", "backslashreplace").decode() + (
        "\\u2026"
    ), shown
    assert "\\U0001f642" in shown, shown


def test_a_database_without_the_schema_is_one_line_and_exit_1(empty_db_url):
    proc = verify(empty_db_url)

    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f'verify: database "{dbname(empty_db_url)}" has no StreamFlow schema yet'
        " (run a month first)"
    ], proc.stderr


def test_an_unreachable_database_is_one_line_and_exit_1():
    proc = verify(UNREACHABLE)

    assert proc.returncode == 1
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()
    # In the flow's words (diagnosis.explain_failure), with their hints for refused logins.
    assert line.startswith("verify failed: the database could not be reached: "), line
    assert "127.0.0.1" in line and "9" in line, line


def test_a_refused_login_is_told_in_the_flows_words(pg_admin_url):
    """verify said 'cannot connect' of a server that answered and refused the login;
    the flow says which (diagnosis.explain_failure), with what to fix when it knows."""
    from conftest import with_database

    proc = verify(with_database(pg_admin_url, "sf_no_such_database"))

    assert proc.returncode == 1
    [line] = proc.stderr.splitlines()
    assert line.startswith("verify failed: the database refused the login: "), line
    assert 'database "sf_no_such_database" does not exist' in line, line


def test_help_prints_usage_without_touching_the_database():
    # The database is unreachable: had --help connected, it would exit 1.
    proc = verify(UNREACHABLE, "--help")

    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith("usage: ")
    assert "verification counts" in proc.stdout
    assert "DATABASE_URL" in proc.stdout


def test_an_unknown_argument_is_a_usage_error():
    proc = verify(UNREACHABLE, "--bogus")

    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "usage: " in proc.stderr and "--bogus" in proc.stderr


def test_a_run_past_a_minute_shows_all_its_seconds(db_url):
    """A 75 s run reads 75.000 s (to_char's 'SS' field wrapped it to 15.000 s)."""
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO ingest_runs (as_of, seed_dir, status, mode, started_at, finished_at) "
            "VALUES ('2024-01-31', 'month_000', 'succeeded', 'publish', "
            "        '2024-02-01 02:00:00+00', '2024-02-01 02:01:15+00')"
        )

    proc = verify(db_url)

    assert proc.returncode == 0, proc.stderr
    [_, _, row] = block(proc.stdout, "ledger")
    assert row.split("|")[4].strip() == "75.000 s", row


def test_the_embedded_default_starts_without_a_word_on_stderr(tmp_path):
    """No DATABASE_URL nor POSTGRES_HOST: the embedded PostgreSQL (pgserver) in
    STREAMFLOW_PGDATA. Without XDG_RUNTIME_DIR (containers, CI) its import used to
    print a platformdirs warning on every run; now the only line is verify's own."""
    import pgserver

    pgdata = tmp_path / "pgdata"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("POSTGRES_") and k not in ("DATABASE_URL", "XDG_RUNTIME_DIR")
    }
    # Empty, not absent: a developer's .env (read from the repo too) must not name a server.
    env.update(
        PYTHONPATH=str(FLOW_DIR), STREAMFLOW_PGDATA=str(pgdata), DATABASE_URL="", POSTGRES_HOST=""
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "streamflow.verify"],
            cwd=tmp_path,  # no .env here
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:  # the embedded server outlives the run by design: stop this one
        if (pgdata / "postmaster.pid").exists():
            pgserver.get_server(pgdata, cleanup_mode="stop").cleanup()

    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [
        'verify: database "postgres" has no StreamFlow schema yet (run a month first)'
    ], proc.stderr[-2000:]
    assert (pgdata / "PG_VERSION").is_file()  # a real server was initialised there
