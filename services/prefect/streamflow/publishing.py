"""Load: publish a validated, staged month in the caller's transaction.

Live tables get the month's rows (unless the month is a backfill, which must never
rewind them); history tables get the month frozen under its ``as_of``. The caller
commits once, so either all of it lands or none of it does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import date

import psycopg
from psycopg import sql

from .db import ident_list, query
from .registry import TABLES, TableSpec


@dataclass
class TableStats:
    table: str
    read: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    snapshot_table: str | None = None
    snapshot_inserted: int = 0
    snapshot_updated: int = 0
    snapshot_removed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def upsert_live(cur: psycopg.Cursor, spec: TableSpec) -> tuple[int, int]:
    values = spec.value_columns
    cur.execute(
        query(
            "publish",
            "upsert_live",
            live=sql.Identifier(spec.name),
            staged=sql.Identifier("staging", spec.name),
            columns=ident_list(spec.column_names),
            value_columns=ident_list(values),
            excluded_values=ident_list(values, "excluded"),
            live_values=ident_list(values, "live"),
        )
    )
    inserted, updated = cur.fetchone()
    return inserted, updated


def snapshot(cur: psycopg.Cursor, spec: TableSpec, as_of: date) -> tuple[int, int, int]:
    assert spec.snapshot_table is not None
    ids = {
        "history": sql.Identifier(spec.snapshot_table),
        "staged": sql.Identifier("staging", spec.name),
    }
    cur.execute(query("publish", "drop_vanished_snapshots", **ids), {"as_of": as_of})
    removed = cur.rowcount
    cols = spec.snapshot_columns
    cur.execute(
        query(
            "publish",
            "snapshot",
            **ids,
            columns=ident_list(cols),
            excluded_values=ident_list(cols, "excluded"),
            history_values=ident_list(cols, "h"),
        ),
        {"as_of": as_of},
    )
    inserted, updated = cur.fetchone()
    return inserted, updated, removed


def publish_month(conn: psycopg.Connection, as_of: date, *, update_live: bool) -> list[TableStats]:
    """Upsert live tables (parents first) and write the as_of snapshots; no commit."""
    stats = []
    with conn.cursor() as cur:
        for spec in TABLES:
            cur.execute(query("publish", "staged_rows", staged=sql.Identifier("staging", spec.name)))
            s = TableStats(spec.name, read=cur.fetchone()[0], snapshot_table=spec.snapshot_table)
            if update_live:
                s.inserted, s.updated = upsert_live(cur, spec)
                s.unchanged = s.read - s.inserted - s.updated
            else:
                s.unchanged = s.read  # backfill: live tables keep the newer month
            if spec.snapshot_table:
                s.snapshot_inserted, s.snapshot_updated, s.snapshot_removed = snapshot(cur, spec, as_of)
            stats.append(s)
    return stats
