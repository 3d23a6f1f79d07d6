"""Regenerate every figure of reports/rapport_tp2.md from a fresh run on the real lab files.

    python reports/figures.py                    # writes reports/figures/<name>.txt
    python reports/figures.py --update-report    # ... and rewrites the report's marked blocks
    SHARED_SEEDS_DIR=/path/to/seeds python reports/figures.py

What it does, in order (no Docker needed):

1. starts a throwaway PostgreSQL (the ``pgserver`` wheel, like tests/conftest.py) in a
   temp dir, creates the database ``streamflow`` and applies ``db/init/001_schema.sql``
   and ``db/init/002_ingest_login.sh`` with psql, as the postgres image's entrypoint does;
2. runs the flow's CLI (``services/prefect/ingest_flow.py``, a subprocess, as the ingest
   login) on ``month_000`` as of 2024-01-31, reruns it, replaces it, feeds it a corrupted
   copy of ``month_001``, then ``month_001`` as of 2024-02-29, a rerun, and a refusal;
3. between the runs, runs psql and SQL queries and keeps their output as text.

Each figure is a text block. In the report, a block sits between
``<!-- figure: NAME -->`` and ``<!-- /figure -->``; ``--update-report`` replaces it.
Durations and temp paths are masked (they change on every run). The test
tests/test_report_figures.py recomputes the data-dependent figures (``DATA_FIGURES``)
on a fresh ingestion and compares them with the report.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOW_DIR = REPO / "services" / "prefect"
FLOW_SCRIPT = FLOW_DIR / "ingest_flow.py"
REPORT = REPO / "reports" / "rapport_tp2.md"
OUT_DIR = REPO / "reports" / "figures"
# With --from-commit the script runs again from an export of that commit; these two
# variables tell that child run which repository it describes and which commit it is.
GIT_REPO = Path(os.environ.get("FIGURES_GIT_REPO", REPO))
SOURCE_COMMIT = os.environ.get("FIGURES_SOURCE_COMMIT")
if str(FLOW_DIR) not in sys.path:
    sys.path.insert(0, str(FLOW_DIR))

from streamflow.registry import LIVE_TABLES, SNAPSHOT_TABLES, TABLES  # noqa: E402
from streamflow.settings import RUN_VARIABLES  # noqa: E402
from streamflow.sqlfiles import queries  # noqa: E402

JAN, FEB = "2024-01-31", "2024-02-29"
DB_NAME = "streamflow"
INGEST_LOGIN = "streamflow_app"
PROMPT = f"{DB_NAME}=# "
# Figures that depend only on the data and the code (not on timing, paths or the machine):
# the test recomputes them on a fresh ingestion and compares them with the report.
DATA_FIGURES = (
    "key_figures",
    "seed_files",
    "expectations",
    "sql_publish_live",
    "sql_publish_history",
    "psql_dt",
    "psql_d_users",
    "psql_d_labels_snapshots",
    "count_after_month_000",
    "null_plan_flags",
    "snapshot_counts",
    "snapshots_by_as_of",
    "table_stats_month_001",
    "changes_between_snapshots",
    "usage_columns_changed",
    "label_transitions",
    "bounds",
    "psql_dt_history_partitions",
)


def shared_seeds_dir() -> Path:
    """Where the real lab months are: SHARED_SEEDS_DIR, else ../shared/seeds."""
    return Path(os.environ.get("SHARED_SEEDS_DIR", REPO.parent / "shared" / "seeds"))


def shown_path(path: Path) -> str:
    """A path as the report shows it: relative to the repository when it is next to it."""
    path = Path(os.path.abspath(path))
    if path.is_relative_to(REPO.parent):
        return os.path.relpath(path, REPO)
    return str(path)


# --------------------------------------------------------------------------- psql


def psql_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C.UTF-8", LANG="C.UTF-8", PAGER="", PSQL_PAGER="")
    return env


def psql(url: str, command: str) -> str:
    """One psql command (a query or a backslash command), its output as psql prints it."""
    result = subprocess.run(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-P", "pager=off", "-d", url, "-c", command],
        capture_output=True,
        text=True,
        env=psql_env(),
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"psql failed on {command!r}: {result.stderr.strip()}")
    return result.stdout


def psql_block(url: str, *commands: str) -> str:
    """Commands and outputs as an interactive psql session shows them (trailing spaces cut)."""
    parts = []
    for command in commands:
        lines = command.strip().splitlines()
        shown = [PROMPT + lines[0]] + [" " * (len(DB_NAME) - 1) + "-# " + s for s in lines[1:]]
        parts.append("\n".join(shown) + "\n" + psql(url, command).rstrip("\n"))
    return tidy("\n\n".join(parts))


def tidy(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


# --------------------------------------------------------------------------- figures: files


def fig_seed_files(seeds: Path) -> str:
    """1.c: the six files of each month: rows, header, identical between months or not."""
    lines = []
    for month in ("month_000", "month_001"):
        lines.append(f"$ ls {month}")
        lines.append("  ".join(sorted(p.name for p in (seeds / month).iterdir())))
    lines.append("")
    lines.append(f"{'file':<22} {'rows 000':>8} {'rows 001':>8}  same bytes  header")
    for spec in TABLES:
        a, b = (seeds / m / spec.file_name for m in ("month_000", "month_001"))
        header = a.open(encoding="utf-8").readline().strip()
        same = "yes" if _sha256(a) == _sha256(b) else "no"
        lines.append(
            f"{spec.file_name:<22} {_data_rows(a):>8} {_data_rows(b):>8}  {same:<10}  {header}"
        )
    return "\n".join(lines)


def _data_rows(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip()) - 1


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


TREE_EXCLUDE = {".git", ".venv", ".pgdata", "var", "__pycache__", ".pytest_cache", ".ruff_cache"}


def fig_tree(root: Path = REPO) -> str:
    """1.b: like ``tree -a --noreport -I '.git|.venv|.pgdata|var|__pycache__|...'``."""
    lines = ["."]

    def skip(p: Path) -> bool:
        rel = p.relative_to(root).as_posix()
        generated = p.name.endswith(".egg-info") or rel in ("bench/out", ".env")
        return p.name in TREE_EXCLUDE or generated

    def walk(folder: Path, prefix: str) -> None:
        entries = sorted((p for p in folder.iterdir() if not skip(p)), key=lambda p: p.name.lower())
        for i, p in enumerate(entries):
            last = i == len(entries) - 1
            lines.append(prefix + ("└── " if last else "├── ") + p.name)
            if p.is_dir() and not p.is_symlink():
                walk(p, prefix + ("    " if last else "│   "))

    walk(root, "")
    return "\n".join(lines)


def fig_git_state() -> str:
    """1.a: the repository as it was when the figures were generated."""
    out = []
    for cmd in (
        ["ls"],
        ["git", "status", "--short", "--branch"],
        ["git", "log", "--oneline"],
        ["git", "tag", "--list"],
    ):
        result = subprocess.run(cmd, cwd=GIT_REPO, capture_output=True, text=True, check=False)
        text = result.stdout.strip()
        if cmd[0] == "ls":
            text = "  ".join(text.split())
        out.append("$ " + " ".join(cmd) + ("\n" + text if text else ""))
    return "\n".join(out)


def fig_provenance() -> str:
    """Which code produced the figures: a commit exported by git archive, or the work tree."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=GIT_REPO, capture_output=True, text=True, check=False
        ).stdout.strip()

    if SOURCE_COMMIT:
        return "\n".join(
            [
                f"code: git archive {SOURCE_COMMIT[:12]} (uncommitted changes not included)",
                f"commit: {git('log', '-1', '--format=%h %s', SOURCE_COMMIT)}",
            ]
        )
    changed = git("status", "--porcelain", "--untracked-files=no")
    return "\n".join(
        [
            "code: the work tree of the repository",
            f"commit: {git('log', '-1', '--format=%h %s')}",
            "uncommitted changes to tracked files: "
            + (", ".join(line[3:] for line in changed.splitlines()) or "none"),
        ]
    )


def fig_docker_check() -> str:
    """2.d: is there a Docker engine here? Read-only commands only (nothing is started)."""
    out = []
    commands = (
        ["docker", "compose", "version"],
        ["docker", "info", "--format", "{{.ServerVersion}}"],
    )
    for cmd in commands:
        if shutil.which(cmd[0]) is None:
            out.append("$ " + " ".join(cmd) + "\nbash: docker: command not found")
            continue
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        text = (result.stdout + result.stderr).strip()
        text = "\n".join(line for line in text.splitlines() if line.strip())
        out.append("$ " + " ".join(cmd) + "\n" + text + f"\n$ echo $?\n{result.returncode}")
    return "\n".join(out)


def fig_expectations() -> str:
    """4.a: the expectation suites exactly as streamflow/expectations.py builds them."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from streamflow.expectations import build_suite

    gx.get_context(mode="ephemeral")
    lines = []
    for spec in TABLES:
        suite = build_suite(spec)
        lines.append(f"{spec.name} ({len(suite.expectations)} expectations)")
        for e in suite.expectations:
            lines.append(f"  {e.expectation_type:<38} {_describe(e)}")
    return "\n".join(lines)


# The row-count floors given at run time (streamflow/expectations.py's parameters).
_ROW_FLOORS = {
    "users_rows": "the rows of users.csv (a row per user)",
    "users_floor": (
        "the users of the month published before the as_of, less MAX_USERS_DROP_PERCENT "
        "(0 for a first month, or with --allow-drop)"
    ),
}


def _parameter(value: object) -> object:
    return value.get("$PARAMETER") if isinstance(value, dict) else None


def _describe(e) -> str:
    kw = e.configuration.kwargs
    if e.expectation_type == "expect_table_columns_to_match_set":
        return ", ".join(kw["column_set"])
    if e.expectation_type == "expect_table_row_count_to_be_between":
        return f"min_value={_ROW_FLOORS.get(_parameter(kw['min_value']), kw['min_value'])}"
    if e.expectation_type == "expect_column_values_to_be_between" and kw.get("max_value"):
        top = "the run's as_of" if _parameter(kw["max_value"]) == "as_of" else kw["max_value"]
        return f"{kw['min_value']} <= {kw['column']} <= {top}"
    if e.expectation_type == "expect_column_value_lengths_to_be_between":
        return f"{kw['column']}: at most {kw['max_value']} characters"
    if e.expectation_type == "expect_column_values_to_be_between":
        return f"{kw['column']} >= {kw['min_value']:g}"
    if e.expectation_type == "expect_column_proportion_of_unique_values_to_be_between":
        return f"{kw['column']}: distinct values / rows = 1 (unique)"
    if e.expectation_type == "expect_column_values_to_be_in_set":
        return f"{kw['column']} in {{{', '.join(kw['value_set'])}}}"
    if "column" in kw:
        return kw["column"]
    return e.description or ""


def fig_publish_sql() -> dict[str, str]:
    """3.b and 5.a: the named queries of db/sql/publish.sql that write live and history rows."""
    named = queries("publish")

    def pick(*markers: str) -> str:
        return "\n\n".join(
            f"-- db/sql/publish.sql, name: {name}\n{text}"
            for name, text in named.items()
            if any(m in text for m in markers)
        )

    live = (
        "drop_empty_live_key",
        "append_live",
        "restore_live_key",
        "insert_live",
        "merge_live",
        "not_listed_later",
        "backfill_rows",
    )
    return {
        "sql_publish_live": "\n\n".join(
            f"-- db/sql/publish.sql, name: {name}\n{named[name]}" for name in live
        ),
        "sql_publish_history": pick("{history}", "{partition}", "_month_partition("),
    }


# --------------------------------------------------------------------------- figures: database


def fig_schema(url: str) -> dict[str, str]:
    """2.a: the tables of db/init/001_schema.sql, as psql lists them."""
    return {
        "psql_dt": psql_block(url, r"\dt"),
        "psql_dt_staging": psql_block(url, r"\dt staging.*"),
        "psql_d_users": psql_block(url, r"\d users"),
        "psql_d_labels_snapshots": psql_block(url, r"\d labels_snapshots"),
    }


def fig_after_month_000(url: str) -> dict[str, str]:
    """3.c: the lab's two counts; and the empty cells that stayed NULL."""
    return {
        "count_after_month_000": psql_block(
            url, "SELECT COUNT(*) FROM users;", "SELECT COUNT(*) FROM subscriptions;"
        ),
        "null_plan_flags": psql_block(
            url,
            "SELECT net_service, count(*) AS users,\n"
            "       count(*) FILTER (WHERE plan_stream_tv IS NULL) AS tv_null,\n"
            "       count(*) FILTER (WHERE plan_stream_movies IS NULL) AS movies_null,\n"
            "       count(*) FILTER (WHERE plan_stream_tv) AS tv_true\n"
            "FROM subscriptions GROUP BY net_service ORDER BY net_service;",
        ),
    }


def _history_join(table: str) -> str:
    return (
        f"FROM {table} j JOIN {table} f USING (user_id)\n"
        f"WHERE j.as_of = '{JAN}' AND f.as_of = '{FEB}'"
    )


def fig_after_month_001(url: str) -> dict[str, str]:
    """5.b and the design section: history per as_of, what changed, bounds seen."""
    verify = queries("verify")
    # Identifiers below come from the table registry, never from data: S608 does not apply.
    changes = (
        "\nUNION ALL\n".join(
            f"SELECT '{t}' AS history_table, count(*) AS users_in_both,\n"
            "       count(*) FILTER (WHERE to_jsonb(j) - 'as_of' <> to_jsonb(f) - 'as_of')"
            " AS changed\n" + _history_join(t)
            for t in SNAPSHOT_TABLES
        )
        + "\nORDER BY 1;"
    )  # UNION ALL alone has no order (parallel append)
    usage = next(s for s in TABLES if s.name == "usage_agg_30d")
    usage_cols = ",\n       ".join(
        f"count(*) FILTER (WHERE j.{c} IS DISTINCT FROM f.{c}) AS {c}"
        for c in usage.snapshot_columns
    )
    bounds = (
        "\nUNION ALL\n".join(  # noqa: S608
            f"SELECT '{c.name}' AS col, min({c.name}), max({c.name}) FROM {t}"  # noqa: S608
            for spec in TABLES
            for c in spec.columns
            if c.non_negative
            for t in [spec.snapshot_table if c.name in spec.snapshot_columns else spec.name]
        )
        + "\nORDER BY 1;"
    )
    return {
        "snapshot_counts": psql_block(
            url,
            f"SELECT COUNT(*) FROM subscriptions_profile_snapshots WHERE as_of = '{JAN}';",  # noqa: S608
            f"SELECT COUNT(*) FROM subscriptions_profile_snapshots WHERE as_of = '{FEB}';",  # noqa: S608
        ),
        "snapshots_by_as_of": psql_block(url, verify["snapshots_by_as_of"].rstrip(";") + ";"),
        "table_stats_month_001": psql_block(
            url,
            'SELECT s."table", s.read, s.inserted, s.updated, s.unchanged, s.snapshot_table,\n'
            "       s.snapshot_inserted\n"
            "FROM ingest_runs r, jsonb_to_recordset(r.table_stats) AS s(\n"
            '       "table" text, read int, inserted int, updated int, unchanged int,\n'
            "       snapshot_table text, snapshot_inserted int)\n"
            f"WHERE r.as_of = '{FEB}' AND r.status = 'succeeded';",
        ),
        "changes_between_snapshots": psql_block(url, changes),
        "usage_columns_changed": psql_block(
            url, f"SELECT {usage_cols}\n{_history_join('usage_agg_30d_snapshots')};"
        ),
        "label_transitions": psql_block(
            url,
            f"SELECT j.churn_label AS churn_{JAN.replace('-', '_')}, "
            f"f.churn_label AS churn_{FEB.replace('-', '_')}, count(*)\n"
            + _history_join("labels_snapshots")
            + "\nGROUP BY 1, 2 ORDER BY 1, 2;",
            "SELECT count(*) FILTER (WHERE churn_label) AS churners_live FROM labels;",
        ),
        "bounds": psql_block(url, bounds),
        "psql_dt_history_partitions": psql_block(url, r"\dt labels_snapshots*"),
    }


# --------------------------------------------------------------------------- key figures
# The numbers the report's prose quotes, each read from PostgreSQL by one query.


def _scalars(url: str, named: dict[str, str]) -> dict[str, int]:
    import psycopg

    with psycopg.connect(url) as conn:
        return {k: int(conn.execute(q).fetchone()[0]) for k, q in named.items()}  # type: ignore[arg-type,index]


def key_values_month_000(url: str) -> dict[str, int]:
    return _scalars(
        url,
        {
            "clients after month_000 (users)": "SELECT count(*) FROM users",
            "subscriptions after month_000": "SELECT count(*) FROM subscriptions",
            "plan_stream_tv NULL after month_000": (
                "SELECT count(*) FROM subscriptions WHERE plan_stream_tv IS NULL"
            ),
            "plan_stream_movies NULL after month_000": (
                "SELECT count(*) FROM subscriptions WHERE plan_stream_movies IS NULL"
            ),
        },
    )


def key_values_month_001(url: str) -> dict[str, int]:
    named = {
        f"{t} rows as_of {d}": f"SELECT count(*) FROM {t} WHERE as_of = '{d}'"  # noqa: S608
        for t in SNAPSHOT_TABLES
        for d in (JAN, FEB)
    }
    for d in (JAN, FEB):
        named[f"churners as_of {d} (labels_snapshots)"] = (
            f"SELECT count(*) FROM labels_snapshots WHERE as_of = '{d}' AND churn_label"  # noqa: S608
        )
    for spec in TABLES:
        named[f"{spec.name} rows updated by month_001 (ledger)"] = (
            "SELECT (s->>'updated')::int FROM ingest_runs r, jsonb_array_elements(r.table_stats) s "  # noqa: S608
            f"WHERE r.as_of = '{FEB}' AND r.status = 'succeeded' "
            f"AND s->>'table' = '{spec.name}'"
        )
    return _scalars(url, named)


def fig_key_figures(values: dict[str, int]) -> str:
    return "\n".join(f"{k:<58} {v:>5}" for k, v in values.items())


def french(n: int) -> str:
    """7043 -> '7 043', as the report's prose writes numbers."""
    return f"{n:,}".replace(",", " ")


def fig_digests(url: str) -> str:
    """Row count and md5 of every published table (ingest_months on as_of + fingerprint)."""
    sources = [
        f"SELECT '{t}' AS t, x::text AS r FROM {t} x"  # noqa: S608
        for t in LIVE_TABLES + SNAPSHOT_TABLES
    ]
    sources.append(
        "SELECT 'ingest_months', x::text FROM (SELECT as_of, fingerprint FROM ingest_months) x"
    )
    return psql_block(
        url,
        "SELECT t AS table_name, count(*) AS rows,\n"
        "       left(md5(string_agg(r, '|' ORDER BY r)), 12) AS md5\n"
        "FROM (" + "\n      UNION ALL ".join(sources) + ") AS published\n"
        "GROUP BY t ORDER BY t;",
    )


def as_rerun(block: str) -> str:
    """The same psql block, shown as psql's ``\\g`` (run the last query again)."""
    output = block.split(";\n", 1)[1] if ";\n" in block else block
    return PROMPT + "\\g\n" + output


def fig_ledger(url: str, where: str = "", columns: str = "") -> str:
    cols = columns or "run_id, as_of, status, mode, error"
    return psql_block(url, f"SELECT {cols}\nFROM ingest_runs{where}\nORDER BY run_id;")


# --------------------------------------------------------------------------- the flow CLI


class FlowCli:
    """Runs ``python services/prefect/ingest_flow.py`` as a separate process, as a person does."""

    def __init__(self, database_url: str, state: Path) -> None:
        self.docs = state / "gx_docs"
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("DATABASE_URL", "POSTGRES_HOST", *RUN_VARIABLES)
            and not k.startswith("PREFECT_")
        }
        env.update(
            DATABASE_URL=database_url,
            PREFECT_HOME=str(state / "prefect"),
            # Prefect's temporary server gets 20 s to start by default: short on a busy box.
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
            DO_NOT_TRACK="1",
            GX_ANALYTICS_ENABLED="False",
            GX_DOCS_DIR=str(self.docs),
            PYTHONUNBUFFERED="1",
        )
        self.env = env
        self.masks: dict[str, str] = {str(self.docs): "$GX_DOCS_DIR"}
        self.seconds: list[float] = []

    def run(self, seed_dir: Path, as_of: str, *extra: str) -> tuple[int, str, str]:
        argv = ["--seed-dir", shown_path(seed_dir), "--as-of", as_of, *extra]
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, str(FLOW_SCRIPT), *argv],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        self.seconds.append(time.perf_counter() - start)
        command = "$ python services/prefect/ingest_flow.py " + " ".join(argv)
        return result.returncode, self.mask(command), self.mask(result.stdout), result.stderr

    def mask(self, text: str) -> str:
        for real, shown in self.masks.items():
            text = text.replace(real, shown)
        return mask_duration(text)


def mask_duration(text: str) -> str:
    """'published live + history in 7.8s [' -> 'in …s [': durations change on every run."""
    return re.sub(r" in \d+(?:\.\d+)?s \[", " in …s [", text)


_LOG = re.compile(
    r"^\d\d:\d\d:\d\d\.\d+ \| (?P<level>\w+)\s*\| (?P<who>(?:Task|Flow) run '[^']*') - (?P<msg>.*)$"
)


def log_lines(stderr: str, keep: Callable[[str], bool]) -> list[str]:
    """Prefect log lines whose message passes ``keep``; time and run-name suffixes masked."""
    out = []
    for line in stderr.splitlines():
        m = _LOG.match(line)
        if m and keep(m["msg"]):
            who = re.sub(r"-[0-9a-f]{3}'$", "'", m["who"])  # task run: name-<3 hex>
            who = re.sub(r"^Flow run '.*'$", "Flow run '…'", who)  # flow run: a random name
            out.append(f"{m['level']:<7} | {who} - {m['msg']}")
    return out


def cli_block(command: str, rc: int, stdout: str, stderr: str, *, error_line: bool) -> str:
    """The command, what it printed for people, and its exit code.

    On stdout: the one-line summary. On failure the CLI's own line starts with
    "ingest failed:"; Prefect's logs (also on stderr) are left out here.
    """
    lines = [command]
    lines += [s for s in stdout.splitlines() if s.strip()]
    if error_line:
        lines += [s for s in stderr.splitlines() if s.startswith("ingest failed:")]
    lines += ["$ echo $?", str(rc)]
    return "\n".join(lines)


def corrupted_copy(month: Path, dest: Path, row: int = 100, value: str = "-3.5") -> Path:
    """``month`` copied to ``dest`` with one watch_hours_30d replaced by ``value``."""
    shutil.copytree(month, dest)
    path = dest / "usage_agg_30d.csv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    fields = lines[row].split(",")
    assert fields[0] and len(fields) == 6, lines[row]
    fields[1] = value
    lines[row] = ",".join(fields)
    path.write_text("".join(lines), encoding="utf-8")
    return dest


# --------------------------------------------------------------------------- the run


@contextlib.contextmanager
def throwaway_postgres(workdir: Path) -> Iterator[str]:
    """A real PostgreSQL in ``workdir``, deleted afterwards; yields the superuser URL."""
    import pgserver

    server = pgserver.get_server(workdir, cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def with_database(url: str, dbname: str, user: str | None = None) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc = parts.netloc if user is None else f"{user}@" + parts.netloc.split("@")[-1]
    return urlunsplit(parts._replace(path="/" + dbname, netloc=netloc))


def init_database(admin_url: str) -> tuple[str, str, str]:
    """Create ``streamflow``, apply db/init as the postgres image does.

    Returns (superuser URL, ingest-login URL, what psql and the script printed).
    """
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    url = with_database(admin_url, DB_NAME)
    schema = subprocess.run(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", "db/init/001_schema.sql"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=psql_env(),
        check=True,
    )
    # 002_ingest_login.sh talks to the server through libpq's PG* variables, as in Docker.
    host = dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))["host"]
    env = psql_env() | {
        "PGHOST": host,
        "POSTGRES_USER": "postgres",
        "POSTGRES_DB": DB_NAME,
        "INGEST_DB_USER": INGEST_LOGIN,
        "INGEST_DB_PASSWORD": secrets.token_hex(12),
    }
    login = subprocess.run(
        ["bash", "db/init/002_ingest_login.sh"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    log = "\n".join(
        [
            "$ psql -X -v ON_ERROR_STOP=1 -d streamflow -f db/init/001_schema.sql",
            schema.stdout.strip(),
            "$ bash db/init/002_ingest_login.sh",
            login.stdout.strip(),
        ]
    )
    return url, with_database(admin_url, DB_NAME, user=INGEST_LOGIN), tidy(log)


def generate(seeds: Path, workdir: Path, progress: Callable[[str], None] = print) -> dict[str, str]:
    """Every figure, from a fresh database and the real CLI; name -> text block."""
    fig: dict[str, str] = {}
    fig["provenance"] = fig_provenance()
    fig["git_state"] = fig_git_state()
    fig["tree"] = fig_tree()
    fig["seed_files"] = fig_seed_files(seeds)
    fig["docker_check"] = fig_docker_check()
    progress("expectation suites")
    fig["expectations"] = fig_expectations()
    fig.update(fig_publish_sql())

    with throwaway_postgres(workdir / "pgdata") as admin_url:
        url, login_url, fig["schema_init"] = init_database(admin_url)
        fig.update(fig_schema(url))
        cli = FlowCli(login_url, workdir)
        m0, m1 = seeds / "month_000", seeds / "month_001"

        def step(name: str, seed_dir: Path, as_of: str, *extra: str, expect: int) -> str:
            progress(f"flow: {name}")
            rc, command, out, err = cli.run(seed_dir, as_of, *extra)
            if rc != expect:
                raise RuntimeError(f"{name}: exit {rc}, expected {expect}\n{err[-4000:]}")
            fig[name] = cli_block(command, rc, out, err, error_line=rc != 0)
            return err

        err = step("run_month_000", m0, JAN, expect=0)
        fig["suites_month_000"] = "\n".join(log_lines(err, lambda m: m.startswith("suite ")))
        fig.update(fig_after_month_000(url))
        keys = key_values_month_000(url)
        step("rerun_month_000", m0, JAN, expect=0)
        err = step("replace_month_000", m0, JAN, "--replace", expect=0)
        fig["suites_replace_month_000"] = "\n".join(
            log_lines(err, lambda m: m.startswith("suite "))
        )
        fig["digests_before_failure"] = fig_digests(url)

        bad = corrupted_copy(m1, workdir / "month_001")
        # The temp dirs' random suffixes, masked at the same width (psql aligns columns on
        # them): this one, and, run from a commit (--from-commit), the archive's, which
        # the ledger's absolute seed_dir shows.
        for tmp in (workdir, REPO.parent):
            if tmp.name.startswith("streamflow-figures-"):
                cli.masks[str(tmp)] = str(
                    tmp.parent / re.sub(r"[^-]+$", lambda m: "X" * len(m.group()), tmp.name)
                )
        err = step("failing_run", bad, FEB, expect=1)
        fig["failing_run_logs"] = "\n".join(
            log_lines(err, lambda m: m.startswith(("suite usage", "ingest failed")))
        )
        after = fig_digests(url)
        if after != fig["digests_before_failure"]:
            raise RuntimeError(
                "the failed run changed a published table:\n"
                + fig["digests_before_failure"]
                + "\n"
                + after
            )
        fig["digests_after_failure"] = as_rerun(after)
        fig["ledger_failed_validation"] = cli.mask(
            psql_block(
                url,
                "SELECT run_id, status, jsonb_pretty(validation) AS validation\n"
                "FROM ingest_runs WHERE status = 'failed';",
            )
        )

        step("run_month_001", m1, FEB, expect=0)
        fig.update(fig_after_month_001(url))
        keys |= key_values_month_001(url)
        fig["key_figures"] = fig_key_figures(keys)
        step("rerun_month_001", m1, FEB, expect=0)
        step("refused_other_files", m0, FEB, expect=1)
        fig["ledger"] = cli.mask(
            fig_ledger(
                url,
                columns="run_id, as_of, status, mode, seed_dir,\n"
                "       table_stats IS NOT NULL AS has_stats, left(error, 60) AS error",
            )
        )
        fig["ingest_months"] = psql_block(
            url, "SELECT as_of, run_id, left(fingerprint, 12) AS fingerprint FROM ingest_months;"
        )
        fig["lab_bool_conversion"] = fig_lab_bool_conversion(m0)
        progress("flow CLI wall times (s): " + ", ".join(f"{s:.0f}" for s in cli.seconds))
    return fig


def fig_lab_bool_conversion(month: Path) -> str:
    """What the lab's pandas way would do with the empty plan flags (needs pandas)."""
    try:
        import pandas as pd
    except ImportError:
        return "(pandas is not installed: pip install -r requirements/bench.txt)"
    df = pd.read_csv(month / "subscriptions.csv")
    col = df["plan_stream_tv"]
    return "\n".join(
        [
            ">>> df = pd.read_csv('month_000/subscriptions.csv')",
            ">>> df['plan_stream_tv'].isna().sum(), (df['plan_stream_tv'] == True).sum()",
            f"({int(col.isna().sum())}, {int((col == True).sum())})",  # noqa: E712
            ">>> df['plan_stream_tv'].astype(bool).sum()   # the lab's TODO, done naively",
            f"{int(col.astype(bool).sum())}",
        ]
    )


# --------------------------------------------------------------------------- the report

_BLOCK = re.compile(
    r"<!-- figure: (?P<name>[\w-]+) -->\n```text\n"
    r"(?P<body>(?:(?!<!-- /?figure).)*?)"  # never runs into the next block
    r"```\n<!-- /figure -->",
    re.DOTALL,
)


def _block(name: str, text: str) -> str:
    body = text + "\n" if text else ""
    return f"<!-- figure: {name} -->\n```text\n{body}```\n<!-- /figure -->"


def report_figures(text: str) -> dict[str, str]:
    """The marked blocks of the report: name -> text."""
    return {m["name"]: m["body"].removesuffix("\n") for m in _BLOCK.finditer(text)}


def update_report(text: str, figures: dict[str, str]) -> tuple[str, list[str]]:
    """Replace every marked block by its fresh figure; returns (text, names not generated)."""
    missing: list[str] = []

    def repl(m: re.Match[str]) -> str:
        name = m["name"]
        if name not in figures:
            missing.append(name)
            return m.group(0)
        return _block(name, figures[name])

    return _BLOCK.sub(repl, text), missing


def from_commit(rev: str, seeds: Path, progress: Callable[[str], None]) -> dict[str, str]:
    """Every figure, produced by the code of commit ``rev`` (``git archive``), not the work tree.

    Other people edit the work tree while figures are made: this runs this script again
    inside an export of ``rev``, next to a ``shared/seeds`` link, so paths read the same.
    """
    sha = subprocess.run(
        ["git", "rev-parse", "--verify", rev + "^{commit}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="streamflow-figures-src-") as tmp:
        root = Path(tmp)
        src = root / "main"
        src.mkdir()
        tar = subprocess.run(["git", "archive", sha], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(src)], input=tar.stdout, check=True)
        (src / "reports").mkdir(exist_ok=True)
        shutil.copy2(Path(__file__), src / "reports" / "figures.py")
        (root / "shared").mkdir()
        (root / "shared" / "seeds").symlink_to(seeds.resolve(), target_is_directory=True)
        env = {k: v for k, v in os.environ.items() if k != "SHARED_SEEDS_DIR"}
        env.update(FIGURES_GIT_REPO=str(GIT_REPO), FIGURES_SOURCE_COMMIT=sha)
        progress(f"running from git archive {sha[:12]} in {src}")
        subprocess.run(
            [sys.executable, str(src / "reports" / "figures.py"), "--out", str(root / "out")],
            cwd=src,
            env=env,
            check=True,
        )
        return {p.stem: p.read_text(encoding="utf-8")[:-1] for p in (root / "out").glob("*.txt")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where to write <name>.txt")
    parser.add_argument(
        "--update-report", action="store_true", help=f"rewrite the blocks of {REPORT.name}"
    )
    parser.add_argument(
        "--from-commit",
        metavar="REV",
        help="run the code of this commit (git archive), not the work tree, e.g. HEAD",
    )
    args = parser.parse_args(argv)
    seeds = shared_seeds_dir()
    if not (seeds / "month_001" / "users.csv").is_file():
        print(f"the real lab files are not in {seeds} (set SHARED_SEEDS_DIR)", file=sys.stderr)
        return 2
    if shutil.which("psql") is None:
        print("psql is needed (e.g. apt-get install postgresql-client)", file=sys.stderr)
        return 2
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(message, file=sys.stderr)

    if args.from_commit:
        figures = from_commit(args.from_commit, seeds, progress)
    else:
        with tempfile.TemporaryDirectory(prefix="streamflow-figures-") as tmp:
            figures = generate(seeds, Path(tmp), progress=progress)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.txt"):
        old.unlink()
    for name, text in figures.items():
        (args.out / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
    print(f"{len(figures)} figures written to {shown_path(args.out)}/", file=sys.stderr)
    if args.update_report:
        text, missing = update_report(REPORT.read_text(encoding="utf-8"), figures)
        REPORT.write_text(text, encoding="utf-8")
        if missing:
            print(f"not generated, left as is: {', '.join(missing)}", file=sys.stderr)
        print(f"{shown_path(REPORT)} updated", file=sys.stderr)
    print(f"done in about {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
