"""A month cut short: six files that agree with each other, listing far fewer users than
the month published before it (an export that stopped part-way); or as many users, but
not the same ones (re-keyed user_ids). Every other check passes such a month; the
users-drop and users-kept checks refuse it, unless the run allows the drop.
"""

from __future__ import annotations

import re
import time
from datetime import date
from pathlib import Path

import psycopg
import pytest
from conftest import ALL_TABLES, dump, scalar
from month_files import (
    AS_OF,
    end_writer_lock_holder,
    first_users,
    ok,
    read_rows,
    runs,
    small_months,
    write_rows,
)
from streamflow import seeds
from streamflow.registry import TABLES
from streamflow.validation import SAMPLE_USERS, UsersBefore

JAN, FEB = AS_OF["month_000"], AS_OF["month_001"]
USERS_IN_MONTHS = 200
REMEDY = (
    ": an export cut short? If that many users really left, rerun with --allow-drop "
    "(ALLOW_DROP=1; a deployment run: --param allow_drop=true)"
)


@pytest.fixture(scope="module")
def months(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_months(tmp_path_factory.mktemp("drop"), users=USERS_IN_MONTHS)


def users_listed(url: str, as_of: str) -> int:
    return scalar(url, "SELECT count(*) FROM labels_snapshots WHERE as_of = %s", (as_of,))


def test_a_month_cut_short_is_refused_unless_allowed(run_flow, db_url, months, tmp_path):
    ok(run_flow(db_url, months / "month_000", JAN))
    before = dump(db_url, ALL_TABLES)
    short = first_users(months / "month_001", 90, tmp_path / "short")

    rc, _, err = run_flow(db_url, short, FEB)

    assert rc == 1
    assert err.strip().splitlines()[-1] == (
        "ingest failed: validation failed: users.csv: 90 users, 55% fewer than the 200 of "
        "2024-01-31, the month published before it; expected at least 100 (at most 50% "
        f"fewer: MAX_USERS_DROP_PERCENT){REMEDY}"
    )
    assert dump(db_url, ALL_TABLES) == before
    run = runs(db_url)[-1]
    assert run["status"] == "failed"
    # A failed run's validation holds its failed expectations: this one alone.
    assert [(e["table"], e["expectation"], e["unexpected_count"]) for e in run["validation"]] == [
        ("users", "users_drop", 90)
    ]

    ok(run_flow(db_url, short, FEB, "--allow-drop"))

    assert users_listed(db_url, FEB) == 90
    assert users_listed(db_url, JAN) == 200


def test_the_limit_is_a_setting_and_the_floor_is_exact(
    run_flow, db_url, months, tmp_path, monkeypatch
):
    """50% of 200 users is a floor of 100: a month of 100 users passes by default. With
    MAX_USERS_DROP_PERCENT=10, 179 users (10.5% fewer than January's 200) are refused,
    180 are not; ALLOW_DROP=yes lets any number through."""
    ok(run_flow(db_url, months / "month_000", JAN))
    ok(run_flow(db_url, first_users(months / "month_001", 100, tmp_path / "half"), FEB))
    assert users_listed(db_url, FEB) == 100

    monkeypatch.setenv("MAX_USERS_DROP_PERCENT", "10")
    rc, _, err = run_flow(
        db_url, first_users(months / "month_001", 179, tmp_path / "a"), FEB, "--replace"
    )
    assert rc == 1
    assert err.strip().splitlines()[-1] == (
        "ingest failed: validation failed: users.csv: 179 users, 10.5% fewer than the 200 "
        "of 2024-01-31, the month published before it; expected at least 180 (at most 10% "
        f"fewer: MAX_USERS_DROP_PERCENT){REMEDY}"
    )
    assert users_listed(db_url, FEB) == 100
    ok(run_flow(db_url, first_users(months / "month_001", 180, tmp_path / "b"), FEB, "--replace"))
    assert users_listed(db_url, FEB) == 180

    monkeypatch.setenv("ALLOW_DROP", "yes")
    ok(run_flow(db_url, first_users(months / "month_001", 89, tmp_path / "c"), FEB, "--replace"))
    assert users_listed(db_url, FEB) == 89


def test_the_month_compared_is_the_one_published_before_its_as_of(
    run_flow, db_url, months, tmp_path
):
    """Not the latest: a backfill and a --replace compare with the month before their
    own as_of, and a month with none before it is compared with nothing."""
    ok(run_flow(db_url, first_users(months / "month_001", 40, tmp_path / "feb"), FEB))
    # January, backfilled after February: nothing published before it, so its 200
    # users are compared with nothing (February's 40 come after it).
    ok(run_flow(db_url, months / "month_000", JAN))
    assert (users_listed(db_url, JAN), users_listed(db_url, FEB)) == (200, 40)

    # February again, with 60 users: still 70% fewer than January's 200.
    rc, _, err = run_flow(
        db_url, first_users(months / "month_001", 60, tmp_path / "feb60"), FEB, "--replace"
    )
    assert rc == 1
    assert "users.csv: 60 users, 70% fewer than the 200 of 2024-01-31" in err
    assert users_listed(db_url, FEB) == 40


def test_validation_reads_nothing_the_publisher_holds(run_flow, db_url, months, monkeypatch):
    """The count of the month before was read by the GX process while the publisher held
    its locks (the new partition attached to labels_snapshots, uncommitted until the
    verdict): behind another session's lock request there (a DROP of an old partition),
    validation waited for the publisher, which waited for validation, until that request
    gave up (review, 9.6 s of a 10 s lock_timeout). The flow reads it before publishing."""
    import threading

    from streamflow import publishing, validation

    ok(run_flow(db_url, months / "month_000", JAN))
    written = threading.Event()
    real_publish, real_run = publishing.publish_month, validation.SuitesProcess.run

    def publish_then_say(*args, **kwargs):
        stats = real_publish(*args, **kwargs)
        written.set()
        return stats

    outcome: dict[str, object] = {}

    def drop_an_old_partition() -> None:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '10s'")
            try:
                conn.execute("BEGIN")
                conn.execute("LOCK TABLE labels_snapshots IN ACCESS EXCLUSIVE MODE")
                conn.execute("ROLLBACK")
                outcome["lock"] = "granted"
            except psycopg.errors.LockNotAvailable:
                outcome["lock"] = "timed out"

    def run_once_a_lock_waits(self, as_of, users_floor):
        assert written.wait(60), "the publisher did not write the month"
        locker = threading.Thread(target=drop_an_old_partition)
        locker.start()
        waiting = (
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE 'LOCK TABLE labels_snapshots%%'"
        )
        deadline = time.monotonic() + 10
        while scalar(db_url, waiting) == 0:
            assert time.monotonic() < deadline, "the LOCK TABLE never waited"
            time.sleep(0.05)
        started = time.monotonic()
        try:
            return real_run(self, as_of, users_floor)
        finally:
            outcome["validation_s"] = time.monotonic() - started
            outcome["locker"] = locker

    monkeypatch.setattr(publishing, "publish_month", publish_then_say)
    monkeypatch.setattr(validation.SuitesProcess, "run", run_once_a_lock_waits)

    ok(run_flow(db_url, months / "month_001", FEB))

    outcome["locker"].join(30)  # type: ignore[attr-defined]
    assert outcome["validation_s"] < 5, outcome
    assert outcome["lock"] == "granted", outcome  # once the month was committed
    assert users_listed(db_url, FEB) == USERS_IN_MONTHS


def test_the_drop_is_never_shown_as_the_limit_it_exceeds():
    """100,000 users against 200,001 are 50.0002% fewer: rounded to two digits that read
    "50% fewer … at most 50% fewer"."""
    from datetime import date

    from streamflow.outcomes import Check, ExpectationOutcome, SuiteOutcome
    from streamflow.validation import UsersBefore

    before = UsersBefore(date(2024, 1, 31), 200_001, 50.0)
    drop = ExpectationOutcome("users", Check.USERS_DROP, None, False, unexpected_count=100_000)
    before.judge([SuiteOutcome("users", 0, 1, [drop])])

    assert before.floor == 100_001
    assert drop.detail == (
        "50.0002% fewer than the 200001 of 2024-01-31, the month published before it; "
        "expected at least 100001 (at most 50% fewer: MAX_USERS_DROP_PERCENT)"
    )
    assert UsersBefore(date(2024, 1, 31), 7, 12.5).floor == 7  # 6.125 users kept: 7
    assert UsersBefore(date(2024, 1, 31), 200, 100).floor == 0
    assert UsersBefore(None, 0, 50.0).floor == 0  # nothing published before it


def rekeyed(month: Path, into: Path, which: slice = slice(None)) -> Path:
    """``month`` with the user_ids of its rows ``which`` (all by default) re-spelt in all
    six files alike: a month as many users long, whose files agree with each other."""
    into.mkdir(parents=True, exist_ok=True)
    for spec in TABLES:
        header, *rows = read_rows(month / spec.file_name)
        for row in rows[which]:
            row[0] = "R-" + row[0]
        write_rows(into / spec.file_name, [header, *rows])
    return into


def in_id_order(month: Path, into: Path) -> Path:
    """``month``'s six files with their rows sorted by user_id, as many exports are."""
    into.mkdir(parents=True, exist_ok=True)
    for spec in TABLES:
        header, *rows = read_rows(month / spec.file_name)
        write_rows(into / spec.file_name, [header, *sorted(rows, key=lambda r: r[0])])
    return into


def test_a_month_of_other_users_is_refused_unless_allowed(run_flow, db_url, months, tmp_path):
    """Every user_id re-keyed by the export (or another export's month), as many users:
    each file agrees with the others and the count matches, so it passed, and left last
    month's 200 users live beside 200 new ones. Of the month before's users, at most
    MAX_USERS_DROP_PERCENT may be missing."""
    ok(run_flow(db_url, months / "month_000", JAN))
    before = dump(db_url, ALL_TABLES)

    rc, _, err = run_flow(db_url, rekeyed(months / "month_001", tmp_path / "all"), FEB)

    assert rc == 1
    assert err.strip().splitlines()[-1] == (
        "ingest failed: validation failed: users.csv, column user_id: 200 of the 200 users "
        "of 2024-01-31, the month published before it, are not among its 200 (100%; at most "
        "50% may be: MAX_USERS_DROP_PERCENT): were its user_ids re-keyed, or is it another "
        "export? If those users really left, rerun with --allow-drop (ALLOW_DROP=1; a "
        "deployment run: --param allow_drop=true)"
    )
    assert dump(db_url, ALL_TABLES) == before
    assert [(e["expectation"], e["unexpected_count"]) for e in runs(db_url)[-1]["validation"]] == [
        ("users_kept", 200)
    ]

    # Half of them re-keyed is the 50% allowed; one more is not.
    ok(run_flow(db_url, rekeyed(months / "month_001", tmp_path / "half", slice(100)), FEB))
    rc, _, err = run_flow(
        db_url, rekeyed(months / "month_001", tmp_path / "more", slice(101)), FEB, "--replace"
    )
    assert rc == 1
    assert "101 of the 200 users of 2024-01-31, the month published before it, are not " in err
    assert "(50.5%; at most 50% may be" in err

    ok(
        run_flow(
            db_url,
            rekeyed(months / "month_001", tmp_path / "all"),
            FEB,
            "--replace",
            "--allow-drop",
        )
    )
    assert scalar(db_url, "SELECT count(*) FROM users") == 400  # January's stay live


def test_a_big_month_is_compared_on_a_sample_of_its_users(run_flow, db_url, tmp_path):
    """Past 1,000 users the month before is sampled, each user with the same chance (the
    same ones each run), not read whole: ~1,000 lookups in the staged users.csv, whatever
    the month's size. Files in user_id order: a sample of whole pages, cut to its first
    1,000 rows, only ever looked at the lower ids (review: a month whose upper 60% of ids
    were re-keyed passed with "37% not listed")."""
    seeds.generate(tmp_path / "big", users=6000, months=2, seed=5)
    jan = in_id_order(tmp_path / "big" / "month_000", tmp_path / "jan")
    feb = in_id_order(tmp_path / "big" / "month_001", tmp_path / "feb")
    ok(run_flow(db_url, jan, JAN))

    rc, _, err = run_flow(db_url, rekeyed(feb, tmp_path / "upper", slice(2400, None)), FEB)

    assert rc == 1
    line = err.strip().splitlines()[-1]
    found = re.search(
        r": (\d+) of (\d+) users picked at random among the 6000 of 2024-01-31, the month "
        r"published before it, are not among its 6000 \(([\d.]+)%; at most 50% may be",
        line,
    )
    assert found, line
    assert 0.9 * SAMPLE_USERS <= int(found[2]) <= 1.1 * SAMPLE_USERS, line
    assert 55 <= float(found[3]) <= 65, line  # 60% of the users are others
    with psycopg.connect(db_url) as conn:
        sample = UsersBefore.of(conn, date.fromisoformat(FEB), 50.0).sample
        ids = conn.execute(
            "SELECT user_id FROM labels_snapshots WHERE as_of = %s ORDER BY user_id", (JAN,)
        ).fetchall()
    rank = {user_id: i for i, (user_id,) in enumerate(ids)}
    tenths = [rank[u] * 10 // len(ids) for u in sample]
    assert all(70 <= tenths.count(t) <= 130 for t in range(10)), tenths

    # The lower third re-keyed: passes (about a third missing).
    ok(run_flow(db_url, rekeyed(feb, tmp_path / "lower", slice(2000)), FEB))


def test_the_control_connection_lost_before_the_lookup_is_named_as_such(
    run_flow, db_url, months, monkeypatch
):
    """The lookup is the first use of the run's control connection after staging: ended
    there (a restart, pg_terminate_backend), the run said "the database could not be
    reached" (review probe). It lost its writer lock, and says so; nothing is published."""
    from streamflow.validation import UsersBefore

    ok(run_flow(db_url, months / "month_000", JAN))
    before = dump(db_url, ALL_TABLES)
    real = UsersBefore.count_listed

    def after_the_lock_holder_ended(self, conn):
        end_writer_lock_holder(db_url)
        return real(self, conn)

    monkeypatch.setattr(UsersBefore, "count_listed", after_the_lock_holder_ended)

    rc, _, err = run_flow(db_url, months / "month_001", FEB)

    assert rc == 1
    assert err.strip().splitlines()[-1] == (
        "ingest failed: the run lost the pipeline's writer lock (its control connection to "
        "PostgreSQL ended: a server restart, a network cut, idle_session_timeout or "
        "pg_terminate_backend); nothing of this run was published: rerun it"
    )
    assert dump(db_url, ALL_TABLES) == before
