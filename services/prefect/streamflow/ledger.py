"""The ingestion ledger: what each run read, did and decided; the rerun rules."""

from __future__ import annotations

import calendar
import hashlib
import os
import time
from dataclasses import dataclass
from datetime import date, timedelta
from enum import StrEnum
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

from .db import queries
from .errors import MonthConflict, unreadable
from .registry import TABLES


class Mode(StrEnum):
    PUBLISH = "publish"  # newest month: live tables and history
    BACKFILL = "backfill"  # older than the latest published month: history, and live
    # rows only for the users no later month lists
    NOOP = "noop"  # same as_of, same files: nothing to do


@dataclass(frozen=True)
class FileFingerprint:
    table: str
    file: str
    sha256: str
    bytes: int
    stat: dict | None = None
    """Where the file was and when it last changed, as seen while it was hashed."""

    def as_json(self) -> dict:
        entry = {"file": self.file, "sha256": self.sha256, "bytes": self.bytes}
        return entry | ({"stat": self.stat} if self.stat else {})


def _stat(path: Path, st: os.stat_result) -> dict:
    return {
        "path": str(path.resolve()),
        "device": st.st_dev,
        "inode": st.st_ino,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


def fingerprint_file(table: str, path: Path) -> FileFingerprint:
    hashed_at = time.time_ns()
    before = path.stat()
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:  # the first read of the month: name the file here
        raise unreadable(path, exc) from exc
    after = path.stat()
    stat = _stat(path, after) if _stat(path, before) == _stat(path, after) else None
    if stat is not None:
        stat["hashed_at_ns"] = hashed_at
    return FileFingerprint(table, path.name, digest.hexdigest(), size, stat)


def is_hashed_file(hashed: dict, st: os.stat_result) -> bool:
    """Whether an open file (its fstat) is the very file ``hashed`` describes, unwritten.

    ``hashed`` is a ``FileFingerprint.as_json()``; a file that changed while it was
    being hashed has no stat there, and is never the hashed file.
    """
    seen = hashed.get("stat")
    return (
        bool(seen)
        and st.st_size == hashed["bytes"]
        and (
            (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
            == (seen["device"], seen["inode"], seen["mtime_ns"], seen["ctime_ns"])
        )
    )


# A file still at the same place, with the size and times recorded when it was hashed,
# holds the same bytes: every write moves a file's ctime, which no tool can set back
# (git's index relies on the same). Two writes within one tick of the filesystem's
# clock can share a ctime, so only files last changed well before they were hashed
# are trusted (git's "racily clean" rule); the others are hashed again.
RACY_MARGIN_NS = 2_000_000_000


def fingerprint_by_stat(recorded: dict, files: dict[str, Path]) -> list[FileFingerprint] | None:
    """The recorded fingerprints if no file changed since, by its stat; else None."""
    prints = []
    for table, path in files.items():
        entry = recorded.get(table) or {}
        seen = entry.get("stat")
        if not seen or entry.get("file") != path.name:
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        now = _stat(path, st) | {"hashed_at_ns": seen.get("hashed_at_ns")}
        if now != seen or st.st_size != entry["bytes"]:
            return None
        if seen["ctime_ns"] > seen["hashed_at_ns"] - RACY_MARGIN_NS:
            return None
        prints.append(FileFingerprint(table, entry["file"], entry["sha256"], entry["bytes"], seen))
    return prints


def published_files(conn: psycopg.Connection, as_of: date) -> dict | None:
    """The files of the last run that published ``as_of`` or found it unchanged."""
    row = conn.execute(queries("ledger")["published_files"], {"as_of": as_of}).fetchone()
    return row[0] if row else None


def month_fingerprint(files: list[FileFingerprint]) -> str:
    """One hash for the month: order-independent of how files were listed."""
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.table):
        digest.update(f"{f.table}:{f.sha256}\n".encode())
    return digest.hexdigest()


def fingerprint_month(
    conn: psycopg.Connection,
    as_of: date,
    files: dict[str, Path],
    timings: dict[str, float],
    *,
    remember: bool = False,
) -> tuple[list[FileFingerprint], str]:
    """Each file's fingerprint, and the month's.

    Files untouched since the ledger last saw this as_of's month, or since this
    process hashed them with ``remember``, are known by their stat; the others are
    hashed. The time taken goes into ``timings`` as ``stat_check`` or
    ``fingerprint``, whichever answered.
    """
    start = time.perf_counter()
    step = "stat_check"
    prints = None
    for recorded in (published_files(conn, as_of), _hashed_here.get(_month_key(files))):
        if prints is None and recorded:
            prints = fingerprint_by_stat(recorded, files)
    if prints is None:
        prints = [fingerprint_file(table, path) for table, path in files.items()]
        if remember:
            _hashed_here[_month_key(files)] = {p.table: p.as_json() for p in prints}
        step = "fingerprint"
    timings[step] = round(time.perf_counter() - start, 3)
    return prints, month_fingerprint(prints)


# Months this process hashed with ``remember``: the CLI fingerprints a month to look
# for a no-op before it starts the flow, which fingerprints it again under its lock;
# the same stat rule spares it a second read of the files (2 s or more at 10M users).
_hashed_here: dict[tuple[str, ...], dict] = {}


def _month_key(files: dict[str, Path]) -> tuple[str, ...]:
    return tuple(sorted(str(p.resolve()) for p in files.values()))


def changed_files(recorded: dict | None, prints: list[FileFingerprint]) -> list[str]:
    """The files whose bytes differ from those recorded for the month, in registry order."""
    recorded = recorded or {}
    return [p.file for p in prints if (recorded.get(p.table) or {}).get("sha256") != p.sha256]


def decide_mode(
    conn: psycopg.Connection,
    as_of: date,
    prints: list[FileFingerprint],
    *,
    replace: bool,
    allow_gap: bool = False,
) -> tuple[Mode, bool]:
    """The rerun rules, for the month of these files. Returns (mode, replacing).

    ``replacing`` is also True for files of another published as_of let through by
    --replace, so that the ledger records the override. A new latest month more than
    one month after the latest published one is refused unless ``allow_gap``.
    """
    fingerprint = month_fingerprint(prints)
    q = queries("ledger")
    row = conn.execute(q["published_month"], {"as_of": as_of}).fetchone()
    if row is not None and row[0] == fingerprint and not replace:
        return Mode.NOOP, False
    # Before the "other files" refusal: another month's files are named as such (that
    # refusal's advice, --replace, would put them in place of this month unannounced).
    same = conn.execute(q["same_files_elsewhere"], {"fingerprint": fingerprint, "as_of": as_of})
    if (copied := same.fetchone()) is not None and not replace:
        # A month's files describe what was known on its as_of: the same bytes under two
        # dates is a folder copied or a wrong AS_OF, and would duplicate that month.
        raise MonthConflict(
            f"as_of {as_of.isoformat()}: these files were already published as as_of "
            f"{copied[0].isoformat()} (run {copied[1]}); a month's files describe what was "
            "known on its as_of. Check SEED_DIR and AS_OF, or rerun with --replace (or "
            "REPLACE=1) to publish them for this as_of too"
        )
    replacing = copied is not None
    if row is not None:
        if row[0] != fingerprint and not replace:
            # Byte for byte: a re-export with other quoting or line ends is "different".
            changed = changed_files(published_files(conn, as_of), prints)
            which = f"; {', '.join(changed)} changed" if changed else ""
            raise MonthConflict(
                f"as_of {as_of.isoformat()} was already published from different files "
                f"(run {row[1]}{which}); rerun with --replace (or REPLACE=1) to replace "
                "that month"
            )
        replacing = True
    latest = conn.execute(q["latest_published"]).fetchone()[0]
    if latest is not None and as_of < latest:
        return Mode.BACKFILL, replacing
    if latest is not None and as_of > (expected := next_month_end(latest)) and not allow_gap:
        # The latest month is the live tables' month: once a mistyped year (2025 for
        # 2024) is published, every real month after it is a backfill that never
        # reaches them, and no run can take that as_of back.
        raise MonthConflict(
            f"as_of {as_of.isoformat()} is {months_between(latest, as_of)} months after "
            f"the latest published month ({latest.isoformat()}), whose next is "
            f"{expected.isoformat()}: the months in between could then only be "
            "backfilled into history, never reach the live tables. Check AS_OF, or rerun "
            "with --allow-gap (or ALLOW_GAP=1; a deployment run: --param allow_gap=true) "
            "if those months will never be published"
        )
    return Mode.PUBLISH, replacing


def month_end(day: date) -> date:
    return day.replace(day=calendar.monthrange(day.year, day.month)[1])


def next_month_end(day: date) -> date:
    """The last day of the month after ``day``'s."""
    return month_end(month_end(day) + timedelta(days=1))


def months_between(earlier: date, later: date) -> int:
    return (later.year - earlier.year) * 12 + later.month - earlier.month


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
    """A new ingest_runs row; ``flow_run_id``: the Prefect flow run, when there is one."""
    files_json = Jsonb({f.table: f.as_json() for f in files}) if files else None
    row = conn.execute(
        queries("ledger")["start_run"],
        {
            "as_of": as_of,
            "seed_dir": seed_dir,
            "status": status,
            "mode": mode,
            "fingerprint": fingerprint,
            "files": files_json,
            "flow_run_id": flow_run_id,
        },
    ).fetchone()
    return int(row[0])


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
) -> int:
    """A run the rerun rules refused without --replace: other files for a published as_of,
    or the files of another published as_of."""
    run_id = start_run(
        conn,
        as_of=as_of,
        seed_dir=seed_dir,
        status="running",
        mode="refused",
        fingerprint=fingerprint,
        files=files,
    )
    finish_run(conn, run_id, status="failed", timings=timings, error=error)
    return run_id


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


def expected_files(seed_dir: Path) -> dict[str, Path]:
    return {spec.name: seed_dir / spec.file_name for spec in TABLES}
