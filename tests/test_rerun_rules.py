"""The rerun rules and the ledger: every run recorded; same files -> no-op; other files
-> refused unless --replace (then replaced in one transaction); an older as_of ->
history, and live rows only for the users no later month lists (backfill).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from conftest import ALL_TABLES, DATA_TABLES, dump, scalar
from month_files import (
    AS_OF,
    database_copy,
    end_writer_lock_holder,
    flow_command,
    flow_env,
    ingest,
    ok,
    read_rows,
    runs,
    small_months,
    with_value,
    write_rows,
)
from streamflow.registry import LIVE_TABLES, SNAPSHOT_TABLES, TABLES
from streamflow.validation import RESULTS_FOLDER

JAN, FEB = AS_OF["month_000"], AS_OF["month_001"]
_names = itertools.count()


@pytest.fixture(scope="module")
def months(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_months(tmp_path_factory.mktemp("small"))


@pytest.fixture
def new_db(pg_admin_url: str, template_db: str) -> Iterator[Callable[[], str]]:
    """A factory of extra fresh databases (schema applied), dropped after the test."""
    with ExitStackOfDatabases(pg_admin_url, template_db) as factory:
        yield factory


class ExitStackOfDatabases:
    def __init__(self, admin_url: str, template: str) -> None:
        import contextlib

        self._stack = contextlib.ExitStack()
        self._admin, self._template = admin_url, template

    def __enter__(self) -> Callable[[], str]:
        self._stack.__enter__()
        return self

    def __call__(self) -> str:
        name = f"sf_rerun_{os.getpid()}_{next(_names)}"
        return self._stack.enter_context(database_copy(self._admin, self._template, name))

    def __exit__(self, *exc: object) -> None:
        self._stack.__exit__(*exc)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def changed_copy(src: Path, dest: Path, *, drop_user_row: int | None = None) -> Path:
    """``src`` with every label flipped (and optionally one user left out of every file)."""
    shutil.copytree(src, dest)
    for spec in TABLES:
        path = dest / spec.file_name
        rows = read_rows(path)
        if spec.name == "labels":
            for r in rows[1:]:
                r[1] = {"True": "False", "False": "True"}[r[1]]
        if drop_user_row is not None:
            del rows[drop_user_row]
        write_rows(path, rows)
    return dest


def with_a_negative_payment(month: Path) -> Path:
    """``month`` (a copy) with one failed_payments_90d below 0: refused by validation,
    after every file was staged."""
    rows = read_rows(month / "payments_agg_90d.csv")
    rows[150][1] = "-1"
    write_rows(month / "payments_agg_90d.csv", rows)
    return month


# --------------------------------------------------------------------------- the ledger


def test_ledger_records_every_run(run_flow, db_url, months, tmp_path):
    jan, feb = months / "month_000", months / "month_001"
    ok(run_flow(db_url, jan, JAN))
    ok(run_flow(db_url, feb, FEB))
    ok(run_flow(db_url, feb, FEB))  # no-op
    bad = tmp_path / "bad"
    shutil.copytree(feb, bad)
    (bad / "labels.csv").write_text("user_id,churn_label\nX-1,perhaps\n")
    assert run_flow(db_url, bad, FEB, "--replace")[0] == 1  # fails in COPY
    other = changed_copy(feb, tmp_path / "other")
    assert run_flow(db_url, other, FEB)[0] == 1  # refused: other files, no --replace

    ledger = runs(db_url)
    assert [(r["as_of"].isoformat(), r["status"]) for r in ledger] == [
        (JAN, "succeeded"),
        (FEB, "succeeded"),
        (FEB, "noop"),
        (FEB, "failed"),
        (FEB, "failed"),
    ]
    for r in ledger:
        assert r["started_at"] is not None and r["finished_at"] is not None
        assert r["finished_at"] >= r["started_at"]
        assert r["fingerprint"] and r["timings"]
    # Files: per table, name, sha256 and size, exactly as on disk.
    for r, folder in zip(ledger, (jan, feb, feb, bad, other), strict=True):
        assert r["seed_dir"] == str(folder)
        assert set(r["files"]) == {t.name for t in TABLES}
        for spec in TABLES:
            path = folder / spec.file_name
            entry = dict(r["files"][spec.name])
            stat = entry.pop("stat")  # where the file was and when it last changed
            assert entry == {
                "file": spec.file_name,
                "sha256": sha256(path),
                "bytes": path.stat().st_size,
            }
            assert stat["path"] == str(path.resolve())
            assert (stat["inode"], stat["mtime_ns"]) == (
                path.stat().st_ino,
                path.stat().st_mtime_ns,
            )
    # Per-table outcome of the publishing runs.
    jan_run, feb_run, noop, failed, refused = ledger
    stats = {s["table"]: s for s in feb_run["table_stats"]}
    assert set(stats) == {t.name for t in TABLES}
    for s in jan_run["table_stats"]:
        assert (s["inserted"], s["updated"], s["unchanged"]) == (200, 0, 0), s
    users = stats["users"]
    assert (users["inserted"], users["updated"], users["unchanged"]) == (0, 0, 200)
    assert stats["usage_agg_30d"]["updated"] == 200
    assert 0 < stats["labels"]["updated"] < 200
    assert stats["labels"]["updated"] + stats["labels"]["unchanged"] == 200
    steps = {"fingerprint", "upsert_csv", "validate_with_ge", "snapshot_month"}
    assert set(feb_run["timings"]) >= steps
    assert feb_run["error"] is None and feb_run["mode"] == "publish"
    assert noop["mode"] == "noop" and noop["table_stats"] is None
    assert "labels.csv" in failed["error"] and "churn_label" in failed["error"]
    assert "upsert_csv" in failed["timings"] and "snapshot_month" not in failed["timings"]
    assert "--replace" in refused["error"]
    assert scalar(db_url, "SELECT count(*) FROM ingest_months") == 2
    published_by = scalar(db_url, "SELECT run_id FROM ingest_months WHERE as_of = %s", (FEB,))
    assert published_by == feb_run["run_id"]


def test_staging_is_emptied_once_a_month_is_published_and_kept_when_refused(
    run_flow, db_url, months, tmp_path
):
    """A published month's staged copy is read by nothing (~4 GB at 10M users); a
    refused one is kept, to be looked at with SQL, until the next run."""
    ok(run_flow(db_url, months / "month_000", JAN))
    with psycopg.connect(db_url) as conn:
        for t in TABLES:
            count = psycopg.sql.SQL("SELECT count(*) FROM {}").format(
                psycopg.sql.Identifier("staging", t.name)
            )
            assert conn.execute(count).fetchone() == (0,), t.name
    bad = tmp_path / "bad"
    shutil.copytree(months / "month_001", bad)
    rows = read_rows(bad / "support_agg_90d.csv")
    rows[1][1] = "-1"
    write_rows(bad / "support_agg_90d.csv", rows)
    rc, _, err = run_flow(db_url, bad, FEB)
    assert rc == 1 and "below 0" in err
    assert scalar(db_url, "SELECT count(*) FROM staging.support_agg_90d") == len(rows) - 1


def test_a_later_month_adds_new_users_and_counts_them(run_flow, db_url, months, tmp_path):
    """Month 2 with one user more in every file: inserted, counted as such per table."""
    ok(run_flow(db_url, months / "month_000", JAN))
    feb = tmp_path / "month_001"
    shutil.copytree(months / "month_001", feb)
    for spec in TABLES:
        rows = read_rows(feb / spec.file_name)
        rows.append(["U_NEW_0001", *rows[1][1:]])
        write_rows(feb / spec.file_name, rows)

    ok(run_flow(db_url, feb, FEB))

    stats = {s["table"]: s for s in runs(db_url)[-1]["table_stats"]}
    for spec in TABLES:
        s = stats[spec.name]
        assert s["inserted"] == 1, s
        assert s["read"] == 201 and s["inserted"] + s["updated"] + s["unchanged"] == 201, s
        assert scalar(db_url, f'SELECT count(*) FROM "{spec.name}"') == 201  # noqa: S608
    assert stats["users"]["updated"] == 0 and stats["usage_agg_30d"]["updated"] == 200
    new_usage = read_rows(feb / "usage_agg_30d.csv")[-1]
    live = scalar(
        db_url,
        "SELECT watch_hours_30d::text FROM usage_agg_30d WHERE user_id = %s",
        ("U_NEW_0001",),
    )
    assert live == new_usage[1]


def test_users_a_month_leaves_out_stay_live_and_are_counted(run_flow, db_url, months, tmp_path):
    """Users are never deleted: one missing from every file of month 2 keeps its month-1
    values live, is left out of month 2's snapshots, and the run says how many."""
    ok(run_flow(db_url, months / "month_000", JAN))
    gone = read_rows(months / "month_001" / "users.csv")[7][0]
    feb = tmp_path / "month_001"
    shutil.copytree(months / "month_001", feb)
    for spec in TABLES:
        rows = read_rows(feb / spec.file_name)
        write_rows(feb / spec.file_name, [r for r in rows if r[0] != gone])
    jan_label = scalar(db_url, "SELECT churn_label FROM labels WHERE user_id = %s", (gone,))

    out = ok(run_flow(db_url, feb, FEB))

    stats = {s["table"]: s for s in runs(db_url)[-1]["table_stats"]}
    for spec in TABLES:
        assert (stats[spec.name]["read"], stats[spec.name]["absent"]) == (199, 1), stats
    assert out.count("(1 absent, kept)") == len(TABLES), out
    assert scalar(db_url, "SELECT churn_label FROM labels WHERE user_id = %s", (gone,)) == jan_label
    in_feb = "SELECT count(*) FROM labels_snapshots WHERE user_id = %s AND as_of = %s"
    assert scalar(db_url, in_feb, (gone, FEB)) == 0


# --------------------------------------------------------------------------- same files


def test_same_as_of_same_files_is_a_fast_noop(run_flow, db_url, shared_seeds, record_property):
    jan = shared_seeds / "month_000"
    ok(run_flow(db_url, jan, JAN))
    before = dump(db_url, ALL_TABLES)

    start = time.perf_counter()
    out = ok(run_flow(db_url, jan, JAN))
    seconds = time.perf_counter() - start

    record_property("noop_rerun_seconds", round(seconds, 3))
    print(f"noop rerun of the 7,043-user lab month: {seconds:.2f} s wall")
    assert "nothing to do" in out
    assert dump(db_url, ALL_TABLES) == before
    last = runs(db_url)[-1]
    assert last["status"] == "noop"
    # Nothing was staged, validated or published: only the fingerprint was computed
    # (or, for files untouched since they were hashed, their stat compared).
    assert set(last["timings"]) <= {"schema", "fingerprint", "stat_check"}
    assert sum(last["timings"].values()) < 1.0, last["timings"]
    assert seconds < 10, seconds


def test_cli_answers_an_unchanged_month_without_prefect(run_flow, db_url, months):
    """``python ingest_flow.py`` on a published month: a no-op before Prefect or GX load.

    The Prefect API given to the process does not exist: had the CLI started a flow
    run, it would have failed to reach it. A changed month still goes to the flow
    (and so fails here, naming the API), proving the shortcut is only for no-ops.
    """
    jan = months / "month_000"
    ok(run_flow(db_url, jan, JAN))
    before = dump(db_url, ALL_TABLES)
    env = flow_env(db_url, PREFECT_API_URL="http://127.0.0.1:9/api")

    start = time.perf_counter()
    python, *script = flow_command(jan, JAN)
    proc = subprocess.run(
        [python, "-X", "importtime", *script], env=env, capture_output=True, text=True, timeout=120
    )
    seconds = time.perf_counter() - start
    print(f"CLI no-op rerun, process start to exit: {seconds:.2f} s")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already published from the same files; nothing to do" in proc.stdout
    imported = {
        line.split("|")[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "psycopg" in imported
    assert not {m for m in imported if m.split(".")[0] in ("prefect", "great_expectations")}
    assert dump(db_url, ALL_TABLES) == before
    last = runs(db_url)[-1]
    assert (last["status"], last["mode"]) == ("noop", "noop")
    assert set(last["timings"]) in ({"fingerprint"}, {"stat_check"})  # see the next test

    ledger_rows = len(runs(db_url))
    feb = subprocess.run(
        flow_command(months / "month_001", FEB),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert feb.returncode == 1, feb.stdout[-2000:]
    assert "ingest failed" in feb.stderr.strip().splitlines()[-1]
    assert len(runs(db_url)) == ledger_rows


def test_unchanged_files_are_known_by_their_stat_and_any_write_is_not(
    run_flow, db_url, months, tmp_path
):
    """The CLI does not read again a month untouched since it was hashed; a file
    rewritten with the same size and its old mtime put back is still caught (its ctime
    moved), and a file that was only rewritten identically is hashed and found unchanged.

    As above, the Prefect API is unreachable: only the no-op shortcut can succeed.
    """
    jan = tmp_path / "month_000"
    shutil.copytree(months / "month_000", jan)
    time.sleep(2.2)  # older than the racy margin when hashed: its stat can be trusted
    ok(run_flow(db_url, jan, JAN))
    env = flow_env(db_url, PREFECT_API_URL="http://127.0.0.1:9/api")

    def cli() -> subprocess.CompletedProcess:
        return subprocess.run(
            flow_command(jan, JAN), env=env, capture_output=True, text=True, timeout=120
        )

    assert cli().returncode == 0
    assert runs(db_url)[-1]["status"] == "noop"
    assert set(runs(db_url)[-1]["timings"]) == {"stat_check"}
    ok(run_flow(db_url, jan, JAN))  # the flow's own fingerprint step: the same rule
    assert runs(db_url)[-1]["status"] == "noop"
    assert set(runs(db_url)[-1]["timings"]) == {"schema", "stat_check"}

    labels = jan / "labels.csv"
    st = labels.stat()
    rows = read_rows(labels)
    rows[1], rows[2] = rows[2], rows[1]  # other bytes, same size
    write_rows(labels, rows)
    os.utime(labels, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (labels.stat().st_size, labels.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    ledger_rows = len(runs(db_url))
    changed = cli()
    assert changed.returncode == 1, changed.stdout[-2000:]  # handed to the flow: no API
    assert len(runs(db_url)) == ledger_rows
    rc, _, err = run_flow(db_url, jan, JAN)
    assert rc == 1 and "already published from different files" in err, err[-2000:]

    rows[1], rows[2] = rows[2], rows[1]
    write_rows(labels, rows)  # the original bytes again, a new ctime
    assert cli().returncode == 0
    assert runs(db_url)[-1]["status"] == "noop"
    assert set(runs(db_url)[-1]["timings"]) == {"fingerprint"}


def test_a_file_changed_just_before_it_was_hashed_is_not_known_by_its_stat(tmp_path):
    """Two writes within one tick of the filesystem's clock can share a ctime, so a
    file last changed less than RACY_MARGIN_NS before it was hashed is read again next
    time (git's "racily clean" rule); one changed well before is known by its stat."""
    from streamflow.fingerprints import RACY_MARGIN_NS, fingerprint_by_stat, fingerprint_file

    path = tmp_path / "labels.csv"
    path.write_text("user_id,churn_label\nA-1,True\n")
    hashed = fingerprint_file("labels", path).as_json()  # at once: within the margin
    assert hashed["stat"]["hashed_at_ns"] - hashed["stat"]["ctime_ns"] < RACY_MARGIN_NS

    assert fingerprint_by_stat({"labels": hashed}, {"labels": path}) is None
    settled = hashed | {"stat": hashed["stat"] | {"hashed_at_ns": hashed["stat"]["ctime_ns"]}}
    settled["stat"]["hashed_at_ns"] += RACY_MARGIN_NS
    [known] = fingerprint_by_stat({"labels": settled}, {"labels": path})
    assert (known.sha256, known.bytes) == (hashed["sha256"], hashed["bytes"])


def test_the_same_files_with_replace_are_published_again(run_flow, db_url, months):
    """--replace with the month's own files rewrites the month (a repair after the
    tables were edited by hand), in the flow and in the CLI: never answered as a no-op."""
    jan = months / "month_000"
    ok(run_flow(db_url, jan, JAN))
    expected = dump(db_url, DATA_TABLES)
    published = "SELECT run_id FROM ingest_months WHERE as_of = %s"
    with psycopg.connect(db_url) as conn:  # a hand edit of a live row
        conn.execute(
            "UPDATE labels SET churn_label = NOT churn_label WHERE user_id IN "
            "(SELECT user_id FROM labels ORDER BY user_id LIMIT 1)"
        )

    out = ok(run_flow(db_url, jan, JAN, "--replace"))

    assert "replaced live + history" in out and "labels +0 ~1 =199" in out, out
    assert dump(db_url, DATA_TABLES) == expected
    last = runs(db_url)[-1]
    assert (last["status"], last["mode"]) == ("succeeded", "publish (replace)")
    assert scalar(db_url, published, (JAN,)) == last["run_id"]

    cli = subprocess.run(
        flow_command(jan, JAN, "--replace"),
        env=flow_env(db_url),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "replaced live + history" in cli.stdout, cli.stdout
    last = runs(db_url)[-1]
    assert (last["status"], last["mode"]) == ("succeeded", "publish (replace)")
    assert scalar(db_url, published, (JAN,)) == last["run_id"]


def test_a_value_that_becomes_empty_or_stops_being_empty_is_published(
    run_flow, db_url, months, tmp_path
):
    """A change to or from an empty cell (NULL) is a change: compared with <>, a row
    with a NULL on either side is never "different", and the live table kept the old
    value (the MERGE compares with IS DISTINCT FROM)."""
    jan, feb = tmp_path / "month_000", tmp_path / "month_001"
    shutil.copytree(months / "month_000", jan)
    shutil.copytree(months / "month_001", feb)
    jan_rows = read_rows(jan / "support_agg_90d.csv")
    feb_rows = read_rows(feb / "support_agg_90d.csv")
    column = jan_rows[0].index("ticket_avg_resolution_hrs_90d")
    filled, emptied = jan_rows[3][0], jan_rows[4][0]
    jan_rows[3][column], jan_rows[4][column] = "", "2.5"
    by_id = {r[0]: r for r in feb_rows[1:]}
    by_id[filled][:] = [*jan_rows[3][:column], "3.5", *jan_rows[3][column + 1 :]]
    by_id[emptied][:] = [*jan_rows[4][:column], "", *jan_rows[4][column + 1 :]]
    write_rows(jan / "support_agg_90d.csv", jan_rows)
    write_rows(feb / "support_agg_90d.csv", feb_rows)
    ok(run_flow(db_url, jan, JAN))

    ok(run_flow(db_url, feb, FEB))

    live = "SELECT ticket_avg_resolution_hrs_90d::text FROM support_agg_90d WHERE user_id = %s"
    assert scalar(db_url, live, (filled,)) == "3.5"
    assert scalar(db_url, live, (emptied,)) is None
    history = live.replace("support_agg_90d", "support_agg_90d_snapshots") + " AND as_of = %s"
    assert scalar(db_url, history, (filled, FEB)) == "3.5"
    assert scalar(db_url, history, (emptied, FEB)) is None


def test_cli_validates_in_a_child_process(db_url, months):
    """The flow process never imports GX: the suites run in ``python -m streamflow.validation``.

    GX's ~270 MB of imports (and its open connection) go away with the child; the
    flow still reports every suite and publishes the month.
    """
    python, *script = flow_command(months / "month_000", JAN)
    proc = subprocess.run(
        [python, "-X", "importtime", *script],
        env=flow_env(db_url),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "published live + history" in proc.stdout
    imported = {
        line.split("|")[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "prefect" in imported
    assert not {m for m in imported if m.split(".")[0] == "great_expectations"}
    validation = runs(db_url)[-1]["validation"]
    assert {v["table"] for v in validation} == {t.name for t in TABLES}
    assert all(v["passed"] > 0 and v["failed"] == 0 for v in validation), validation


# --------------------------------------------------------------------------- other files


@pytest.mark.parametrize("name", ["docs$HOME", "docs${NO_SUCH_VARIABLE}"])
def test_a_dollar_in_the_docs_folder_is_a_dollar(
    run_flow, db_url, months, tmp_path, monkeypatch, name
):
    """GX reads $NAME in its config as a variable: the docs went to <folder>/root (and
    the CLI printed the folder it asked for), or, the variable unset, were not built."""
    docs = tmp_path / name
    monkeypatch.setenv("GX_DOCS_DIR", str(docs))

    rc, out, err = run_flow(db_url, months / "month_000", JAN)

    assert rc == 0, err
    assert (docs / "index.html").is_file()
    assert f"GX Data Docs: {docs / 'index.html'}" in out.splitlines()
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_the_run_is_named_after_its_month_as_read(run_flow, db_url, months, tmp_path, monkeypatch):
    """An as_of given with spaces is read trimmed; the UI's run was named with them. The
    Data Docs name the run the same way: their pages named no month, only a time."""
    from prefect.client.orchestration import get_client

    docs = tmp_path / "docs"
    monkeypatch.setenv("GX_DOCS_DIR", str(docs))

    ok(run_flow(db_url, months / "month_000", f" {JAN} "))

    flow_run_id = runs(db_url)[-1]["flow_run_id"]
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run_id).name == f"ingest-{JAN}"
    for suite in (f"{t.name}_suite" for t in TABLES):
        [page] = (docs / "validations" / suite / f"ingest-{JAN}").rglob("*.html")
        assert f"ingest-{JAN}" in page.read_text()
    assert (docs / "index.html").read_text().count(f"ingest-{JAN}") >= len(TABLES)


def test_the_data_docs_keep_every_runs_pages_and_list_them(
    run_flow, db_url, months, tmp_path, monkeypatch
):
    """The Data Docs showed the last run alone: GX deleted every earlier run's pages
    (their results lived in the GX process's memory only), so a refused month's pages,
    with the rows that failed, were gone once the next run had validated."""
    docs = tmp_path / "docs"
    monkeypatch.setenv("GX_DOCS_DIR", str(docs))
    refused = with_a_negative_payment(changed_copy(months / "month_001", tmp_path / "bad"))

    ok(run_flow(db_url, months / "month_000", JAN))
    rc, _, err = run_flow(db_url, refused, FEB)
    assert rc == 1 and "payments_agg_90d.csv" in err, err[-2000:]
    ok(run_flow(db_url, months / "month_001", FEB))

    index = (docs / "index.html").read_text()
    for spec in TABLES:
        suite = docs / "validations" / f"{spec.name}_suite"
        [january] = (suite / f"ingest-{JAN}").rglob("*.html")
        february = sorted((suite / f"ingest-{FEB}").rglob("*.html"))
        assert len(february) == 2, february  # the refused run's, then the published one's
        for page in (january, *february):
            assert str(page.relative_to(docs)) in index, page
    kept = sorted((docs / RESULTS_FOLDER / "payments_agg_90d_suite").rglob("*.json"))
    assert [json.loads(k.read_text())["success"] for k in kept] == [True, False, True]
    failed = json.loads(kept[1].read_text())["results"]
    assert [-1] in [r["result"].get("partial_unexpected_list") for r in failed], failed
    assert len(list((docs / RESULTS_FOLDER).rglob("*.json"))) == 3 * len(TABLES)


def test_the_ledger_records_the_folder_absolute(run_flow, db_url, months, monkeypatch):
    """A relative seed_dir was recorded as given: 'month_000' in ingest_runs said
    nothing of where the files were to whoever read it from elsewhere (a deployment's
    runner works in a folder nobody sees). The run's line keeps the name as given."""
    monkeypatch.chdir(months)

    line = ok(run_flow(db_url, "month_000", JAN))
    again = ok(run_flow(db_url, "month_000", JAN))

    assert line.startswith(f"month_000 as_of {JAN}: published"), line
    assert again.startswith(f"month_000 as_of {JAN}: already published"), again
    recorded = [(r["status"], r["seed_dir"]) for r in runs(db_url)]
    assert recorded == [
        ("succeeded", str(months / "month_000")),
        ("noop", str(months / "month_000")),
    ]


@pytest.mark.parametrize(
    ("blocked", "block", "error"),
    [
        ("index.html", Path.mkdir, "IsADirectoryError"),  # where GX writes its index page
        # Where GX keeps the users suite's results. Written by the checkpoint, during
        # validation, this failed the month ("validation could not run (GX process):
        # NotADirectoryError").
        (f"{RESULTS_FOLDER}/users_suite", Path.touch, "NotADirectoryError"),
    ],
)
def test_data_docs_that_could_not_be_built_are_not_announced(
    run_flow, db_url, months, tmp_path, monkeypatch, caplog, blocked, block, error
):
    """The CLI printed "GX Data Docs: <path>" after GX had failed to write them. A docs
    folder that cannot be written leaves the docs unbuilt, and the month published."""
    docs = tmp_path / "docs"
    (docs / blocked).parent.mkdir(parents=True)
    block(docs / blocked)
    monkeypatch.setenv("GX_DOCS_DIR", str(docs))

    with caplog.at_level(logging.WARNING):
        rc, out, err = run_flow(db_url, months / "month_000", JAN)

    assert rc == 0, err
    # Prefect's run logger reaches stderr, or, once a test before configured logging,
    # pytest's capture.
    logged = err + "\n".join(r.getMessage() for r in caplog.records)
    assert f"GX Data Docs not built: {error}" in logged, logged[-3000:]
    assert "GX Data Docs" not in out, out
    assert "published live + history" in out, out


def test_same_as_of_other_files_is_refused_without_replace(run_flow, db_url, months, tmp_path):
    ok(run_flow(db_url, months / "month_000", JAN))
    ok(run_flow(db_url, months / "month_001", FEB))
    before = dump(db_url, ALL_TABLES)
    other = changed_copy(months / "month_001", tmp_path / "other")

    rc, out, err = run_flow(db_url, other, FEB)

    assert rc == 1
    message = err.strip().splitlines()[-1]
    assert message.startswith("ingest failed: ")
    assert FEB in message and "--replace" in message and "REPLACE=1" in message
    assert "a deployment run: --param replace=true" in message
    assert "; labels.csv changed)" in message  # only the labels were flipped
    # February is the latest month: March's folder run with February's AS_OF left set.
    assert "check SEED_DIR and AS_OF (the month after it, 2024-03-31, is not published)" in message
    assert dump(db_url, ALL_TABLES) == before

    rc, out, err = run_flow(db_url, changed_copy(months / "month_000", tmp_path / "jan"), JAN)

    assert rc == 1
    message = err.strip().splitlines()[-1]
    assert "check SEED_DIR and AS_OF;" in message and "not published" not in message
    assert dump(db_url, ALL_TABLES) == before


def test_the_same_files_under_another_as_of_are_refused_without_replace(run_flow, db_url, months):
    """month_000's files again, as of February: a copied folder or a wrong AS_OF. Refused,
    nothing changed, the refusal in the ledger; --replace publishes them anyway."""
    ok(run_flow(db_url, months / "month_000", JAN))
    before = dump(db_url, ALL_TABLES)

    rc, _, err = run_flow(db_url, months / "month_000", FEB)

    assert rc == 1
    message = err.strip().splitlines()[-1]
    assert message.startswith(
        f"ingest failed: as_of {FEB}: these files were already published as as_of {JAN} (run 1)"
    ), message
    assert "--replace" in message and "a deployment run: --param replace=true" in message
    assert dump(db_url, ALL_TABLES) == before
    assert (runs(db_url)[-1]["status"], runs(db_url)[-1]["mode"]) == ("failed", "refused")

    ok(run_flow(db_url, months / "month_000", FEB, "--replace"))
    assert scalar(db_url, "SELECT count(DISTINCT as_of) FROM labels_snapshots") == 2
    assert runs(db_url)[-1]["mode"] == "publish (replace)"  # the override is on record
    ok(run_flow(db_url, months / "month_000", FEB))  # and that month is then unchanged
    assert runs(db_url)[-1]["status"] == "noop"


def test_another_months_files_for_a_published_as_of_are_named(run_flow, db_url, months):
    """February published, then February again from January's folder: the refusal says
    these are January's files, not only that February's changed (whose advice, --replace,
    would put January in February's place)."""
    ok(run_flow(db_url, months / "month_000", JAN))
    ok(run_flow(db_url, months / "month_001", FEB))

    rc, _, err = run_flow(db_url, months / "month_000", FEB)

    assert rc == 1
    assert f"these files were already published as as_of {JAN}" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_replace_rewrites_that_month_only(
    how, run_flow, db_url, new_db, months, tmp_path, monkeypatch
):
    jan, feb = months / "month_000", months / "month_001"
    ok(run_flow(db_url, jan, JAN))
    ok(run_flow(db_url, feb, FEB))
    jan_history = _history(db_url, JAN)
    # The new February: every label flipped and the 6th user gone from all six files.
    gone = read_rows(feb / "users.csv")[6][0]
    other = changed_copy(feb, tmp_path / "other", drop_user_row=6)

    extra = ("--replace",) if how == "flag" else ()
    if how == "env":
        monkeypatch.setenv("REPLACE", "1")
    out = ok(run_flow(db_url, other, FEB, *extra))
    assert "replac" in out.lower()
    # The line says what became of the month's history too: 200 labels flipped, one
    # user's row removed from each history table.
    assert (
        "; history: subscriptions_profile_snapshots +0 ~0 -1, usage_agg_30d_snapshots +0 ~0 -1, "
        "payments_agg_90d_snapshots +0 ~0 -1, support_agg_90d_snapshots +0 ~0 -1, "
        "labels_snapshots +0 ~199 -1]"
    ) in out, out  # only the labels changed: no other history row is rewritten

    # February's history is exactly what a clean ingest of the new files writes.
    reference = new_db()
    ok(run_flow(reference, jan, JAN))
    monkeypatch.delenv("REPLACE", raising=False)
    ok(run_flow(reference, other, FEB))
    assert _history(db_url, FEB) == _history(reference, FEB)
    assert (
        scalar(
            db_url,
            "SELECT count(*) FROM labels_snapshots WHERE as_of = %s AND user_id = %s",
            (FEB, gone),
        )
        == 0
    )
    # January is untouched, and the live tables hold the new files' values (the user
    # left out keeps the live rows it had: live rows are never deleted).
    assert _history(db_url, JAN) == jan_history
    assert _without(dump(db_url, LIVE_TABLES), gone) == _without(dump(reference, LIVE_TABLES), gone)
    fingerprint = runs(db_url)[-1]["fingerprint"]
    published = scalar(db_url, "SELECT fingerprint FROM ingest_months WHERE as_of = %s", (FEB,))
    assert published == fingerprint
    assert runs(db_url)[-1]["mode"] == "publish (replace)"


def test_a_failed_month_reaches_history_only_through_a_later_success(
    run_flow, db_url, months, tmp_path
):
    """History partitions are built in staging by the publishing transaction, then
    attached by it: a month that fails leaves nothing there nor in history (they used
    to be committed in staging and left for the next run's build to drop)."""
    bad = tmp_path / "month_000"
    shutil.copytree(months / "month_000", bad)
    rows = read_rows(bad / "usage_agg_30d.csv")
    rows[5][rows[0].index("skips_7d")] = "-1"
    write_rows(bad / "usage_agg_30d.csv", rows)
    month_tables = (
        "SELECT schemaname, right(tablename, 8), count(*) FROM pg_tables "
        "WHERE tablename ~ '_snapshots_[0-9]{8}$' GROUP BY 1, 2 ORDER BY 1, 2"
    )

    rc, _, err = run_flow(db_url, bad, JAN)

    assert rc == 1 and "skips_7d" in err, err[-2000:]
    n = len(SNAPSHOT_TABLES)
    with psycopg.connect(db_url) as conn:
        assert conn.execute(month_tables).fetchall() == []
    assert all(
        scalar(db_url, f'SELECT count(*) FROM "{t}"') == 0  # noqa: S608
        for t in SNAPSHOT_TABLES
    )

    ok(run_flow(db_url, months / "month_001", FEB))
    ok(run_flow(db_url, months / "month_000", JAN))  # a backfill: history only
    with psycopg.connect(db_url) as conn:
        assert conn.execute(month_tables).fetchall() == [
            ("public", "20240131", n),
            ("public", "20240229", n),
        ]
        attached = conn.execute(
            "SELECT count(*) FROM pg_inherits JOIN pg_class c ON c.oid = inhrelid "
            "WHERE c.relname ~ '_snapshots_[0-9]{8}$' AND c.relkind = 'r'"
        ).fetchone()[0]
    assert attached == 2 * n
    for as_of, month in ((JAN, "month_000"), (FEB, "month_001")):
        users = len(read_rows(months / month / "users.csv")) - 1
        assert all(
            scalar(
                db_url,
                f'SELECT count(*) FROM "{t}" WHERE as_of = %s',  # noqa: S608
                (as_of,),
            )
            == users
            for t in SNAPSHOT_TABLES
        )


def test_failed_replace_changes_nothing(run_flow, db_url, months, tmp_path):
    ok(run_flow(db_url, months / "month_000", JAN))
    ok(run_flow(db_url, months / "month_001", FEB))
    before = dump(db_url, ALL_TABLES)
    other = with_a_negative_payment(changed_copy(months / "month_001", tmp_path / "other"))

    rc, _, err = run_flow(db_url, other, FEB, "--replace")

    assert rc == 1 and "failed_payments_90d" in err.strip().splitlines()[-1]
    assert dump(db_url, ALL_TABLES) == before


def test_a_file_rewritten_after_it_was_hashed_is_refused(
    run_flow, db_url, months, tmp_path, monkeypatch
):
    """The ledger records the month's sha256 before the files are staged: a file written
    in between (an export still being copied in) must not be published under the hash
    of its earlier bytes. Here labels.csv is rewritten, same size, once the flow has
    fingerprinted the month; without the check the flipped labels were published and
    the ledger vouched for the original file."""
    from streamflow import fingerprints

    ok(run_flow(db_url, months / "month_000", JAN))
    before = dump(db_url, ALL_TABLES)
    month = tmp_path / "month"
    shutil.copytree(months / "month_001", month)
    rows = read_rows(month / "labels.csv")
    churned = next(r for r in rows[1:] if r[1] == "True")
    stayed = next(r for r in rows[1:] if r[1] == "False")
    churned[1], stayed[1] = "False", "True"  # two labels swapped: the same size
    flipped = tmp_path / "labels.csv"
    write_rows(flipped, rows)
    assert flipped.stat().st_size == (month / "labels.csv").stat().st_size
    real = fingerprints.fingerprint_month

    def then_rewrite(*args, **kwargs):
        result = real(*args, **kwargs)
        if not kwargs.get("remember"):  # the flow's own fingerprint, under its lock
            (month / "labels.csv").write_bytes(flipped.read_bytes())
        return result

    monkeypatch.setattr(fingerprints, "fingerprint_month", then_rewrite)
    rc, _, err = run_flow(db_url, month, FEB)

    assert rc == 1
    assert err.strip().splitlines()[-1] == (
        "ingest failed: labels.csv: changed while the run was reading it (it is not the "
        "file whose sha256 the run recorded); nothing was published: rerun once the "
        "export is complete"
    )
    assert dump(db_url, ALL_TABLES) == before
    assert runs(db_url)[-1]["status"] == "failed"
    monkeypatch.setattr(fingerprints, "fingerprint_month", real)
    ok(run_flow(db_url, month, FEB))  # the file as it is now, hashed and staged alike
    published = scalar(
        db_url, "SELECT files->'labels'->>'sha256' FROM ingest_runs ORDER BY run_id DESC LIMIT 1"
    )
    assert published == sha256(flipped)


def test_a_run_that_dies_after_its_commit_still_reads_as_published(
    run_flow, db_url, months, monkeypatch
):
    """The month commits, then the Data Docs are built and the run's row finished on
    another connection: a process killed in between (0.7-0.9 s a run) left a published
    month whose run the next run marked 'abandoned'. Here finish_run dies instead."""
    from streamflow import ledger

    real = ledger.finish_run

    def dies_when_succeeding(conn, run_id, *, status, **kwargs):
        if status == "succeeded":
            raise SystemExit(137)  # what a kill leaves: no finish_run, no cleanup
        return real(conn, run_id, status=status, **kwargs)

    monkeypatch.setattr(ledger, "finish_run", dies_when_succeeding)
    with pytest.raises(SystemExit):
        run_flow(db_url, months / "month_000", JAN)
    monkeypatch.setattr(ledger, "finish_run", real)
    (run,) = runs(db_url)
    published_by = scalar(db_url, "SELECT run_id FROM ingest_months WHERE as_of = %s", (JAN,))
    assert published_by == run["run_id"]
    assert run["status"] == "succeeded"
    assert [t["table"] for t in run["table_stats"]] == list(LIVE_TABLES)

    ok(run_flow(db_url, months / "month_001", FEB))
    assert [r["status"] for r in runs(db_url)] == ["succeeded", "succeeded"]


def test_a_connection_lost_after_the_commit_does_not_fail_a_published_month(
    run_flow, db_url, months, monkeypatch
):
    """The month committed, then the control connection went before the run's last
    ledger update (the audit stopped PostgreSQL there): the CLI said 'could not be
    reached', exit 1, of a published month. The commit marked the run succeeded; its
    timings are recorded on a new connection."""
    from streamflow import ledger

    real = ledger.finish_run
    cut = []

    def connection_gone_first(conn, run_id, *, status, **kwargs):
        if status == "succeeded" and not cut:
            cut.append(conn.info.backend_pid)
            end_writer_lock_holder(db_url)
        return real(conn, run_id, status=status, **kwargs)

    monkeypatch.setattr(ledger, "finish_run", connection_gone_first)
    rc, out, err = run_flow(db_url, months / "month_000", JAN)

    assert rc == 0, err[-2000:]
    assert "published live + history" in out
    (run,) = runs(db_url)
    assert run["status"] == "succeeded" and run["table_stats"] is not None
    assert cut and {"upsert_csv", "validate_with_ge", "snapshot_month"} <= set(run["timings"])


def test_a_retry_after_a_commit_whose_answer_was_lost_keeps_the_months_counts(
    run_flow, db_url, months, monkeypatch
):
    """The publisher's COMMIT reached the server, then its connection went before the
    answer: Prefect retried snapshot_month, which published the month again over itself
    and recorded its counts as nothing changed (+0 ~0, no history rows), in the ledger
    and on the run's line. The retry finds its run published and keeps the commit's."""
    from streamflow import ledger

    real_record, real_commit = ledger.record_month, psycopg.Connection.commit
    publisher: list[psycopg.Connection] = []
    lost: list[int] = []

    def record(conn, *args, **kwargs):
        publisher.append(conn)
        return real_record(conn, *args, **kwargs)

    def commit(self):
        real_commit(self)
        if self in publisher and not lost:
            lost.append(self.info.backend_pid)
            raise psycopg.OperationalError(
                "consuming input failed: server closed the connection unexpectedly"
            )

    monkeypatch.setattr(ledger, "record_month", record)
    monkeypatch.setattr(psycopg.Connection, "commit", commit)
    rc, out, err = run_flow(db_url, months / "month_000", JAN)
    monkeypatch.undo()

    assert rc == 0 and lost, err[-2000:]
    (run,) = runs(db_url)
    users = scalar(db_url, "SELECT count(*) FROM users")
    assert run["status"] == "succeeded"
    for t in run["table_stats"]:
        assert (t["inserted"], t["updated"]) == (users, 0), t
        assert t["snapshot_table"] is None or t["snapshot_inserted"] == users, t
    assert f"users +{users} ~0" in out, out
    assert "an earlier attempt's COMMIT reached the database" in err, err[-2000:]


def test_the_clis_noop_look_marks_runs_killed_before_it_abandoned(db_url, months, monkeypatch):
    """The CLI answers an unchanged month before the flow starts (rerun.unchanged_month,
    under the writer lock): a 'running' row left by a killed run stayed 'running' past
    it, until a run that was not a no-op came."""
    from streamflow import rerun

    ok_rc = ingest(db_url, months / "month_000", JAN)
    assert ok_rc == 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ingest_runs (as_of, seed_dir, status, mode) "
            "VALUES (%s, 'killed', 'running', 'publish')",
            (FEB,),
        )
    monkeypatch.setenv("DATABASE_URL", db_url)

    summary = rerun.unchanged_month(str(months / "month_000"), JAN)

    assert summary is not None and summary.status == "noop"
    assert [r["status"] for r in runs(db_url)] == ["succeeded", "abandoned", "noop"]
    # When the killed run stopped is not known: it got the next run's start (an abandoned
    # run of 3 s read as 19 s in the operator audit).
    assert runs(db_url)[1]["finished_at"] is None


def test_a_month_after_a_gap_is_refused_unless_allowed(run_flow, db_url, months):
    """A mistyped year (2025-02-28 for 2024-02-29) became the live tables' month for good:
    every real month after it ran as a backfill, and no run can take an as_of back. A
    new latest month is the one after the latest published, unless --allow-gap."""
    ok(run_flow(db_url, months / "month_000", JAN))
    before = dump(db_url, ALL_TABLES)

    rc, _, err = run_flow(db_url, months / "month_001", "2025-02-28")

    assert rc == 1
    assert err.strip().splitlines()[-1] == (
        "ingest failed: as_of 2025-02-28 is 13 months after the latest published month "
        "(2024-01-31), whose next is 2024-02-29: the months in between could then only be "
        "backfilled into history, never reach the live tables. Check AS_OF, or rerun with "
        "--allow-gap (or ALLOW_GAP=1; a deployment run: --param allow_gap=true) if those "
        "months will never be published"
    )
    assert dump(db_url, ALL_TABLES) == before
    assert (runs(db_url)[-1]["mode"], runs(db_url)[-1]["status"]) == ("refused", "failed")
    ok(run_flow(db_url, months / "month_001", "2024-03-31", "--allow-gap"))
    assert scalar(db_url, "SELECT max(as_of)::text FROM ingest_months") == "2024-03-31"


def test_a_refused_month_stops_publishing_at_once(run_flow, db_url, months, tmp_path, monkeypatch):
    """Publishing writes the whole month alongside validation; a refused month used to
    finish every write before it looked at the verdict (27 s at 1M rows after Ctrl-C in
    the audit). Here each live table's write is slowed by 10 s in PostgreSQL: the
    refusal cancels the statement in progress and starts no other."""
    from streamflow import publishing

    ok(run_flow(db_url, months / "month_000", JAN))
    before = dump(db_url, ALL_TABLES)
    bad = tmp_path / "bad"
    shutil.copytree(months / "month_001", bad)
    with_a_negative_payment(bad)
    real = publishing.upsert_live

    def slow_upsert(cur, spec, *args, **kwargs):
        cur.execute("SELECT pg_sleep(10)")
        return real(cur, spec, *args, **kwargs)

    monkeypatch.setattr(publishing, "upsert_live", slow_upsert)
    started = time.monotonic()
    rc, _, err = run_flow(db_url, bad, FEB)
    took = time.monotonic() - started

    assert rc == 1 and "failed_payments_90d" in err.strip().splitlines()[-1]
    assert took < 25, f"{took:.1f} s: the refused month's writes ran on (6 x 10 s)"
    assert dump(db_url, ALL_TABLES) == before


@pytest.mark.parametrize(
    ("stop", "signum"),
    [
        ("KeyboardInterrupt", signal.SIGINT),
        ("Terminated", signal.SIGTERM),
        ("TerminationSignal", signal.SIGTERM),  # Prefect's own, in a flow run
    ],
    ids=["Ctrl-C", "SIGTERM", "Prefect-SIGTERM"],
)
def test_an_interrupt_after_the_verdict_records_the_published_month_whole(
    run_flow, db_url, months, monkeypatch, stop, signum
):
    """Ctrl-C or SIGTERM once validation has passed: the publishing thread commits
    anyway. The ledger said 'failed' of a month that landed (fixed earlier: the failure
    record waits for the publishing transaction), then kept it succeeded but without its
    timings and expectation results, and the CLI said only 'interrupted'. The run is now
    recorded whole, and the interrupt says the month was published, by which signal."""
    from streamflow import interrupts
    from streamflow.interrupts import PublishedThenInterrupted
    from streamflow.verdict import Verdict

    real_accept = Verdict.accept

    def accept_then_interrupt(self):
        real_accept(self)
        if stop == "TerminationSignal":
            from prefect.exceptions import TerminationSignal

            raise TerminationSignal(signal.SIGTERM)
        raise getattr(interrupts, stop, KeyboardInterrupt)

    monkeypatch.setattr(Verdict, "accept", accept_then_interrupt)
    with pytest.raises(PublishedThenInterrupted) as stopped:
        run_flow(db_url, months / "month_000", JAN)

    assert stopped.value.signum == signum
    (run,) = runs(db_url)
    assert (run["status"], run["error"]) == ("succeeded", None)
    assert run["finished_at"] is not None
    assert {"upsert_csv", "validate_with_ge", "snapshot_month"} <= set(run["timings"])
    assert [v["table"] for v in run["validation"]] == list(LIVE_TABLES)
    assert [t["table"] for t in run["table_stats"]] == list(LIVE_TABLES)
    assert scalar(db_url, "SELECT run_id FROM ingest_months WHERE as_of = %s", (JAN,)) == 1


def test_an_interrupt_of_a_refused_run_says_nothing_was_published_and_why(
    run_flow, db_url, months, monkeypatch
):
    """A signal once the run was refused (here while its artifact is published): the
    CLI's line said only "ingest interrupted", though the refusal is in the ledger."""
    from streamflow import runs as flow_runs
    from streamflow.interrupts import StoppedUnpublished

    ok(run_flow(db_url, months / "month_000", JAN))
    real = flow_runs.publish_artifacts

    def interrupted_if_refused(summary):
        real(summary)
        if summary.mode == "refused":
            raise KeyboardInterrupt

    monkeypatch.setattr(flow_runs, "publish_artifacts", interrupted_if_refused)
    with pytest.raises(KeyboardInterrupt) as stopped:
        run_flow(db_url, months / "month_001", JAN)

    assert isinstance(stopped.value, StoppedUnpublished), repr(stopped.value)
    line, code = stopped.value.line()
    refusal = runs(db_url)[-1]
    assert (refusal["mode"], refusal["status"]) == ("refused", "failed")
    assert (line, code) == (
        f"ingest interrupted: nothing was published; the run had failed: {refusal['error']}",
        130,
    )


def _publisher_fails_after_its_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The publishing task raises once its COMMIT has returned (at its next log line)."""
    import ingest_flow

    real_logger = ingest_flow.get_run_logger

    class FailsAfterTheCommit:
        def __init__(self) -> None:
            self.logger = real_logger()

        def info(self, message, *args, **kwargs):
            if message.startswith("month written"):
                raise RuntimeError("the publishing task could not go on")
            self.logger.info(message, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.logger, name)

    monkeypatch.setattr(ingest_flow, "get_run_logger", FailsAfterTheCommit)


def _ctrl_c_once_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C the moment validation's verdict accepts the month."""
    from streamflow.verdict import Verdict

    real_accept = Verdict.accept

    def accept_then_interrupt(self):
        real_accept(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(Verdict, "accept", accept_then_interrupt)


@pytest.mark.parametrize("stopped", [False, True], ids=["no signal", "Ctrl-C"])
def test_a_month_committed_before_its_task_failed_is_a_published_month(
    run_flow, db_url, months, monkeypatch, caplog, stopped
):
    """The publisher's COMMIT returned, then its task failed (here its next log line):
    the ledger kept the run succeeded, but the CLI said "ingest failed" (exit 1), and
    after a Ctrl-C the run's logged error said "nothing was published". The run now
    reads its counts back from the ledger and ends as a published month."""
    from streamflow.interrupts import PublishedThenInterrupted

    _publisher_fails_after_its_commit(monkeypatch)
    if stopped:
        _ctrl_c_once_accepted(monkeypatch)
        with pytest.raises(KeyboardInterrupt) as interrupt:
            run_flow(db_url, months / "month_000", JAN)
        assert isinstance(interrupt.value, PublishedThenInterrupted), repr(interrupt.value)
    else:
        out = ok(run_flow(db_url, months / "month_000", JAN))
        assert out.startswith(f"{months / 'month_000'} as_of {JAN}: published live + history")

    (run,) = runs(db_url)
    assert (run["status"], run["error"]) == ("succeeded", None)
    assert [t["table"] for t in run["table_stats"]] == list(LIVE_TABLES)
    assert all(t["inserted"] == 200 for t in run["table_stats"]), run["table_stats"]
    assert {"upsert_csv", "validate_with_ge", "snapshot_month"} <= set(run["timings"])
    assert scalar(db_url, "SELECT run_id FROM ingest_months WHERE as_of = %s", (JAN,)) == 1
    assert (
        "the month is published (its COMMIT returned), but its publishing task then failed: "
        "unexpected RuntimeError: the publishing task could not go on"
    ) in caplog.text
    assert "nothing was published" not in caplog.text


def test_a_committed_month_whose_counts_cannot_be_read_back_is_not_said_unpublished(
    run_flow, db_url, months, monkeypatch, caplog
):
    """As above, with the ledger unreadable when the counts are read back: the run ends
    failed, but neither its logged error nor the CLI's line says "nothing was
    published" of the month its COMMIT put in."""
    from streamflow import ledger as ledger_rows
    from streamflow.interrupts import StoppedUnpublished

    def unreadable(conn, run_id):
        raise psycopg.OperationalError("the ledger could not be read")

    _publisher_fails_after_its_commit(monkeypatch)
    monkeypatch.setattr(ledger_rows, "published_stats", unreadable)
    _ctrl_c_once_accepted(monkeypatch)
    with pytest.raises(KeyboardInterrupt) as interrupt:
        run_flow(db_url, months / "month_000", JAN)

    assert not isinstance(interrupt.value, StoppedUnpublished), repr(interrupt.value)
    (run,) = runs(db_url)
    assert run["status"] == "succeeded"
    assert scalar(db_url, "SELECT run_id FROM ingest_months WHERE as_of = %s", (JAN,)) == 1
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ingest failed")]
    assert said == [
        "ingest failed: interrupted (Ctrl-C or SIGINT) once the month was published; its "
        "publishing task then failed: unexpected RuntimeError: the publishing task could "
        "not go on"
    ], said


def test_an_interrupt_after_the_verdict_names_why_the_publisher_did_not_commit(
    run_flow, db_url, months, monkeypatch
):
    """Ctrl-C once validation passed, and the publisher failed on its own (here: its
    writer lock lost, found at its check before the commit): the ledger said
    'ingest_months says whether its commit completed', though the run had waited for
    the publisher and knew. It now says what stopped it, and that nothing was
    published. (The lock is lost after the verdict: lost before it, the publisher's
    failure ends the run at once, validation stopped.)"""
    from streamflow import locking
    from streamflow.errors import LockLost
    from streamflow.verdict import Verdict

    real_accept = Verdict.accept
    real_check = locking.check_writer_lock
    accepted: list[bool] = []

    def accept_then_interrupt(self):
        real_accept(self)
        accepted.append(True)
        raise KeyboardInterrupt

    def lost_once_accepted(*args, **kwargs):
        if accepted:
            raise LockLost("the run lost the pipeline's writer lock (test)")
        return real_check(*args, **kwargs)

    monkeypatch.setattr(Verdict, "accept", accept_then_interrupt)
    monkeypatch.setattr(locking, "check_writer_lock", lost_once_accepted)
    with pytest.raises(KeyboardInterrupt):
        run_flow(db_url, months / "month_000", JAN)

    (run,) = runs(db_url)
    assert run["status"] == "failed"
    assert run["error"] == (
        "interrupted (Ctrl-C or SIGINT); the month had passed validation, but publishing "
        "failed: the run lost the pipeline's writer lock (test); nothing was published"
    )
    assert scalar(db_url, "SELECT count(*) FROM ingest_months") == 0
    assert scalar(db_url, "SELECT count(*) FROM users") == 0


def test_an_interrupt_during_validation_is_not_called_a_failed_validation(
    run_flow, db_url, months, monkeypatch, caplog
):
    """Ctrl-C during validation: the publishing task failed with 'validation failed: the
    month was rolled back' (or the cancel's 'canceling statement due to user request'),
    in the UI, though nothing had failed. It now says the run was stopped."""
    import logging

    from streamflow import outcomes

    def interrupted(found) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(outcomes, "check", interrupted)
    with caplog.at_level(logging.INFO), pytest.raises(KeyboardInterrupt):
        run_flow(db_url, months / "month_000", JAN)

    # The run's and its tasks' words. psycopg's own warning, "error ignored in rollback
    # ...: canceling statement due to user request", comes when the publisher's cancel
    # reaches its connection between two statements and lands on the closing rollback:
    # a matter of timing (a CI run saw it), not of what the tasks say.
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("prefect"))
    assert "the run was stopped: the month was rolled back, nothing published" in text, text
    assert "validation failed" not in text and "canceling statement" not in text
    assert scalar(db_url, "SELECT count(*) FROM users") == 0


def test_a_file_from_another_published_month_is_named(run_flow, db_url, months, tmp_path, caplog):
    """Last month's labels.csv copied into this month's folder: a whole copied month is
    refused, but one file published again under the new as_of went without a word (the
    input audit: 82 of 200 labels of February were January's). It is published, with a
    warning naming the file and the month it comes from."""
    import logging

    ok(run_flow(db_url, months / "month_000", JAN))
    feb = tmp_path / "month_001"
    shutil.copytree(months / "month_001", feb)
    shutil.copy(months / "month_000" / "labels.csv", feb / "labels.csv")

    with caplog.at_level(logging.WARNING):
        ok(run_flow(db_url, feb, FEB))

    said = [r.getMessage() for r in caplog.records if "byte for byte" in r.getMessage()]
    assert said == [
        f"labels.csv is byte for byte the labels.csv published as of {JAN}: a stale export?"
    ]


def test_an_unexpected_error_reads_the_same_in_the_ledger_and_on_the_terminal(
    run_flow, db_url, months, monkeypatch
):
    """A bug inside the run: the CLI printed 'unexpected ValueError: ...' and the ledger
    kept "ValueError('boom\\n  more')", a Python repr."""
    from streamflow import publishing

    def broken(*args, **kwargs):
        raise ValueError("boom\n  more")

    monkeypatch.setattr(publishing, "publish_month", broken)
    rc, _, err = run_flow(db_url, months / "month_000", JAN)

    assert rc == 1
    assert err.strip().splitlines()[-1] == "ingest failed: unexpected ValueError: boom more"
    (run,) = runs(db_url)
    assert run["error"] == "unexpected ValueError: boom more"


def test_a_failure_in_the_stale_export_check_fails_the_run_in_the_ledger(
    run_flow, db_url, months, monkeypatch
):
    """The look for files published under another as_of runs after the run's ledger row
    is opened: a refactor moved it out of the part that records failures, and a failure
    there (a lost connection, a Ctrl-C) left the row "running", with no error, until a
    later run marked it abandoned (review of the refactor)."""
    from streamflow import ledger

    def lost(*args, **kwargs):
        raise RuntimeError("simulated failure in the stale-export query")

    monkeypatch.setattr(ledger, "files_published_elsewhere", lost)
    rc, _, err = run_flow(db_url, months / "month_000", JAN)

    assert rc == 1
    assert err.strip().splitlines()[-1] == (
        "ingest failed: unexpected RuntimeError: simulated failure in the stale-export query"
    )
    (run,) = runs(db_url)
    assert (run["status"], run["error"]) == (
        "failed",
        "unexpected RuntimeError: simulated failure in the stale-export query",
    )


def test_a_gx_process_that_cannot_start_fails_the_run_in_the_ledger(
    run_flow, db_url, months, monkeypatch
):
    """Taking and connecting the GX process came after the run's ledger row and outside
    the part that records failures: the row stayed 'running' until a later run marked
    it abandoned, with no error."""
    from streamflow import validation
    from streamflow.errors import IngestError

    def cannot(self) -> None:
        raise IngestError("validation could not run (GX process): test")

    monkeypatch.setattr(validation.SuitesProcess, "connect", cannot)
    rc, _, err = run_flow(db_url, months / "month_000", JAN)

    assert rc == 1 and err.strip().splitlines()[-1].endswith("(GX process): test")
    (run,) = runs(db_url)
    assert (run["status"], run["error"]) == (
        "failed",
        "validation could not run (GX process): test",
    )


def test_a_bad_file_waits_for_the_other_copies_inside_the_writer_lock(
    run_flow, db_url, months, monkeypatch, tmp_path, caplog
):
    """users.csv refused while the other files were still being staged: the run gave up
    its writer lock at once, and each COPY still running then found the lock gone and
    failed with 'the run lost the pipeline's writer lock (... network cut ...)', in the
    UI, after the run's own error. They are now waited for, and commit under the lock."""
    from streamflow import loading

    bad = tmp_path / "month_000"
    shutil.copytree(months / "month_000", bad)
    lines = (bad / "users.csv").read_text().splitlines()
    lines[4] = lines[4].rsplit(",", 1)[0] + ",2024-13-45"
    (bad / "users.csv").write_text("\n".join(lines) + "\n")
    real = loading.stage_file

    def slow_unless_users(conn, spec, *args, **kwargs):
        if spec.name != "users":
            time.sleep(1.5)
        return real(conn, spec, *args, **kwargs)

    monkeypatch.setattr(loading, "stage_file", slow_unless_users)
    caplog.set_level(logging.INFO, logger="prefect")
    rc, _, err = run_flow(db_url, bad, JAN)

    assert rc == 1 and "users.csv, line 5" in err.strip().splitlines()[-1], err[-500:]
    assert "rows staged" in caplog.text  # the tasks' logs are seen here
    assert "writer lock" not in caplog.text
    staged = scalar(db_url, "SELECT count(*) FROM staging.labels")
    assert staged == len((bad / "labels.csv").read_text().splitlines()) - 1


@pytest.mark.parametrize(
    ("stop", "signum"),
    [("KeyboardInterrupt", signal.SIGINT), ("Terminated", signal.SIGTERM)],
    ids=["Ctrl-C", "SIGTERM"],
)
def test_an_interrupt_while_the_data_docs_are_built_leaves_the_run_whole(
    run_flow, db_url, months, monkeypatch, stop, signum
):
    """Ctrl-C after the commit, while GX builds the Data Docs: the run stayed succeeded
    but without its counts and timings, and the CLI said only 'interrupted'. The run is
    now recorded whole before that wait, and the interrupt says the month was published
    (a SIGTERM there was reported as a Ctrl-C: exit 130, not 143)."""
    from streamflow import interrupts, validation
    from streamflow.interrupts import PublishedThenInterrupted
    from streamflow.runs import LAST_RUN

    def interrupted(self, timeout: float = 300) -> None:
        raise getattr(interrupts, stop, KeyboardInterrupt)

    monkeypatch.setattr(validation.SuitesProcess, "finish", interrupted)
    with pytest.raises(PublishedThenInterrupted) as stopped:
        run_flow(db_url, months / "month_000", JAN)

    assert stopped.value.signum == signum
    # Its artifact names no Data Docs: they were never built (it named them).
    assert LAST_RUN[0].data_docs is None
    (run,) = runs(db_url)
    assert (run["status"], run["error"]) == ("succeeded", None)
    assert {"upsert_csv", "validate_with_ge", "snapshot_month"} <= set(run["timings"])
    assert [t["table"] for t in run["table_stats"]] == list(LIVE_TABLES)
    assert scalar(db_url, "SELECT run_id FROM ingest_months WHERE as_of = %s", (JAN,)) == 1


@contextmanager
def sigterm_in_finish_run(monkeypatch: pytest.MonkeyPatch, status: str) -> Iterator[list[int]]:
    """The CLI's SIGTERM handler in place; the first ledger.finish_run of ``status`` calls
    it, as a signal would, in this thread (a real one could kill a test worker).
    Yields the signals sent."""
    from streamflow import interrupts, ledger

    real_finish = ledger.finish_run
    sent: list[int] = []

    def signalled(*args, **kwargs):
        if kwargs.get("status") == status and not sent:
            sent.append(signal.SIGTERM)
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(ledger, "finish_run", signalled)
    previous = signal.signal(signal.SIGTERM, interrupts.raise_terminated)
    try:
        yield sent
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_second_signal_waits_for_the_record_of_the_first(run_flow, db_url, months, monkeypatch):
    """timeout and docker stop signal the process group too, and people press Ctrl-C
    twice: a second SIGTERM that landed while the first one's failure was being written
    left the run "running" with no error (operator audit, 1 run in 3). A signal waits
    for the write now, then acts. (The SIGTERM handler in place is called as a signal
    would call it, in this thread: a real one could kill a test worker.)"""
    from streamflow import interrupts, validation

    def stopped(self, as_of, users_floor):
        raise interrupts.Terminated

    monkeypatch.setattr(validation.SuitesProcess, "run", stopped)
    with sigterm_in_finish_run(monkeypatch, "failed"), pytest.raises(BaseException) as stop:
        run_flow(db_url, months / "month_000", JAN)

    assert interrupts.is_stop(stop.value), stop.value
    (run,) = runs(db_url)
    assert (run["status"], run["error"]) == (
        "failed",
        "interrupted (SIGTERM); nothing was published",
    )
    assert scalar(db_url, "SELECT count(*) FROM users") == 0


def test_a_signal_held_back_while_a_success_is_recorded_still_stops_the_run(
    run_flow, db_url, months, monkeypatch
):
    """A SIGTERM (docker stop, timeout) that lands while a published month's run is
    written to the ledger is held back for that write, then acted on: the run ends in
    PublishedThenInterrupted for SIGTERM (the CLI's "published" line and exit 143,
    tests/test_cli_startup.py), rather than going on to wait for the Data Docs and exit
    0 (mutation audit: a held-back signal dropped passed every test)."""
    from streamflow.interrupts import PublishedThenInterrupted

    with (
        sigterm_in_finish_run(monkeypatch, "succeeded") as sent,
        pytest.raises(PublishedThenInterrupted) as stopped,
    ):
        run_flow(db_url, months / "month_000", JAN)
    assert sent == [signal.SIGTERM] and stopped.value.signum == signal.SIGTERM
    (run,) = runs(db_url)
    assert run["status"] == "succeeded"


def test_a_refused_success_record_does_not_fail_a_published_month(
    run_flow, db_url, months, monkeypatch, caplog
):
    """The commit marks the run succeeded with its counts; the record after it adds the
    timings and expectation counts. A refusal of that write (a revoked grant, a full
    disk) made the CLI say 'ingest failed: ...' with exit 1 of a month that was
    published (review of the refactor). It is a warning now; the month stands."""
    from streamflow import ledger

    real_finish = ledger.finish_run

    def refused(conn, run_id, **outcome):
        if outcome.get("status") == "succeeded":
            raise psycopg.errors.InsufficientPrivilege("permission denied for table ingest_runs")
        return real_finish(conn, run_id, **outcome)

    monkeypatch.setattr(ledger, "finish_run", refused)
    with caplog.at_level(logging.WARNING):
        rc, _, err = run_flow(db_url, months / "month_000", JAN)

    assert rc == 0, err
    assert "ingest failed" not in err
    assert (
        "the published month's timings and expectation counts were not recorded in "
        "ingest_runs: PostgreSQL refused the work: permission denied for table ingest_runs"
    ) in caplog.text
    (run,) = runs(db_url)
    assert run["status"] == "succeeded" and run["table_stats"] and run["timings"] is None
    assert scalar(db_url, "SELECT count(*) FROM labels_snapshots") > 0


def test_a_run_that_failed_without_a_verdict_is_not_called_a_failed_validation(
    run_flow, db_url, months, monkeypatch, caplog
):
    """The GX process could not run: the publisher's log (the UI's) said "validation
    failed: the month was rolled back", which it was not (mutation audit)."""
    from streamflow import validation
    from streamflow.errors import IngestError

    def broken(self, as_of, users_floor):
        raise IngestError("validation could not run (GX process): the process died")

    monkeypatch.setattr(validation.SuitesProcess, "run", broken)
    with caplog.at_level(logging.INFO):
        rc, _, _ = run_flow(db_url, months / "month_000", JAN)
    assert rc == 1
    assert "the run failed: the month was rolled back, nothing published" in caplog.text
    assert "validation failed" not in caplog.text


def test_replacing_one_file_warns_of_no_stale_export(run_flow, db_url, months, tmp_path, caplog):
    """--replace of a month with one file fixed warned, for each of the five others,
    that it "is byte for byte the ... published as of" that same month: a stale
    export? (mutation audit). Only another month's files are worth that warning."""
    ok(run_flow(db_url, months / "month_000", JAN))
    label = read_rows(months / "month_000" / "labels.csv")[1][1]
    flipped = {"True": "False", "False": "True"}[label]  # the files' spelling
    jan = with_value(months, tmp_path / "month_000", "labels.csv", "churn_label", flipped, row=1)
    with caplog.at_level(logging.WARNING):
        ok(run_flow(db_url, jan, JAN, "--replace"))
    assert [r.getMessage() for r in caplog.records if "byte for byte" in r.getMessage()] == []


# --------------------------------------------------------------------------- backfill


def test_backfill_writes_history_and_keeps_live_tables(run_flow, db_url, new_db, months):
    jan, feb = months / "month_000", months / "month_001"
    ok(run_flow(db_url, feb, FEB))
    live_feb = dump(db_url, LIVE_TABLES)

    out = ok(run_flow(db_url, jan, JAN))

    assert "backfill" in out.lower() or "history only" in out.lower(), out
    assert dump(db_url, LIVE_TABLES) == live_feb
    last = runs(db_url)[-1]
    assert last["mode"] == "backfill"
    # Nothing was compared with the live tables: unchanged and absent are not known,
    # and the ledger says so (null), rather than 0 of either.
    assert all(
        (s["inserted"], s["updated"], s["unchanged"], s["absent"]) == (0, 0, None, None)
        for s in last["table_stats"]
    )
    # The line says what was written: the history rows.
    assert "[subscriptions_profile_snapshots +200 ~0, usage_agg_30d_snapshots +200 ~0," in out
    # The same database as ingesting the months in calendar order.
    forward = new_db()
    ok(run_flow(forward, jan, JAN))
    ok(run_flow(forward, feb, FEB))
    assert dump(db_url, DATA_TABLES) == dump(forward, DATA_TABLES)
    assert _history(db_url, JAN) == _history(forward, JAN)
    for table in SNAPSHOT_TABLES:
        assert scalar(db_url, f'SELECT count(*) FROM "{table}" WHERE as_of = %s', (JAN,)) == 200  # noqa: S608


def test_backfills_give_live_tables_what_calendar_order_would(
    run_flow, db_url, new_db, months, tmp_path
):
    """Live tables hold each user's values from the latest month that lists the user.
    A user in January and February but not in March, published March first: the
    backfills left that user out of the live tables altogether (history in five tables,
    no users row), and then with January's values instead of February's."""
    jan, feb = months / "month_000", months / "month_001"
    mar, march = changed_copy(feb, tmp_path / "month_002", drop_user_row=7), "2024-03-31"
    gone = read_rows(feb / "users.csv")[7][0]
    assert gone not in {r[0] for r in read_rows(mar / "users.csv")}
    ok(run_flow(db_url, mar, march))

    out_jan = ok(run_flow(db_url, jan, JAN))
    ok(run_flow(db_url, feb, FEB))

    forward = new_db()
    for month, as_of in ((jan, JAN), (feb, FEB), (mar, march)):
        ok(run_flow(forward, month, as_of))
    assert dump(db_url, DATA_TABLES) == dump(forward, DATA_TABLES)
    feb_usage = scalar(
        db_url,
        "SELECT watch_hours_30d FROM usage_agg_30d_snapshots WHERE as_of = %s AND user_id = %s",
        (FEB, gone),
    )
    assert (
        scalar(db_url, "SELECT watch_hours_30d FROM usage_agg_30d WHERE user_id = %s", (gone,))
        == feb_usage
    )
    # January's line says the live rows it wrote, after its history.
    assert (
        "labels_snapshots +200 ~0; live: users +1 ~0, subscriptions +1 ~0, usage_agg_30d +1 ~0, "
        "payments_agg_90d +1 ~0, support_agg_90d +1 ~0, labels +1 ~0]"
    ) in out_jan


def test_replacing_a_backfilled_month_updates_the_users_only_it_lists(
    run_flow, db_url, months, tmp_path
):
    """A user January lists and February does not has January's values live. A
    --replace of January gives that user the new values: "no later month lists it"
    looks at the months after January, not at January's own snapshot being replaced.
    The users February lists keep February's values."""
    jan, feb = months / "month_000", months / "month_001"
    only_jan = read_rows(feb / "users.csv")[7][0]
    feb_without = tmp_path / "month_001"
    shutil.copytree(feb, feb_without)
    for spec in TABLES:
        rows = read_rows(feb_without / spec.file_name)
        write_rows(feb_without / spec.file_name, [r for r in rows if r[0] != only_jan])
    ok(run_flow(db_url, feb_without, FEB))
    ok(run_flow(db_url, jan, JAN))  # a backfill: live only for only_jan
    label = "SELECT churn_label FROM labels WHERE user_id = %s"
    before = scalar(db_url, label, (only_jan,))
    others = [r for r in dump(db_url, ("labels",))["labels"] if r[0] != only_jan]

    ok(run_flow(db_url, changed_copy(jan, tmp_path / "jan_flipped"), JAN, "--replace"))

    assert scalar(db_url, label, (only_jan,)) is (not before)
    assert [r for r in dump(db_url, ("labels",))["labels"] if r[0] != only_jan] == others


def _without(tables: dict[str, list[tuple]], user_id: str) -> dict[str, list[tuple]]:
    return {t: [r for r in rows if r[0] != user_id] for t, rows in tables.items()}


def _history(url: str, as_of: str) -> dict[str, list[tuple]]:
    with psycopg.connect(url) as conn:
        return {
            t: conn.execute(
                f'SELECT * FROM "{t}" WHERE as_of = %s ORDER BY user_id',  # noqa: S608
                (as_of,),
            ).fetchall()
            for t in SNAPSHOT_TABLES
        }
