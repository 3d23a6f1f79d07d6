"""Load: publish a validated, staged month in the caller's transaction.

Live tables hold each user's values from the latest month that lists the user: the
newest month's rows all go in; a backfill's only for the users no later month lists
(it must never rewind the others). History tables get the month frozen under its
``as_of``. The caller commits once, so either all of it lands or none of it does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date

import psycopg
from psycopg import sql

from .db import one_row
from .registry import PARENT, TABLES, TableSpec
from .sqlfiles import ident_list, queries, query, staged


@dataclass
class TableStats:
    table: str
    read: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int | None = None
    absent: int | None = None
    """Live rows of users this month does not list: kept, with their last values.
    Both None for a backfill, which compares nothing with the newer months' rows."""
    snapshot_table: str | None = None
    snapshot_inserted: int = 0
    snapshot_updated: int = 0
    snapshot_removed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def upsert_live(
    cur: psycopg.Cursor, spec: TableSpec, backfill: bool = False
) -> tuple[int, int, int]:
    """Returns (inserted, updated, live rows after); unchanged rows are not touched.

    ``backfill``: the month is older than the latest published one; only the users
    no later month lists are written (publish_month has found them).
    """
    values = spec.value_columns
    names = {
        "live": sql.Identifier(spec.name),
        "staged": staged(spec.name),
        "columns": ident_list(spec.column_names),
        "staged_columns": ident_list(spec.column_names, "s"),
        "value_columns": ident_list(values),
        "staged_values": ident_list(values, "s"),
        "live_values": ident_list(values, "t"),
    }
    q = queries("publish")
    params = {"live": spec.name}
    source: sql.Composable = names["staged"]
    if backfill:
        source = query("publish", "backfill_rows", staged=names["staged"])
    elif spec is not PARENT and one_row(cur.execute(q["drop_empty_live_key"], params))[0]:
        cur.execute(query("publish", "append_live", **names))
        inserted = cur.rowcount
        cur.execute(q["restore_live_key"], params)
        return inserted, 0, inserted
    elif one_row(cur.execute(query("publish", "live_is_empty", **names)))[0]:
        cur.execute(query("publish", "insert_live", **names))
        return cur.rowcount, 0, cur.rowcount
    # MERGE reports one count for inserts and updates together (RETURNING
    # merge_action() is PostgreSQL 17+): the table's growth tells them apart.
    before = one_row(cur.execute(query("publish", "live_rows", **names)))[0]
    cur.execute(query("publish", "merge_live", source=source, **names))
    changed = cur.rowcount
    after = one_row(cur.execute(query("publish", "live_rows", **names)))[0]
    inserted = after - before
    return inserted, changed - inserted, after


def build_history(
    cur: psycopg.Cursor, as_of: date, keep_going: Callable[[], None] = lambda: None
) -> dict[str, int]:
    """Build the new month partition of each history table that lacks it; no commit.

    Each is created, filled and keyed in the staging schema by the publishing
    transaction, which ``snapshot`` then attaches. Its rows must be written by that
    transaction: rows committed earlier by another one would be visible, once attached,
    to a reader whose snapshot predates the publish (a REPEATABLE READ training job
    would see the month in one history table and not yet in another, and not in
    ingest_months). Returns the rows written per history table; a table missing from
    it has this month in history already (a --replace).
    """
    built = {}
    q = queries("publish")
    cur.execute(q["drop_staged_months"])  # left by older versions
    for spec in TABLES:
        keep_going()
        if spec.snapshot_table is None:
            continue
        history = spec.snapshot_table
        params = {"history": history, "as_of": as_of}
        partition = one_row(cur.execute(q["new_month_partition"], params))[0]
        if partition is None:
            continue
        # The name is built by the SQL function from the registry's table name and
        # the date; it is quoted here like every identifier.
        cur.execute(
            query(
                "publish",
                "insert_snapshot",
                partition=sql.Identifier("staging", partition),
                staged=staged(spec.name),
                columns=ident_list(spec.snapshot_columns),
            ),
            params,
        )
        built[history] = cur.rowcount
        cur.execute(q["index_month_partition"], params)
    return built


def snapshot(
    cur: psycopg.Cursor, spec: TableSpec, as_of: date, built: dict[str, int]
) -> tuple[int, int, int]:
    """Freeze the staged month under ``as_of``: (inserted, updated, removed).

    A month built by ``build_history`` is attached; a month already in history is
    rewritten row by row.
    """
    assert spec.snapshot_table is not None
    history = spec.snapshot_table
    cols = spec.snapshot_columns
    q = queries("publish")
    params = {"history": history, "as_of": as_of}
    if history in built:
        cur.execute(q["attach_month_partition"], params)
        return built[history], 0, 0
    ids = {"history": sql.Identifier(history), "staged": staged(spec.name)}
    cur.execute(query("publish", "drop_vanished_snapshots", **ids), {"as_of": as_of})
    removed = cur.rowcount
    names = {
        "columns": ident_list(cols),
        "staged_values": ident_list(cols, "s"),
        "history_values": ident_list(cols, "h"),
    }
    cur.execute(query("publish", "update_snapshot", **ids, **names), {"as_of": as_of})
    updated = cur.rowcount
    cur.execute(query("publish", "add_to_snapshot", **ids, **names), {"as_of": as_of})
    return cur.rowcount, updated, removed


def publish_month(
    conn: psycopg.Connection,
    as_of: date,
    *,
    newest: bool,
    keep_going: Callable[[], None] = lambda: None,
) -> list[TableStats]:
    """Upsert live tables (parents first), then write the as_of snapshots; no commit.

    ``newest``: no later month is published (else a backfill, see ``upsert_live``).
    ``keep_going`` is called before each table, and raises to stop (the month was
    refused meanwhile).
    """
    stats = []
    with conn.cursor() as cur:
        cur.execute(queries("publish")["session"])
        if not newest:
            cur.execute(queries("publish")["not_listed_later"], {"as_of": as_of})
            cur.execute(queries("publish")["analyze_backfill_users"])
        for spec in TABLES:
            keep_going()
            cur.execute(query("staging", "staged_rows", staged=staged(spec.name)))
            s = TableStats(spec.name, read=one_row(cur)[0], snapshot_table=spec.snapshot_table)
            if newest:
                s.inserted, s.updated, live_rows = upsert_live(cur, spec)
                # Users are never deleted: those this month does not list stay live with
                # their last values (its snapshot says who was in it). The month's users
                # are all live now, once each (validated unique): the rest are absent.
                s.absent = live_rows - s.read
                s.unchanged = s.read - s.inserted - s.updated
            else:
                # A backfill leaves the newer months' users alone: those rows were not
                # compared, so unchanged and absent stay unknown (None), not 0.
                s.inserted, s.updated, _ = upsert_live(cur, spec, backfill=True)
            stats.append(s)
        built = build_history(cur, as_of, keep_going)
        for spec, s in zip(TABLES, stats, strict=True):
            keep_going()
            if spec.snapshot_table:
                s.snapshot_inserted, s.snapshot_updated, s.snapshot_removed = snapshot(
                    cur, spec, as_of, built
                )
    return stats
