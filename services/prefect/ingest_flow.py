"""StreamFlow monthly ingestion, as a Prefect flow.

    month_XXX/*.csv ──upsert_csv ×6──▶ staging.*  (COPY, typed by PostgreSQL; GX starts meanwhile)
        ├─validate_with_ge──▶ GX suites over the staged month ───────────┐ verdict
        └─snapshot_month────▶ live upserts + as_of history, one open     │
                              transaction ──▶ commit if the suites pass ◀┘ else roll back

Run one month, from the repository's root:
    SEED_DIR=data/seeds/month_000 AS_OF=2024-01-31 python services/prefect/ingest_flow.py
    python services/prefect/ingest_flow.py --seed-dir data/seeds/month_000 --as-of 2024-01-31
Serve it:
    python services/prefect/ingest_flow.py serve   (deployment ingest_month/ingest-month)
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from datetime import date
from functools import partial
from pathlib import Path

import psycopg

# The temporary local Prefect server (no PREFECT_API_URL) is a private one: no
# telemetry from it, whose failed inserts clutter stderr.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

if __name__ == "__main__":
    # An unchanged month is answered, and GX and the API server started, before Prefect
    # is imported (streamflow/cli.py).
    from streamflow.cli import before_prefect

    WARMUP = before_prefect(sys.argv[1:])

import prefect.runtime
from prefect import Task, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.task_runners import ThreadPoolTaskRunner
from streamflow import (
    bootstrap,
    cli,
    db,
    diagnosis,
    errors,
    fingerprints,
    interrupts,
    ledger,
    loading,
    locking,
    outcomes,
    publishing,
    rerun,
    runs,
    validation,
)
from streamflow.embedded import resolve_database_url
from streamflow.errors import NotPublished, SaidOnce, WithoutTraceback
from streamflow.inputs import check_run
from streamflow.registry import BY_NAME
from streamflow.reporting import RunSummary, Stopwatch, publish_artifacts
from streamflow.rerun import Mode
from streamflow.served import FLOW_NAME
from streamflow.settings import load_settings
from streamflow.verdict import Rejected, Verdict

# A failed month is reported in one line; Prefect's run loggers (terminal and UI) would
# add the traceback of each failed task and of the flow: ~90 lines for one bad value.
# Each failure's reason is written once, not in each of Prefect's records of it.
_said_once = SaidOnce(explained=diagnosis.explain_failure)
for _run_logger in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_run_logger).addFilter(_said_once)  # first: it reads the traceback
    logging.getLogger(_run_logger).addFilter(WithoutTraceback(explained=diagnosis.explain_failure))


def _only_connection_errors(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry a lost connection or a deadlock; never bad data or failed expectations."""
    try:
        state.result()
    except BaseException as exc:
        return diagnosis.worth_retrying(exc)
    return False


@task(
    name="upsert_csv",
    task_run_name="upsert_csv-{table}",  # which file, in the UI's list of task runs
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_only_connection_errors,
    cache_policy=NO_CACHE,
)
def upsert_csv(
    database_url: str,
    table: str,
    path: str,
    hashed: dict | None = None,
    lock_holder: int | None = None,
    stop: Verdict | None = None,
) -> loading.StagedFile:
    """COPY one CSV into its staging table; published later by snapshot_month.

    ``hashed``: the file as the run fingerprinted it, which the staged bytes must be.
    ``lock_holder``: the backend that holds the run's writer lock.
    ``stop``: rejected when a signal stops the run: the COPY in progress is cancelled
    (it may be waiting for a reader's lock on its staging table, for as long as the
    reader holds it).
    """
    stop = stop or Verdict()  # never rejected: nothing to cancel
    stopped = Rejected(f"{Path(path).name}: not staged, the run was stopped")
    if stop.rejected:  # queued behind the two COPYs that ran
        raise stopped
    with db.connect(database_url) as conn:
        stop.on_reject(lambda: conn.cancel_safe(timeout=2))
        try:
            if stop.rejected:  # before the cancel could reach a COPY
                raise stopped
            staged = loading.stage_file(
                conn, BY_NAME[table], Path(path), hashed, lock_holder, get_run_logger().warning
            )
        except psycopg.errors.QueryCanceled:
            if stop.rejected:
                raise stopped from None
            raise
    get_run_logger().info("%s: %d rows staged", Path(path).name, staged.rows)
    return staged


# No retries, whatever PREFECT_TASKS_DEFAULT_RETRIES says: the GX process answers once,
# and a retry's "GX process: exit code 0" replaced why the month failed.
@task(name="validate_with_ge", retries=0, cache_policy=NO_CACHE)
def validate_with_ge(
    suites: validation.SuitesProcess,
    files: dict[str, Path],
    as_of: date,
    before: validation.UsersBefore,
) -> list[outcomes.SuiteOutcome]:
    """Run the six GX suites inside PostgreSQL; raise ValidationFailed on any failure.

    ``before``: the month published before this one, which it may list at most
    MAX_USERS_DROP_PERCENT fewer users than, and leave out at most that share of the
    users of (``UsersBefore.judge``).
    """
    found, site = suites.run(as_of, before.floor)
    before.judge(found)
    outcomes.locate_rows(found, files)
    logger = get_run_logger()
    for suite in found:
        logger.info("suite %s: %d passed, %d failed", suite.table, suite.passed, suite.failed)
    if site:
        logger.info("GX Data Docs: %s", site)
    for failure in outcomes.further_failures(found):  # the raised line names the first
        logger.error(failure)
    outcomes.check(found)
    return found


@task(
    name="snapshot_month",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_only_connection_errors,
    cache_policy=NO_CACHE,
)
def snapshot_month(
    database_url: str,
    as_of: date,
    run_id: int,
    fingerprint: str,
    newest: bool,
    verdict: Verdict,
    lock_holder: int | None = None,
) -> list[publishing.TableStats]:
    """Publish the staged month in one transaction, committed only if validation passes.

    Runs while validate_with_ge does: the live upserts and as_of snapshots are
    written, then held uncommitted until the verdict.
    """
    start = time.perf_counter()
    try:
        verdict.stop_if_rejected()  # refused before this task started (or a retry of it)
        with db.connect(database_url) as conn:
            # A refused month stops soon: the statement in progress is cancelled, and no
            # table is started after it (at 1M rows the writes take seconds each). A
            # cancel that lands between two statements of one table is lost to it.
            # (A short timeout: an interrupt must not wait on a server that does not answer.)
            verdict.on_reject(lambda: conn.cancel_safe(timeout=2))
            # A retry after a COMMIT that reached the server but whose answer was lost
            # with the connection: published again over itself, the month recorded its
            # counts as nothing changed (+0 ~0, no history rows).
            retried = prefect.runtime.task_run.run_count > 1
            if retried and (recorded := ledger.published_stats(conn, run_id)) is not None:
                conn.rollback()
                verdict.committed = True
                get_run_logger().warning(
                    "the month is published: an earlier attempt's COMMIT reached the "
                    "database before its connection was lost"
                )
                return [publishing.TableStats(**t) for t in recorded]

            def lock_still_held() -> None:
                locking.check_writer_lock(conn, lock_holder)

            def keep_going() -> None:
                verdict.stop_if_rejected()
                lock_still_held()

            stats = publishing.publish_month(conn, as_of, newest=newest, keep_going=keep_going)
            ledger.record_month(conn, as_of, fingerprint, run_id, [s.as_dict() for s in stats])
            written = time.perf_counter() - start
            if not verdict.wait(meanwhile=lock_still_held):
                raise NotPublished(
                    f"{verdict.reason}: the month was rolled back, nothing published"
                )
            lock_still_held()
            conn.commit()
            verdict.committed = True
    except (
        Rejected,
        psycopg.errors.QueryCanceled,
        psycopg.errors.IntegrityError,
        psycopg.errors.CardinalityViolation,
    ) as exc:
        if isinstance(exc, (psycopg.errors.IntegrityError, psycopg.errors.CardinalityViolation)):
            # The month's own rows broke a key (a user_id twice in a file): validation,
            # still running, names the file, lines and column, and its verdict decides
            # what the run says. Failing at once put PostgreSQL's "duplicate key value
            # violates unique constraint" first in the run's log, at ERROR. The
            # transaction is already rolled back (the connection closed with it): readers
            # of the live tables do not wait behind its locks for the verdict.
            verdict.wait()
        if not verdict.rejected:
            raise  # not refused (for a key: validation missed what the key caught)
        # Not the cancel's "canceling statement due to user request", nor "validation
        # failed" when the run failed or was stopped instead.
        raise NotPublished(
            f"{verdict.reason}: the month was rolled back, nothing published"
        ) from exc
    get_run_logger().info(
        "month written in %.1fs alongside validation, then %.1fs waiting for its verdict",
        written,
        verdict.waited_seconds,
    )
    for s in stats:
        to_history = (
            f"; {s.snapshot_table} +{s.snapshot_inserted} ~{s.snapshot_updated}"
            if s.snapshot_table
            else ""  # users has no history table
        )
        same = "" if s.unchanged is None else f" ={s.unchanged}"  # None: a backfill
        get_run_logger().info("%s: +%d ~%d%s%s", s.table, s.inserted, s.updated, same, to_history)
    return stats


def _run_name() -> str:
    """ingest-<as_of>, the month in the UI's list (Prefect's default is two random words).
    Trimmed as the run reads it: ' 2024-01-31 ' was named with its spaces."""
    return f"ingest-{str(prefect.runtime.flow_run.parameters.get('as_of', '')).strip()}"


@flow(
    name=FLOW_NAME,
    flow_run_name=_run_name,
    # Prefect's flow() wants a TaskRunner[PrefectFuture[Any]], which no runner of its own
    # is (the type is invariant): PrefectHQ/prefect#16938, open.
    task_runner=ThreadPoolTaskRunner(max_workers=2),  # type: ignore[arg-type]
    # A refused or failed month is not retried (PREFECT_FLOWS_DEFAULT_RETRIES): the same
    # files give the same verdict, recorded once more in the ledger.
    retries=0,
)
def ingest_month(
    seed_dir: str,
    as_of: str,
    replace: bool = False,
    allow_gap: bool = False,
    allow_drop: bool = False,
) -> dict:
    """Ingest one month folder as of ``as_of``: all of it, validated, or nothing.

    Args:
        seed_dir: The month's folder, holding users.csv, subscriptions.csv,
            usage_agg_30d.csv, payments_agg_90d.csv, support_agg_90d.csv and labels.csv.
        as_of: The month's last day, YYYY-MM-DD: its snapshots are what was known then.
        replace: Publish these files over an as_of published from other files, or
            publish files already published for another as_of.
        allow_gap: Accept a new latest month more than one month after the latest
            published one.
        allow_drop: Accept a month that lists more than MAX_USERS_DROP_PERCENT fewer
            users than the month published before it, or leaves out more than that
            share of its users.
    """
    settings = load_settings()
    as_of_date, files = check_run(seed_dir, as_of, settings)
    url = resolve_database_url(settings)
    summary = RunSummary(seed_dir=seed_dir, as_of=as_of_date.isoformat(), mode="?")
    runs.LAST_RUN[:] = [summary]  # the CLI's word on the run if Prefect's API goes away
    clock = Stopwatch(summary.timings)
    with (
        interrupts.signals_noted(),
        runs.published_then_stopped_said(summary, get_run_logger()),
        db.connect(url, autocommit=True) as control,
        locking.writer_lock(control, settings.lock_wait_seconds, get_run_logger().info),
    ):
        lock_holder = control.info.backend_pid  # checked before every commit of the run
        with clock("schema"):
            bootstrap.ensure_schema(control, warn=get_run_logger().warning)
            ledger.abandon_stale_runs(control)
        prints, fingerprint = rerun.fingerprint_files(control, as_of_date, files, summary.timings)
        run = runs.MonthRun(control, url, summary, clock, get_run_logger())
        mode = run.open(as_of_date, prints, fingerprint, replace=replace, allow_gap=allow_gap)
        if mode is Mode.NOOP:
            ledger.finish_run(control, run.run_id, status="noop", timings=summary.timings)
        else:
            suites: validation.SuitesProcess | None = None
            stopped = False  # by a signal
            try:
                _warn_stale_exports(control, as_of_date, prints)
                drop_limit = None if allow_drop else settings.max_users_drop_percent
                before = validation.UsersBefore.of(control, as_of_date, drop_limit)
                # GX has imported and built its suites meanwhile (or does it while the
                # month is being staged); it adds the staging tables during the COPYs.
                suites = validation.SuitesProcess.take(url, settings.gx_docs_dir)
                suites.connect()
                with clock("upsert_csv"):
                    _stage_month(run, files, prints, lock_holder)
                # Publishing and validation side by side; the verdict decides the commit.
                # The ledger's timings stay additive: snapshot_month is what publishing
                # adds after validation ends (its own work is logged by the task).
                run.published = snapshot_month.submit(
                    url,
                    as_of_date,
                    run.run_id,
                    fingerprint,
                    newest=mode is Mode.PUBLISH,
                    verdict=run.verdict,
                    lock_holder=lock_holder,
                )
                run.published.add_done_callback(partial(runs.stop_validation_if_failed, suites))
                with run.verdict.deciding(then=run.published.wait), clock("validate_with_ge"):
                    before = before.count_listed(control)  # while publishing starts
                    summary.suites = validate_with_ge(suites, files, as_of_date, before)
                    interrupts.stop_if_signalled()  # before the verdict lets the commit go
                with clock("snapshot_month"):
                    summary.tables = run.published_tables()
                # Before the wait for the Data Docs: an interrupt then leaves the
                # published month's run with its counts and timings.
                run.record_success()
                interrupts.stop_if_signalled()  # the month is published: the CLI says so
            except BaseException as exc:
                stopped = interrupts.is_stop(exc)
                run.settle_failure(exc)
                raise
            finally:
                if suites is not None:
                    run.end_suites(suites, stopped=stopped)
            try:
                loading.empty_staging(control)
            except psycopg.Error as exc:  # the month is published: only disk is at stake
                get_run_logger().warning("staging not emptied: %s", errors.first_line(exc))
        # Still inside signals_noted: a stop Python swallows here is not lost either.
        publish_artifacts(summary)
        get_run_logger().info(summary.one_line())
        interrupts.stop_if_signalled()  # the CLI says whether the month is in (cli.main)
    return {
        "status": summary.status,
        "mode": summary.mode,
        "run_id": summary.run_id,
        "line": summary.one_line(),
        "data_docs": summary.data_docs,
    }


def _stage_month(
    run: runs.MonthRun,
    files: dict[str, Path],
    prints: list[fingerprints.FileFingerprint],
    lock_holder: int,
) -> None:
    """upsert_csv for each file, two COPY streams at once (one per core of a small
    machine); the rows each staged go to the run's summary."""
    hashed = {p.table: p.as_json() for p in prints}
    run.staging = [
        upsert_csv.submit(run.url, t, str(p), hashed[t], lock_holder, run.stop_staging)
        for t, p in files.items()
    ]
    for staged in (future.result() for future in run.staging):
        run.summary.rows_read[staged.table] = staged.rows


def _warn_stale_exports(
    control: psycopg.Connection, as_of: date, prints: list[fingerprints.FileFingerprint]
) -> None:
    for table, other in ledger.files_published_elsewhere(control, as_of, prints):
        name = BY_NAME[table].file_name
        get_run_logger().warning(
            "%s is byte for byte the %s published as of %s: a stale export?", name, name, other
        )


def main(argv: list[str] | None = None) -> int:
    return cli.main(ingest_month, __doc__, argv)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt from here
    signal.signal(signal.SIGTERM, interrupts.raise_terminated)  # and Terminated, its kin
    WARMUP.run(main)
