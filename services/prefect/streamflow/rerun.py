"""The rerun rules, and the unchanged month recorded before Prefect and GX are imported.

``decide_mode`` compares a month's fingerprints with the ledger: a no-op, a new or
replaced month, a backfill, or a refusal.

A month already published from byte-identical files is a no-op. Starting Prefect's
engine (and, without PREFECT_API_URL, its temporary API server) and importing GX to
find that out costs 2 to 20 s; the answer itself is a fingerprint (the files' stat,
if they have not changed since they were hashed) and one ledger lookup. So the CLI
asks first (``unchanged_month``, from cli.py), and the run is recorded in the ledger
as a no-op like any other.
"""

from __future__ import annotations

from datetime import date
from enum import StrEnum
from pathlib import Path

import psycopg

from . import bootstrap, db, fingerprints, ledger, locking
from .embedded import resolve_database_url
from .errors import MonthConflict
from .fingerprints import FileFingerprint, month_fingerprint
from .inputs import check_run, months_between, next_month_end
from .registry import SNAPSHOT_TABLES
from .reporting import RunSummary
from .settings import load_settings
from .sqlfiles import queries


class Mode(StrEnum):
    PUBLISH = "publish"  # newest month: live tables and history
    BACKFILL = "backfill"  # older than the latest published month: history, and live
    # rows only for the users no later month lists
    NOOP = "noop"  # same as_of, same files: nothing to do


def fingerprint_files(
    conn: psycopg.Connection,
    as_of: date,
    files: dict[str, Path],
    timings: dict[str, float],
    *,
    remember: bool = False,
) -> tuple[list[FileFingerprint], str]:
    """The month's files and fingerprint: known by their stat where the ledger's record
    of this as_of (or this process, with ``remember``) saw them unchanged."""
    recorded = ledger.published_files(conn, as_of)
    return fingerprints.fingerprint_month(recorded, files, timings, remember=remember)


def changed_files(recorded: dict | None, prints: list[FileFingerprint]) -> list[str]:
    """The files whose bytes differ from those recorded for the month, in registry order."""
    recorded = recorded or {}
    return [p.file for p in prints if (recorded.get(p.table) or {}).get("sha256") != p.sha256]


# How a deployment run (the Prefect UI, `prefect deployment run`) asks for it.
_DEPLOYMENT_REPLACE = "a deployment run: --param replace=true"


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
    HistoryIncomplete, before any rule: no month is decided, not even an unchanged one,
    while a published month is missing from a history table.
    """
    ledger.check_history(conn, SNAPSHOT_TABLES)
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
            f"REPLACE=1; {_DEPLOYMENT_REPLACE}) to publish them for this as_of too"
        )
    replacing = copied is not None
    latest = db.one_row(conn.execute(q["latest_published"]))[0]  # max(): NULL, never no row
    if row is not None:
        if row[0] != fingerprint and not replace:
            # Byte for byte: a re-export with other quoting or line ends is "different".
            changed = changed_files(ledger.published_files(conn, as_of), prints)
            which = f"; {', '.join(changed)} changed" if changed else ""
            # The usual cause is next month's folder run with last month's AS_OF still
            # set (.env): --replace alone would put it in that month's place.
            following = (
                f" (the month after it, {next_month_end(as_of).isoformat()}, is not published)"
                if as_of == latest
                else ""
            )
            raise MonthConflict(
                f"as_of {as_of.isoformat()} was already published from different files "
                f"(run {row[1]}{which}). If these are another month's files, check SEED_DIR "
                f"and AS_OF{following}; if they correct this month, rerun with --replace "
                f"(or REPLACE=1; {_DEPLOYMENT_REPLACE}) to replace it"
            )
        replacing = True
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


def unchanged_month(seed_dir: str, as_of: str) -> RunSummary | None:
    """Record and return a no-op run if the month is published from these very files."""
    settings = load_settings()
    as_of_date, files = check_run(seed_dir, as_of, settings)
    url = resolve_database_url(settings)
    summary = RunSummary(seed_dir=seed_dir, as_of=as_of_date.isoformat(), mode=Mode.NOOP.value)
    with db.connect(url, autocommit=True) as control:
        if not bootstrap.schema_present(control):
            return None
        # No waiting here: a busy lock means a run in progress, and the flow waits for
        # it, LOCK_WAIT_SECONDS once, in a run people can see in Prefect.
        with locking.writer_lock(control, 0, name_holder=False):
            ledger.abandon_stale_runs(control)  # the lock is ours: no run is alive
            prints, fingerprint = fingerprint_files(
                control, as_of_date, files, summary.timings, remember=True
            )
            mode, _ = decide_mode(control, as_of_date, prints, replace=False)
            if mode is not Mode.NOOP:
                return None
            summary.status = "noop"
            summary.run_id = ledger.start_run(
                control,
                as_of=as_of_date,
                seed_dir=seed_dir,
                status="noop",
                mode=Mode.NOOP.value,
                fingerprint=fingerprint,
                files=prints,
            )
            ledger.finish_run(control, summary.run_id, status="noop", timings=summary.timings)
    return summary
