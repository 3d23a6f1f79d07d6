"""The unchanged month, answered before Prefect and GX are even imported.

A month already published from byte-identical files is a no-op. Starting Prefect's
engine (and, without PREFECT_API_URL, its temporary API server) and importing GX to
find that out costs 2 to 20 s; the answer itself is a fingerprint (the files' stat,
if they have not changed since they were hashed) and one ledger lookup. So the CLI
asks first, and the run is recorded in the ledger as a no-op like any other.
A month folder, file or as_of that is plainly wrong (or a setting) is reported here
too, in one line, rather than after Prefect has started. Everything else (a new
month, a replacement, a refusal, a database that cannot be reached) goes to the flow,
which decides again under its own lock and reports as usual.
"""

from __future__ import annotations

import sys

from . import db, ledger
from .embedded import resolve_database_url
from .errors import InputError
from .inputs import check_run, complete_run
from .ledger import Mode
from .reporting import RunSummary
from .settings import load_settings


def unchanged_month(seed_dir: str, as_of: str) -> RunSummary | None:
    """Record and return a no-op run if the month is published from these very files."""
    settings = load_settings()
    as_of_date, files = check_run(seed_dir, as_of, settings)
    url = resolve_database_url(settings)
    summary = RunSummary(seed_dir=seed_dir, as_of=as_of_date.isoformat(), mode=Mode.NOOP.value)
    with db.connect(url, autocommit=True) as control:
        if not db.schema_present(control):
            return None
        # No waiting here: a busy lock means a run in progress, and the flow waits for
        # it, LOCK_WAIT_SECONDS once, in a run people can see in Prefect.
        with db.writer_lock(control, 0):
            ledger.abandon_stale_runs(control)  # the lock is ours: no run is alive
            prints, fingerprint = ledger.fingerprint_month(
                control, as_of_date, files, summary.timings, remember=True
            )
            mode, _ = ledger.decide_mode(control, as_of_date, prints, replace=False)
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


def exit_if_unchanged(argv: list[str]) -> None:
    """For ``python ingest_flow.py``: print the no-op line and exit 0, or the input
    error and exit 1, or return."""
    try:
        args = complete_run(argv)  # reads REPLACE, which may be neither yes nor no
        if args is None:
            return
        if args.replace:  # never a no-op: its inputs are checked now, not after Prefect
            check_run(args.seed_dir, args.as_of, load_settings())
            return
        summary = unchanged_month(args.seed_dir, args.as_of)
    except InputError as exc:  # no run to start: the folder, a file, as_of or a setting
        print(f"ingest failed: {exc}", file=sys.stderr)
        sys.exit(1)
    except Exception:  # a refusal, no database: the flow reports it, and retries
        return
    if summary is not None:
        print(summary.one_line())
        sys.exit(0)
