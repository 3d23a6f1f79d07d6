"""The ingestion ledger: what each run read, did and decided."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import date

import psycopg
from psycopg.types.json import Jsonb

from .db import one_row
from .errors import HistoryIncomplete, first_few
from .fingerprints import FileFingerprint
from .registry import BY_NAME
from .sqlfiles import queries


def published_files(conn: psycopg.Connection, as_of: date) -> dict | None:
    """The files of the last run that published ``as_of`` or found it unchanged."""
    row = conn.execute(queries("ledger")["published_files"], {"as_of": as_of}).fetchone()
    return row[0] if row else None


def files_published_elsewhere(
    conn: psycopg.Connection, as_of: date, files: list[FileFingerprint]
) -> list[tuple[str, date]]:
    """(table, as_of) of each file of the month's own values (``TableSpec.of_the_month``)
    identical to one of another published as_of: worth a warning, not a refusal."""
    hashes = [f.sha256 for f in files if BY_NAME[f.table].of_the_month]
    rows = conn.execute(
        queries("ledger")["files_published_elsewhere"], {"as_of": as_of, "hashes": hashes}
    ).fetchall()
    return [(table, published) for table, published in rows]


def check_history(conn: psycopg.Connection, histories: Sequence[str]) -> None:
    """HistoryIncomplete if a published month has no partition in one of ``histories``,
    or if one of them holds a month the ledger does not list.

    A partition detached or dropped by hand leaves no error anywhere: the month just
    reads as empty in that table, for every training set built on it. A month in history
    but not in the ledger (a restore that stopped part-way) would be taken for a new
    month by the rerun rules, and republished as the latest over newer ones.
    """
    rows = conn.execute(
        queries("ledger")["history_against_ledger"], {"histories": list(histories)}
    ).fetchall()
    missing = [(table, as_of) for table, as_of, is_missing in rows if is_missing]
    unlisted = [(table, as_of) for table, as_of, is_missing in rows if not is_missing]
    if missing:
        shown = first_few([f"{table} {as_of.isoformat()}" for table, as_of in missing])
        raise HistoryIncomplete(
            f"published months missing from history: {shown} (a partition detached or "
            "dropped by hand?); nothing was run: attach the month's partition back to its "
            "history table, or restore the database"
        )
    if unlisted:
        shown = first_few(
            [
                f"{table} {as_of.isoformat() if as_of else '(not one month)'}"
                for table, as_of in unlisted
            ]
        )
        raise HistoryIncomplete(
            f"months in history that the ledger (ingest_months) does not list: {shown} "
            "(rows deleted by hand, or a restore that stopped part-way?); nothing was run: "
            "restore the database whole (docs/stack.md, 'Backup and restore')"
        )


def abandon_stale_runs(conn: psycopg.Connection) -> int:
    cur = conn.execute(queries("ledger")["abandon_stale_runs"])
    return cur.rowcount


def start_run(
    conn: psycopg.Connection,
    *,
    as_of: date,
    seed_dir: str,
    status: str,
    mode: str,
    fingerprint: str | None,
    files: list[FileFingerprint] | None,
    flow_run_id: str | None = None,
) -> int:
    """A new ingest_runs row; ``flow_run_id``: the Prefect flow run, when there is one.

    ``seed_dir`` is recorded absolute (not resolved: the name people used stays): a
    relative one meant nothing to whoever read the ledger from another folder, and a
    deployment's was relative to a runner's working folder nobody sees.
    """
    files_json = Jsonb({f.table: f.as_json() for f in files}) if files else None
    cur = conn.execute(
        queries("ledger")["start_run"],
        {
            "as_of": as_of,
            "seed_dir": os.path.abspath(seed_dir),
            "status": status,
            "mode": mode,
            "fingerprint": fingerprint,
            "files": files_json,
            "flow_run_id": flow_run_id,
        },
    )
    return int(one_row(cur)[0])


def finish_run(
    conn: psycopg.Connection,
    run_id: int,
    *,
    status: str,
    table_stats: list[dict] | None = None,
    validation: list[dict] | None = None,
    timings: dict[str, float] | None = None,
    error: str | None = None,
) -> None:
    conn.execute(
        queries("ledger")["finish_run"],
        {
            "run_id": run_id,
            "status": status,
            "table_stats": Jsonb(table_stats) if table_stats is not None else None,
            "validation": Jsonb(validation) if validation is not None else None,
            "timings": Jsonb(timings) if timings is not None else None,
            "error": error,
        },
    )


def record_refusal(
    conn: psycopg.Connection,
    *,
    as_of: date,
    seed_dir: str,
    fingerprint: str,
    files: list[FileFingerprint],
    timings: dict[str, float],
    error: str,
    flow_run_id: str | None = None,
) -> int:
    """A run the rerun rules refused: other files for a published as_of, the files of
    another published as_of (both without --replace), a gap, or a published month
    missing from history."""
    run_id = start_run(
        conn,
        as_of=as_of,
        seed_dir=seed_dir,
        status="running",
        mode="refused",
        fingerprint=fingerprint,
        files=files,
        flow_run_id=flow_run_id,
    )
    finish_run(conn, run_id, status="failed", timings=timings, error=error)
    return run_id


def published_stats(conn: psycopg.Connection, run_id: int) -> list[dict] | None:
    """The per-table counts the run's publishing transaction recorded; None if the
    ledger does not list the run as succeeded."""
    row = conn.execute(queries("ledger")["published_stats"], {"run_id": run_id}).fetchone()
    return None if row is None else row[0]


def record_month(
    conn: psycopg.Connection,
    as_of: date,
    fingerprint: str,
    run_id: int,
    table_stats: list[dict],
) -> None:
    """In the publishing transaction: the month's files, and its run marked succeeded.

    The Data Docs and finish_run come after the commit; a run killed in between has
    still published its month, and must not read as abandoned.
    """
    q = queries("ledger")
    conn.execute(q["record_month"], {"as_of": as_of, "fingerprint": fingerprint, "run_id": run_id})
    conn.execute(q["mark_published"], {"run_id": run_id, "table_stats": Jsonb(table_stats)})
