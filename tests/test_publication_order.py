"""Publication order, checked against a model: four months published in any order
(backfills, and --allow-gap where a new latest month skips one) give the database that
calendar order gives, and that database is what the README says it is.

The model (README "How it works"): the live tables hold each user's values from the
latest month that lists the user; each ``*_snapshots`` as_of holds exactly that month's
files; ``ingest_months`` lists every month. The months are built from the seed
generator with user sets that differ (users only in the first month, only in the
last, missing from a middle month and back later, gone before the last) and with
values that change every month for most users (a marker in every file), so that a
live row taken from the wrong month, or a snapshot holding another month's row, is
seen. A stable group keeps the same row every month: the rows a publish leaves alone.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import NamedTuple

import psycopg
import pytest
from conftest import DATA_TABLES, dump
from month_files import database_copy, ingest, ok, read_rows, write_rows
from psycopg import sql
from streamflow.registry import LIVE_TABLES, PARENT, SNAPSHOT_TABLES, TABLES

AS_OFS = ("2024-01-31", "2024-02-29", "2024-03-31", "2024-04-30")
JAN, FEB, MAR, APR = range(4)
NAMES = ("jan", "feb", "mar", "apr")
CALENDAR = (JAN, FEB, MAR, APR)
_names = itertools.count()

# Who each month lists: (how many users, the months that list them), in the order the
# generator writes them. ~150 users a month.
GROUPS: dict[str, tuple[int, frozenset[int]]] = {
    "only_first": (15, frozenset({JAN})),
    "only_last": (15, frozenset({APR})),
    "missing_feb": (15, frozenset({JAN, MAR, APR})),
    "missing_mar": (15, frozenset({JAN, FEB, APR})),
    "gone_before_apr": (15, frozenset({JAN, FEB, MAR})),
    "feb_and_mar": (10, frozenset({FEB, MAR})),
    "only_feb": (10, frozenset({FEB})),
    "every_month": (55, frozenset(CALENDAR)),
    "stable": (50, frozenset(CALENDAR)),  # the same row in every month
}

# One column per file that changes every month for every user but the stable ones,
# by ``step`` (the month, or a replacement's own step): the month a row came from is
# then in the row itself. churn_label can only alternate.
MARKERS: dict[str, tuple[str, Callable[[str, int], str]]] = {
    "users": ("signup_date", lambda v, step: str(date.fromisoformat(v) - timedelta(days=step))),
    "subscriptions": ("months_active", lambda v, step: str(int(v) + step)),
    "usage_agg_30d": ("skips_7d", lambda v, step: str(int(v) + 1000 * step)),
    "payments_agg_90d": ("failed_payments_90d", lambda v, step: str(int(v) + 1000 * step)),
    "support_agg_90d": ("support_tickets_90d", lambda v, step: str(int(v) + 1000 * step)),
    "labels": ("churn_label", lambda v, step: _flip(v) if step % 2 else v),
}

Values = tuple[str | None, ...]


def _flip(value: str) -> str:
    return {"True": "False", "False": "True"}[value]


@dataclass(frozen=True)
class Month:
    as_of: str
    folder: Path
    rows: dict[str, dict[str, Values]]
    """Per table, per user_id: the file's other values as PostgreSQL prints them."""


@dataclass(frozen=True)
class Months:
    generated: Path
    headers: dict[str, list[str]]
    groups: dict[str, list[str]]
    """The user_ids of each group of GROUPS."""
    calendar: list[Month]

    def build(
        self, k: int, folder: Path, users: list[str], step: int, *, flip_stable: bool = False
    ) -> Month:
        """The files of month ``k`` (as_of AS_OFS[k]) listing ``users``: the generator's
        month k, markers moved by ``step``; the stable users keep the first month's row
        (their label flipped with ``flip_stable``)."""
        folder.mkdir(parents=True)
        stable = set(self.groups["stable"])
        listed = set(users)
        rows: dict[str, dict[str, Values]] = {}
        for spec in TABLES:
            header = self.headers[spec.name]
            first = {r[0]: r for r in read_rows(self.generated / "month_000" / spec.file_name)[1:]}
            column, mark = MARKERS[spec.name]
            at = header.index(column)
            out = [header]
            for row in read_rows(self.generated / f"month_{k:03d}" / spec.file_name)[1:]:
                if row[0] not in listed:
                    continue
                if row[0] in stable:
                    row = list(first[row[0]])
                    if flip_stable and spec.name == "labels":
                        row[at] = _flip(row[at])
                else:
                    row[at] = mark(row[at], step)
                out.append(row)
            assert len(out) - 1 == len(listed)  # every file lists exactly these users
            write_rows(folder / spec.file_name, out)
            rows[spec.name] = {r[0]: tuple(map(_as_printed, r[1:])) for r in out[1:]}
        return Month(AS_OFS[k], folder, rows)


def _as_printed(value: str) -> str | None:
    """A CSV value as PostgreSQL prints it back (``::text``): empty is NULL, booleans
    are spelled in lower case; numbers and dates keep the file's spelling (numeric keeps
    its scale, DateStyle ISO)."""
    if value == "":
        return None
    return {"True": "true", "False": "false"}.get(value, value)


@pytest.fixture(scope="module")
def months(tmp_path_factory: pytest.TempPathFactory) -> Months:
    from streamflow import seeds

    root = tmp_path_factory.mktemp("four_months")
    generated = root / "generated"
    seeds.generate(generated, users=sum(n for n, _ in GROUPS.values()), months=4, seed=7)
    headers = {spec.name: read_rows(generated / "month_000" / spec.file_name)[0] for spec in TABLES}
    ids = [r[0] for r in read_rows(generated / "month_000" / PARENT.file_name)[1:]]
    for k, spec in itertools.product(range(4), TABLES):
        rows = read_rows(generated / f"month_{k:03d}" / spec.file_name)
        assert [r[0] for r in rows[1:]] == ids  # same users, same order, every file
    groups, start = {}, 0
    for group, (n, _) in GROUPS.items():
        groups[group], start = ids[start : start + n], start + n
    four = Months(generated, headers, groups, [])
    for k in CALENDAR:
        users = [u for g, (_, ks) in GROUPS.items() if k in ks for u in groups[g]]
        four.calendar.append(four.build(k, root / f"month_{k:03d}", users, step=k))
    return four


def model(
    months: list[Month], headers: dict[str, list[str]]
) -> tuple[dict[str, dict[str, Values]], dict[str, dict[tuple[str, str], Values]]]:
    """(live, history) as the README says they are once ``months`` are published, in
    whatever order: live, each user's row of the latest month that lists it; history,
    each month's rows under its as_of, the snapshot columns only."""
    live: dict[str, dict[str, Values]] = {spec.name: {} for spec in TABLES}
    history: dict[str, dict[tuple[str, str], Values]] = {t: {} for t in SNAPSHOT_TABLES}
    for month in sorted(months, key=lambda m: m.as_of):
        for spec in TABLES:
            live[spec.name].update(month.rows[spec.name])
            if spec.snapshot_table is None:
                continue
            at = [headers[spec.name].index(c) - 1 for c in spec.snapshot_columns]
            history[spec.snapshot_table].update(
                ((month.as_of, user), tuple(values[i] for i in at))
                for user, values in month.rows[spec.name].items()
            )
    return live, history


def contents(
    url: str, headers: dict[str, list[str]]
) -> tuple[dict[str, dict[str, Values]], dict[str, dict[tuple[str, str], Values]]]:
    """(live, history) as the database prints them, in the model's shape."""
    live, history = {}, {}
    with psycopg.connect(url) as conn:
        conn.execute("SET DateStyle = ISO")
        for spec in TABLES:
            columns = [c for c in headers[spec.name] if c != "user_id"]
            assert set(columns) == set(spec.column_names) - {"user_id"}
            q = sql.SQL("SELECT user_id, {} FROM {}").format(
                _as_text(columns), sql.Identifier(spec.name)
            )
            live[spec.name] = {r[0]: tuple(r[1:]) for r in conn.execute(q)}
            if spec.snapshot_table is None:
                continue
            q = sql.SQL("SELECT as_of::text, user_id, {} FROM {}").format(
                _as_text(spec.snapshot_columns), sql.Identifier(spec.snapshot_table)
            )
            history[spec.snapshot_table] = {(r[0], r[1]): tuple(r[2:]) for r in conn.execute(q)}
    return live, history


def _as_text(columns: list[str] | tuple[str, ...]) -> sql.Composable:
    return sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in columns)


def differences(expected: dict[str, dict], actual: dict[str, dict], limit: int = 12) -> list[str]:
    """What differs, per table and key, a few lines at most (a dict diff of 150 users
    per table reads badly)."""
    found = []
    for table in expected:
        exp, act = expected[table], actual[table]
        for key in sorted(exp.keys() | act.keys(), key=repr):
            if exp.get(key, "<no row>") != act.get(key, "<no row>"):
                found.append(
                    f"{table} {key}: expected {exp.get(key, '<no row>')}, "
                    f"got {act.get(key, '<no row>')}"
                )
    return found[:limit] + ([f"... {len(found) - limit} more"] if len(found) > limit else [])


def assert_as_modelled(url: str, four: Months, months: list[Month]) -> None:
    live, history = model(months, four.headers)
    got_live, got_history = contents(url, four.headers)
    for expected, got in ((live, got_live), (history, got_history)):
        diff = differences(expected, got)
        assert not diff, "\n".join(diff)
    assert published_months(url) == [(m.as_of,) for m in sorted(months, key=lambda m: m.as_of)]


def published_months(url: str, *columns: str) -> list[tuple]:
    """``ingest_months`` on as_of (and ``columns``): its run_id and published_at name
    the run, not the data."""
    q = sql.SQL("SELECT as_of::text{} FROM ingest_months ORDER BY as_of").format(
        sql.SQL("").join(sql.SQL(", {}").format(sql.Identifier(c)) for c in columns)
    )
    with psycopg.connect(url) as conn:
        return conn.execute(q).fetchall()


def structure(url: str) -> dict[str, list[tuple]]:
    """What the data does not show. ``keys``: the indexes and constraints of the schema's
    own tables (a live key dropped for a first load and not restored); ``partitions``:
    each history table's month partitions, where they are and their indexes and
    constraints (a month left in staging); ``staged_rows``: staging is emptied once a
    month is published."""
    of_tables = (
        "JOIN pg_namespace AS n ON n.oid = t.relnamespace "
        "WHERE n.nspname IN ('public', 'staging') AND t.relispartition = %s"
    )
    indexes = (
        "SELECT n.nspname, t.relname, 'index', i.relname, pg_get_indexdef(i.oid) "
        "FROM pg_index AS x JOIN pg_class AS i ON i.oid = x.indexrelid "
        "JOIN pg_class AS t ON t.oid = x.indrelid "
    ) + of_tables
    constraints = (
        "SELECT n.nspname, t.relname, 'constraint', c.conname, pg_get_constraintdef(c.oid) "
        "FROM pg_constraint AS c JOIN pg_class AS t ON t.oid = c.conrelid "
    ) + of_tables
    with psycopg.connect(url) as conn:

        def keys(partitions: bool) -> list[tuple]:
            return sorted(
                conn.execute(indexes, (partitions,)).fetchall()
                + conn.execute(constraints, (partitions,)).fetchall()
            )

        staged = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'staging' ORDER BY 1"
        ).fetchall()
        return {
            "keys": keys(False),
            "partitions": conn.execute(
                "SELECT i.inhparent::regclass::text, c.relnamespace::regnamespace::text, "
                "c.relname, pg_get_expr(c.relpartbound, c.oid) "
                "FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid "
                "WHERE c.relkind = 'r' ORDER BY 1, 3"
            ).fetchall(),
            "partition_keys": keys(True),
            "staged_rows": [
                (
                    t,
                    conn.execute(
                        sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("staging", t))
                    ).fetchone()[0],
                )  # fmt: skip
                for (t,) in staged
            ],
        }


def keyed(tables: dict[str, list[tuple]]) -> dict[str, dict]:
    """A ``dump`` by key, for ``differences``: user_id, and as_of in history."""
    return {
        t: {(r[0], r[1]) if t in SNAPSHOT_TABLES else r[0]: r for r in rows}
        for t, rows in tables.items()
    }


def assert_same_data(url: str, reference: str, *, but_user: str | None = None) -> None:
    """The two databases' data tables hold the same rows (typed: ``dump``), the live
    rows of ``but_user`` aside; ingest_months the same months from the same files."""
    got, expected = keyed(dump(url, DATA_TABLES)), keyed(dump(reference, DATA_TABLES))
    if but_user is not None:
        for table in LIVE_TABLES:
            got[table].pop(but_user, None)
            expected[table].pop(but_user, None)
    diff = differences(expected, got)
    assert not diff, "\n".join(diff)
    assert published_months(url, "fingerprint") == published_months(reference, "fingerprint")


def runs(url: str) -> list[dict]:
    with psycopg.connect(url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(
            "SELECT run_id, as_of::text, mode, status, error FROM ingest_runs ORDER BY run_id"
        ).fetchall()


def publish(run_flow, url: str, months: list[Month], order: tuple[int, ...]) -> None:
    """Publish ``months`` in ``order``, with --allow-gap exactly where a new latest month
    is more than one month after the latest published; each run's ledger mode is the
    model's: publish for a month after every published one, else backfill."""
    latest = None
    for k in order:
        gap = ("--allow-gap",) if latest is not None and k > latest + 1 else ()
        ok(run_flow(url, months[k].folder, months[k].as_of, *gap))
        last = runs(url)[-1]
        mode = "publish" if latest is None or k > latest else "backfill"
        assert (last["as_of"], last["mode"], last["status"]) == (
            months[k].as_of,
            mode,
            "succeeded",
        ), last
        latest = k if latest is None else max(latest, k)


def assert_reruns_are_noops(run_flow, url: str, months: list[Month]) -> None:
    """Every month's unchanged rerun, at the end, is a no-op: recorded as one, and
    nothing else in the database changes."""
    before, ledger = dump(url), len(runs(url))
    for month in months:
        out = ok(run_flow(url, month.folder, month.as_of))
        assert "nothing to do" in out, out
        last = runs(url)[-1]
        assert (last["as_of"], last["mode"], last["status"]) == (month.as_of, "noop", "noop")
    assert len(runs(url)) == ledger + len(months)
    assert dump(url) == before


class Database(NamedTuple):
    name: str
    url: str


@pytest.fixture(scope="module")
def calendar_db(pg_admin_url: str, template_db: str, months: Months) -> Iterator[Database]:
    """The reference: the four months published in calendar order."""
    name = f"sf_order_calendar_{os.getpid()}"
    with database_copy(pg_admin_url, template_db, name) as url:
        for month in months.calendar:
            assert ingest(url, month.folder, month.as_of) == 0
        yield Database(name, url)


def _orders() -> list[tuple[int, ...]]:
    """The reverse order, and five other orders drawn once (seed 7): between them, new
    latest months after a gap (--allow-gap), backfills before, between and after them."""
    others = [p for p in itertools.permutations(CALENDAR) if p not in (CALENDAR, CALENDAR[::-1])]
    return [CALENDAR[::-1], *random.Random(7).sample(others, 5)]


def test_calendar_order_gives_each_user_its_latest_listed_month(
    run_flow, calendar_db, db_url, months, pg_admin_url
):
    """The reference the other orders are compared with is itself right: live rows are
    the latest listed month's (users only in January keep January's, users missing
    from March have April's), each history month is its own files, in its own
    partition, ingest_months lists the four months, the live tables have the keys of a
    fresh schema, staging is empty; every month a publish, every unchanged rerun a
    no-op."""
    url = calendar_db.url
    assert [(r["as_of"], r["mode"], r["status"]) for r in runs(url)] == [
        (as_of, "publish", "succeeded") for as_of in AS_OFS
    ]
    assert_as_modelled(url, months, months.calendar)
    # The model is not trivially satisfied: the months do differ where it matters.
    jan_only = months.groups["only_first"][0]
    live, _ = contents(url, months.headers)
    assert (
        live["payments_agg_90d"][jan_only]
        == months.calendar[JAN].rows["payments_agg_90d"][jan_only]
    )
    back_later = months.groups["missing_mar"][0]
    assert (
        live["payments_agg_90d"][back_later]
        == months.calendar[APR].rows["payments_agg_90d"][back_later]
    )
    assert (
        months.calendar[FEB].rows["users"][back_later]
        != months.calendar[APR].rows["users"][back_later]
    )
    published, fresh = structure(url), structure(db_url)  # db_url: the schema, no month
    assert published["keys"] == fresh["keys"]
    assert [(parent, schema, bound) for parent, schema, _, bound in published["partitions"]] == [
        (table, "public", f"FOR VALUES IN ('{as_of}')")
        for table in sorted(SNAPSHOT_TABLES)
        for as_of in AS_OFS
    ]
    assert published["staged_rows"] and all(n == 0 for _, n in published["staged_rows"])
    # On a copy: the other tests compare with calendar_db, whatever ran before them.
    with database_copy(pg_admin_url, calendar_db.name, f"sf_order_reruns_{os.getpid()}") as copy:
        assert_reruns_are_noops(run_flow, copy, months.calendar)


@pytest.mark.parametrize("order", _orders(), ids=lambda o: "-".join(NAMES[k] for k in o))
def test_any_order_gives_the_database_calendar_order_gives(
    order, run_flow, db_url, calendar_db, months
):
    """The README's promise for backfills: published in any order, months leave each
    user's latest listed month live, and history and ingest_months are the same. A
    backfill that rewound a user to an older month, skipped a user no later month lists,
    or wrote a snapshot from the live tables would differ here from calendar order (and
    from the model), in data or in the tables' partitions, keys or staging."""
    publish(run_flow, db_url, months.calendar, order)

    assert_as_modelled(db_url, months, months.calendar)
    assert_same_data(db_url, calendar_db.url)
    assert structure(db_url) == structure(calendar_db.url)
    assert_reruns_are_noops(run_flow, db_url, months.calendar)


def test_replacing_a_middle_month_gives_what_publishing_it_in_its_place_gives(
    run_flow, pg_admin_url, calendar_db, db_url, months, tmp_path
):
    """A --replace of March, once all four months are published (a backfill replace):
    new values for every user it lists, one user dropped, two added. The database is
    the one that publishing the new March in calendar order gives: its history is the
    new files; live, the users no later month lists take its values (an added user only
    January listed), the others keep April's.

    The one documented exception is checked as documented: a dropped user whose live
    values came from the replaced month keeps them (calendar order would give it
    February's); a dropped user April lists has April's either way."""
    four, mar = months, months.calendar[MAR]
    dropped_later = four.groups["every_month"][0]  # April lists it
    dropped_kept = four.groups["gone_before_apr"][0]  # its live values were March's
    added_first = four.groups["only_first"][0]  # only January listed it
    added_last = four.groups["only_last"][0]  # April lists it
    users = [
        *(u for u in mar.rows["users"] if u not in (dropped_later, dropped_kept)),
        added_first,
        added_last,
    ]
    new_mar = four.build(MAR, tmp_path / "month_002_replaced", users, step=7, flip_stable=True)
    # Every user both Marches list has new values: a flipped label, and for all but the
    # stable users a new row in every file.
    both = [u for u in users if u in mar.rows["users"]]
    assert all(new_mar.rows["labels"][u] != mar.rows["labels"][u] for u in both)
    assert all(
        new_mar.rows[t][u] != mar.rows[t][u]
        for t in LIVE_TABLES
        for u in both
        if u not in four.groups["stable"]
    )
    in_place = [*four.calendar[:MAR], new_mar, four.calendar[APR]]

    publish(run_flow, db_url, in_place, CALENDAR)
    assert_as_modelled(db_url, four, in_place)

    with database_copy(
        pg_admin_url, calendar_db.name, f"sf_order_replace_{os.getpid()}_{next(_names)}"
    ) as replaced:
        ok(run_flow(replaced, new_mar.folder, new_mar.as_of, "--replace"))
        last = runs(replaced)[-1]
        assert (last["as_of"], last["mode"], last["status"]) == (
            new_mar.as_of,
            "backfill (replace)",
            "succeeded",
        )

        assert_same_data(replaced, db_url, but_user=dropped_kept)
        live, _ = contents(replaced, four.headers)
        assert {t: live[t][dropped_kept] for t in LIVE_TABLES} == {
            t: mar.rows[t][dropped_kept] for t in LIVE_TABLES
        }
        assert {t: live[t][added_first] for t in LIVE_TABLES} == {
            t: new_mar.rows[t][added_first] for t in LIVE_TABLES
        }
        assert structure(replaced) == structure(db_url)
        assert_reruns_are_noops(run_flow, replaced, in_place)
