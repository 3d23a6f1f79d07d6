"""What validation asks of PostgreSQL, counted on a real staged month.

GX's stock row expectation runs its query twice and SUMMARY looks for examples of
every passing check: on a 1M-user month each is a scan of the month. A month that
passes is checked with one query per SQL check and no example queries; a month that
fails still gets counts and examples in its message. The GX process never outlives a
run whose staging failed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import psycopg
import pytest
from month_files import AS_OF, child_processes, read_rows, small_months, write_rows
from streamflow import loading, validation
from streamflow.outcomes import ExpectationOutcome, SuiteOutcome, describe_failure
from streamflow.registry import PARENT, TABLES
from streamflow.sqlfiles import queries

JAN = AS_OF["month_000"]
NUMERIC_COLUMNS = sum(c.pg_type == "numeric" for spec in TABLES for c in spec.columns)


@pytest.fixture(scope="module")
def months(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_months(tmp_path_factory.mktemp("small"))


@pytest.fixture
def statements() -> Iterator[list[str]]:
    """Every SQL statement GX's engine sends, in this process."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    yield seen
    event.remove(Engine, "before_cursor_execute", record)


def _stage(url: str, month: Path) -> None:
    with psycopg.connect(url) as conn:
        for spec in TABLES:
            loading.stage_file(conn, spec, month / spec.file_name)


def test_a_passing_month_costs_one_query_per_sql_check(db_url, months, statements):
    _stage(db_url, months / "month_000")

    found, _ = validation.prepare_suites(db_url, None)(date.fromisoformat(JAN))

    assert all(s.success for s in found), found
    orphan_marker = queries("validation")["orphans"].splitlines()[-1].strip()
    key_marker = queries("validation")["key_spelling"].splitlines()[-1].strip()
    # its last line around the column's name, which is filled in quoted
    number_marker = queries("validation")["not_numbers"].splitlines()[-1].strip().split("{column}")
    empty_marker = queries("validation")["empty_columns"].splitlines()[-1].split("{batch}")[0]
    ceiling_marker = queries("validation")["above_ceiling"].splitlines()[-1].split("{column}")[-1]
    runs = Counter(
        "empty_columns"
        if empty_marker in q
        else "above_ceiling"
        if ceiling_marker in q
        else "orphans"
        if orphan_marker in q
        else "not_numbers"
        if all(part in q for part in number_marker)
        else "key_spelling"
        if key_marker in q
        else "other"
        for q in statements
    )
    assert runs["orphans"] == len(TABLES) - 1  # once per child table, a count
    assert runs["not_numbers"] == NUMERIC_COLUMNS
    assert runs["key_spelling"] == 1  # users.csv only
    assert runs["above_ceiling"] == sum(c.at_most is not None for t in TABLES for c in t.columns)
    # one scan per table with columns that may be empty (labels has none)
    assert runs["empty_columns"] == sum(any(not c.required for c in t.columns) for t in TABLES)
    assert not [q for q in statements if "unexpected_values" in q]  # no example hunting


def test_validation_runs_without_loading_scipy_stats(db_url, months):
    """GX imports scipy.stats (a quarter of its import) for expectations not used here.

    In a fresh process, as in the GX child: a whole validation leaves it unloaded, and
    code that asks for it still gets the real module.
    """
    _stage(db_url, months / "month_000")
    script = (
        "import json, sys\n"
        "from datetime import date\n"
        "from streamflow import validation\n"
        "validate = validation.prepare_suites(sys.argv[1], None)\n"
        "outcomes, _ = validate(date.fromisoformat(sys.argv[2]))\n"
        "loaded = 'scipy.stats._stats_py' in sys.modules\n"
        "from scipy import stats\n"
        "print(json.dumps([all(o.success for o in outcomes), loaded,\n"
        "                  round(float(stats.entropy([0.5, 0.5])), 4)]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, db_url, JAN], capture_output=True, text=True, timeout=300
    )

    assert proc.returncode == 0, proc.stderr[-3000:]
    passed, stats_loaded, entropy = json.loads(proc.stdout.splitlines()[-1])
    assert passed
    assert not stats_loaded
    assert entropy == 0.6931  # ln 2: the lazily registered module is scipy.stats


def _failures(
    url: str, month: Path, *edits: str
) -> tuple[list[SuiteOutcome], dict[tuple[str, str], ExpectationOutcome]]:
    """Stage ``month``, run ``edits`` on staging, validate: the outcomes, and the failed
    expectations by (table, check)."""
    _stage(url, month)
    with psycopg.connect(url) as conn:
        for statement in edits:
            conn.execute(statement)  # type: ignore[arg-type]
    found, _ = validation.prepare_suites(url, None)(date.fromisoformat(JAN))
    failed = [e for s in found for e in s.expectations if not e.success]
    return found, {(e.table, e.expectation): e for e in failed}


def test_a_failing_table_still_gets_counts_and_examples(db_url, months, statements):
    found, failed = _failures(
        db_url,
        months / "month_000",
        "INSERT INTO staging.labels (user_id, churn_label) VALUES ('ghost', true)",
        "UPDATE staging.usage_agg_30d SET watch_hours_30d = 'NaN' "
        "WHERE user_id = (SELECT min(user_id) FROM staging.usage_agg_30d)",
    )

    assert set(failed) == {("labels", "orphans"), ("usage_agg_30d", "not_numbers")}
    orphans = failed["labels", "orphans"]
    assert (orphans.unexpected_count, orphans.example_user_ids) == (1, ["ghost"])
    nan = failed["usage_agg_30d", "not_numbers"]
    assert (nan.unexpected_count, nan.column, nan.examples) == (1, "watch_hours_30d", ["NaN"])
    passing = [s for s in found if s.table not in ("labels", "usage_agg_30d")]
    assert passing and all(s.success for s in passing)
    assert describe_failure(orphans) == (
        f"labels.csv, column user_id: 1 row(s) whose user_id is not in {PARENT.file_name}, "
        "e.g. ghost"
    )


def test_a_user_id_that_is_not_a_plain_code_is_named(db_url, months):
    """Spreadsheets pad with no-break spaces, editors add byte-order marks and direction
    marks, a join adds a space: each is a different user_id to PostgreSQL that looks the
    same to people, wherever it sits in the id. And pandas reads 'NA' as a missing key."""
    bad = {
        "nbsp_after": "user_id || U&'\\00A0'",
        "bom_before": "U&'\\FEFF' || user_id",
        "tab_after": "user_id || E'\\t'",
        "zero_width_before": "U&'\\200B' || user_id",
        "direction_mark_after": "user_id || U&'\\200E'",
        "space_inside": "replace(user_id, '-', ' ')",
        "word_joiner_inside": "replace(user_id, '-', U&'-\\2060')",
        "hangul_filler_alone": "U&'\\3164'",
        # no font draws these: private use, noncharacters, in every plane they exist
        "private_use_after": "user_id || U&'\\E000'",
        "noncharacter_after": "user_id || U&'\\FFFF'",
        "plane_1_noncharacter_after": "user_id || U&'\\+01FFFE'",
        "plane_16_private_use_after": "user_id || U&'\\+10FFFD'",
        "pandas_missing_word": "'NA'",
        "null_word": "'NULL'",
    }
    edits = [
        f"UPDATE staging.users SET user_id = {expr} "  # noqa: S608 - the test's own SQL
        f"WHERE user_id = (SELECT user_id FROM staging.users ORDER BY user_id OFFSET {i} LIMIT 1)"
        for i, expr in enumerate(bad.values())
    ]
    # letters of any script are characters like any other
    edits.append("UPDATE staging.users SET user_id = 'É-' || user_id WHERE user_id LIKE '9%'")
    edits.append("UPDATE staging.users SET user_id = 'na-' || user_id WHERE user_id LIKE '8%'")

    _, failed = _failures(db_url, months / "month_000", *edits)

    found = failed["users", "key_spelling"]
    assert found.unexpected_count == len(bad)
    message = describe_failure(found)
    assert message.startswith(
        f"users.csv, column user_id: {len(bad)} value(s) with a space, control, invisible or "
        "private-use character, or a word read as missing (NA, NULL, None, nan), e.g. "
    ), message
    assert "'NA'" in message or "'NULL'" in message or "\\u200e" in message, message


def test_every_word_pandas_reads_as_missing_is_refused_as_a_user_id(db_url, months):
    """The lab's loader read these files with pandas.read_csv, whose defaults turn these
    words into NaN: such a user_id would lose its key in any CSV round trip. The list is
    pandas' own (the GX image's pandas), one user each."""
    from pandas._libs.parsers import STR_NA_VALUES

    words = sorted(w for w in STR_NA_VALUES if w)
    users = [row[0] for row in read_rows(months / "month_000" / "users.csv")[1:]]
    edits = [
        f"UPDATE staging.users SET user_id = {_literal(word)} "  # noqa: S608 - the test's own SQL
        f"WHERE user_id = {_literal(user)}"
        for word, user in zip(words, users, strict=False)
    ]

    _, failed = _failures(db_url, months / "month_000", *edits)

    assert failed["users", "key_spelling"].unexpected_count == len(words), words


def _literal(word: str) -> str:
    return "'" + word.replace("'", "''") + "'"


def test_every_file_has_a_row_for_every_user_of_users_csv(db_url, months):
    """A file that misses a user is refused, and so is a row for a user who is only in
    the live table: each file of a month lists the users of its users.csv. That row took
    the place of a user of users.csv in labels: the user it replaced is missing too (the
    row count, users.csv's, hid it)."""
    month = months / "month_000"
    ids = [row[0] for row in read_rows(month / "users.csv")[1:]]
    gone, replaced = min(ids), max(ids)  # "C" order, as SQL's
    _, failed = _failures(
        db_url,
        month,
        "DELETE FROM staging.payments_agg_90d "
        "WHERE user_id = (SELECT min(user_id) FROM staging.users)",
        "INSERT INTO users (user_id) VALUES ('live-only')",
        "UPDATE staging.labels SET user_id = 'live-only' "
        "WHERE user_id = (SELECT max(user_id) FROM staging.labels)",
    )

    assert set(failed) == {
        ("payments_agg_90d", "missing_users"),
        ("labels", "orphans"),
        ("labels", "missing_users"),
    }
    users = sum(1 for _ in (months / "month_000" / "users.csv").open()) - 1
    missing = failed["payments_agg_90d", "missing_users"]
    assert (missing.unexpected_count, missing.example_user_ids) == (1, [gone])
    assert describe_failure(missing) == (
        f"payments_agg_90d.csv: {users - 1} row(s) for the {users} of users.csv; expected one "
        f"row per user, none for 1 user(s) of users.csv, e.g. {gone}"
    )
    assert failed["labels", "orphans"].example_user_ids == ["live-only"]
    assert failed["labels", "missing_users"].example_user_ids == [replaced]
    assert describe_failure(failed["labels", "missing_users"]).startswith(
        f"labels.csv: {users} row(s) for the {users} of users.csv, some of them not in "
        "users.csv; expected one row per user, none for 1 user(s)"
    )


def _validation_children() -> list[int]:
    """Processes of ``python -m streamflow.validation`` started by this process."""
    children = child_processes(os.getpid()).items()
    return [pid for pid, argv in children if b"streamflow.validation" in argv]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_the_gx_process_does_not_outlive_a_failed_staging(
    real_gx_process, run_flow, db_url, months, tmp_path
):
    """GX starts with staging; when a file is refused it is stopped, not left importing."""
    bad = tmp_path / "month_000"
    shutil.copytree(months / "month_000", bad)
    rows = read_rows(bad / "labels.csv")
    rows[0][1] = "churn"  # a renamed column: refused by staging
    write_rows(bad / "labels.csv", rows)
    start = time.perf_counter()

    rc, _, err = run_flow(db_url, bad, JAN)

    assert rc == 1 and "labels.csv" in err, err[-2000:]
    assert time.perf_counter() - start < 60
    assert _validation_children() == []


def test_warnings_made_errors_in_the_environment_do_not_stop_validation(
    real_gx_process, run_flow, db_url, months, monkeypatch
):
    """PYTHONWARNINGS=error (a developer's shell, a CI's) made a DeprecationWarning of
    GX's own imports the run's failure: "validation could not run (GX process):
    DeprecationWarning: module 'sre_constants' is deprecated"."""
    monkeypatch.setenv("PYTHONWARNINGS", "error")

    rc, out, err = run_flow(db_url, months / "month_000", JAN)

    assert rc == 0, err[-2000:]
    assert "published live + history" in out


def test_a_gx_process_that_cannot_reach_the_database_says_so_in_one_line():
    """GX wraps the database's error in SQLAlchemy's, in its own TestConnectionError: the
    flow's message was that chain's repr, with literal \\n\\t in it. It is now the
    innermost error, in the CLI's words."""
    import socket

    from streamflow.errors import IngestError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    suites = validation.SuitesProcess(
        f"postgresql://u:p@127.0.0.1:{port}/db?connect_timeout=2", None
    )
    try:
        suites.connect()
        with pytest.raises(IngestError) as err:
            suites.run(date.fromisoformat(JAN))
    finally:
        suites.close()

    message = str(err.value)
    assert message.startswith(
        "validation could not run (GX process): the database could not be reached: "
    ), message
    assert "\\n" not in message and "Error(" not in message, message


def test_a_gx_process_killed_says_by_which_signal():
    """An OOM kill said 'exit code -9'."""
    import signal

    from streamflow.errors import IngestError

    suites = validation.SuitesProcess("postgresql://u:p@127.0.0.1:9/db", None)
    try:
        suites._proc.send_signal(signal.SIGKILL)
        suites._proc.wait(timeout=30)
        with pytest.raises(IngestError) as err:
            suites.run(date.fromisoformat(JAN))
    finally:
        suites.close()

    assert str(err.value) == (
        "validation could not run (GX process): killed by SIGKILL (out of memory, or "
        "stopped from outside the run)"
    )
