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
from contextlib import suppress
from datetime import date
from pathlib import Path

import psycopg

# The temporary local Prefect server (no PREFECT_API_URL) is a private one: no
# telemetry from it, whose failed inserts clutter stderr.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

if __name__ == "__main__":
    from streamflow.errors import STOPPED, InputError

    def _stopped_while_starting(signum: int, frame: object) -> None:
        # Ctrl-C or SIGTERM while Prefect and the flow's modules import: one line, not
        # an import traceback. Nothing has started that needs stopping: the API server
        # dies with this process, the GX process when its stdin closes.
        line, code = STOPPED[signum]
        print(line, file=sys.stderr)
        os._exit(code)

    for _signal in STOPPED:
        signal.signal(_signal, _stopped_while_starting)

    from streamflow.settings import check_prefect_settings

    try:
        check_prefect_settings()
    except InputError as exc:
        print(f"ingest failed: {exc}", file=sys.stderr)
        sys.exit(1)
    # An unchanged month needs neither Prefect nor GX: answer it before importing them.
    from streamflow.rerun import exit_if_unchanged

    exit_if_unchanged(sys.argv[1:])
    # Otherwise start the API server and the GX process now: they start up while
    # this process imports Prefect (streamflow/warmup.py says what that saves).
    from streamflow.warmup import warm_up

    WARMUP = warm_up(sys.argv[1:])

import prefect.runtime  # noqa: E402
from prefect import Task, flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.client.schemas.objects import State, TaskRun  # noqa: E402
from prefect.exceptions import TerminationSignal  # noqa: E402
from prefect.futures import PrefectFuture  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402
from streamflow import (  # noqa: E402
    db,
    errors,
    fingerprints,
    ledger,
    loading,
    outcomes,
    publishing,
    rerun,
    validation,
)
from streamflow.embedded import resolve_database_url  # noqa: E402
from streamflow.errors import (  # noqa: E402
    HistoryIncomplete,
    IngestError,
    MonthConflict,
    NotPublished,
    PublishedThenInterrupted,
    Terminated,
    ValidationFailed,
    WithoutTraceback,
)
from streamflow.inputs import (  # noqa: E402
    allow_gap_wanted,
    check_run,
    cli_parser,
    replace_wanted,
    text_path,
)
from streamflow.registry import BY_NAME  # noqa: E402
from streamflow.reporting import RunSummary, Stopwatch, publish_artifacts  # noqa: E402
from streamflow.rerun import Mode  # noqa: E402
from streamflow.served import DEPLOYMENT_NAME, FLOW_NAME  # noqa: E402
from streamflow.settings import load_settings  # noqa: E402
from streamflow.verdict import Rejected, Verdict  # noqa: E402

# A failed month is reported in one line; Prefect's run loggers (terminal and UI) would
# add the traceback of each failed task and of the flow: ~90 lines for one bad value.
for _run_logger in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_run_logger).addFilter(WithoutTraceback(explained=db.explain_failure))


def _only_connection_errors(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry a lost connection or a deadlock; never bad data or failed expectations."""
    try:
        state.result()
    except BaseException as exc:
        return db.worth_retrying(exc)
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
            staged = loading.stage_file(conn, BY_NAME[table], Path(path), hashed, lock_holder)
        except psycopg.errors.QueryCanceled:
            if stop.rejected:
                raise stopped from None
            raise
    get_run_logger().info("%s: %d rows staged", Path(path).name, staged.rows)
    return staged


@task(name="validate_with_ge", cache_policy=NO_CACHE)
def validate_with_ge(
    suites: validation.SuitesProcess, files: dict[str, Path], as_of: date
) -> list[outcomes.SuiteOutcome]:
    """Run the six GX suites inside PostgreSQL; raise ValidationFailed on any failure."""
    found, site = suites.run(as_of)
    outcomes.locate_duplicates(found, files)
    logger = get_run_logger()
    for suite in found:
        logger.info("suite %s: %d passed, %d failed", suite.table, suite.passed, suite.failed)
    if site:
        logger.info("GX Data Docs: %s", site)
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

            def lock_still_held() -> None:
                db.check_writer_lock(conn, lock_holder)

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
    except (Rejected, psycopg.errors.QueryCanceled) as exc:  # the month was refused
        if not verdict.rejected:
            raise
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


def _finish_run(control: psycopg.Connection, url: str, run_id: int, **outcome: object) -> None:
    """ledger.finish_run. If the control connection is gone (a server restart, a
    terminated session), once more, at once, on a new one: the row would otherwise stay
    "running" until the next run marks it abandoned, without the reason the terminal
    gave. If that fails too: a warning, and the run's own outcome stands.

    A signal during the write waits for it (a second Ctrl-C, or timeout's SIGTERM to the
    group, left the row "running" with no error), then acts.
    """
    try:
        with errors.signals_deferred():
            ledger.finish_run(control, run_id, **outcome)  # type: ignore[arg-type]
        return
    except psycopg.Error as exc:
        if not db.connection_lost(exc):
            raise
        lost = exc
    with suppress(psycopg.Error), db.connect(url, autocommit=True) as again:
        with errors.signals_deferred():
            ledger.finish_run(again, run_id, **outcome)  # type: ignore[arg-type]
        return
    get_run_logger().warning(
        "the run's %s outcome could not be recorded in ingest_runs: %s",
        outcome["status"],
        errors.first_line(lost),
    )


# A run named by its month in the UI's list (Prefect's default is a random two words).
@flow(
    name=FLOW_NAME,
    flow_run_name="ingest-{as_of}",
    task_runner=ThreadPoolTaskRunner(max_workers=2),
)
def ingest_month(seed_dir: str, as_of: str, replace: bool = False, allow_gap: bool = False) -> dict:
    """Ingest one month folder as of ``as_of``: all of it, validated, or nothing.

    Args:
        seed_dir: The month's folder, holding users.csv, subscriptions.csv,
            usage_agg_30d.csv, payments_agg_90d.csv, support_agg_90d.csv and labels.csv.
        as_of: The month's last day, YYYY-MM-DD: its snapshots are what was known then.
        replace: Publish these files over an as_of published from other files, or
            publish files already published for another as_of.
        allow_gap: Accept a new latest month more than one month after the latest
            published one.
    """
    settings = load_settings()
    as_of_date, files = check_run(seed_dir, as_of, settings)
    url = resolve_database_url(settings)
    summary = RunSummary(seed_dir=seed_dir, as_of=as_of_date.isoformat(), mode="?")
    LAST_RUN[:] = [summary]  # the CLI's word on the run if Prefect's API goes away
    clock = Stopwatch(summary.timings)
    with (
        db.connect(url, autocommit=True) as control,
        db.writer_lock(control, settings.lock_wait_seconds, get_run_logger().info),
    ):
        lock_holder = control.info.backend_pid  # checked before every commit of the run
        with clock("schema"):
            db.ensure_schema(control)
            ledger.abandon_stale_runs(control)
        prints, fingerprint = rerun.fingerprint_files(control, as_of_date, files, summary.timings)
        mode = _open_run(control, summary, as_of_date, prints, fingerprint, replace, allow_gap)
        if mode is Mode.NOOP:
            ledger.finish_run(control, summary.run_id, status="noop", timings=summary.timings)
        else:
            verdict = Verdict()
            stop_staging = Verdict()  # rejected by a signal only: a bad file lets the others finish
            stopped = False  # by a signal
            suites: validation.SuitesProcess | None = None
            staging: list[PrefectFuture] = []
            published: PrefectFuture | None = None
            try:
                for table, other in ledger.files_published_elsewhere(control, as_of_date, prints):
                    name = BY_NAME[table].file_name
                    get_run_logger().warning(
                        "%s is byte for byte the %s published as of %s: a stale export?",
                        name,
                        name,
                        other,
                    )
                # GX has imported and built its suites meanwhile (or does it while the
                # month is being staged); it adds the staging tables during the COPYs.
                suites = validation.SuitesProcess.take(url, settings.gx_docs_dir)
                suites.connect()
                with clock("upsert_csv"):
                    # Two COPY streams at once: one per core of a small machine.
                    hashed = {p.table: p.as_json() for p in prints}
                    staging = [
                        upsert_csv.submit(url, t, str(p), hashed[t], lock_holder, stop_staging)
                        for t, p in files.items()
                    ]
                    for staged in (future.result() for future in staging):
                        summary.rows_read[staged.table] = staged.rows
                # Publishing and validation side by side; the verdict decides the commit.
                # The ledger's timings stay additive: snapshot_month is what publishing
                # adds after validation ends (its own work is logged by the task).
                published = snapshot_month.submit(
                    url,
                    as_of_date,
                    summary.run_id,
                    fingerprint,
                    newest=mode is Mode.PUBLISH,
                    verdict=verdict,
                    lock_holder=lock_holder,
                )
                with verdict.deciding(then=published.wait), clock("validate_with_ge"):
                    summary.suites = validate_with_ge(suites, files, as_of_date)
                    summary.data_docs = str(settings.gx_docs_dir / "index.html")
                with clock("snapshot_month"):
                    summary.tables = published.result()
                summary.status = "succeeded"
                # Before the wait for the Data Docs: an interrupt then leaves the
                # published month's run with its counts and timings.
                _record_success(control, url, summary)
            except BaseException as exc:
                stopped = errors.is_stop(exc)
                _settle_failed_run(
                    control, url, summary, exc, verdict, stop_staging, staging, published, clock
                )
                raise
            finally:
                if suites is not None:
                    _end_suites(suites, summary, stopped=stopped)
            try:
                loading.empty_staging(control)
            except psycopg.Error as exc:  # the month is published: only disk is at stake
                get_run_logger().warning("staging not emptied: %s", errors.first_line(exc))
    publish_artifacts(summary)
    get_run_logger().info(summary.one_line())
    return {
        "status": summary.status,
        "mode": summary.mode,
        "run_id": summary.run_id,
        "line": summary.one_line(),
        "data_docs": summary.data_docs,
    }


def _open_run(
    control: psycopg.Connection,
    summary: RunSummary,
    as_of: date,
    prints: list[fingerprints.FileFingerprint],
    fingerprint: str,
    replace: bool,
    allow_gap: bool,
) -> Mode:
    """Decide what the month is (new, backfill, replacement, no-op) and start its run in
    the ledger. A refusal is a decision too: the ledger keeps it, then it is raised."""
    try:
        mode, summary.replacing = rerun.decide_mode(
            control, as_of, prints, replace=replace, allow_gap=allow_gap
        )
    except (MonthConflict, HistoryIncomplete) as exc:
        summary.mode, summary.status, summary.error = "refused", "failed", str(exc)
        summary.run_id = ledger.record_refusal(
            control,
            as_of=as_of,
            seed_dir=summary.seed_dir,
            fingerprint=fingerprint,
            files=prints,
            timings=summary.timings,
            error=summary.error,
            flow_run_id=prefect.runtime.flow_run.id,
        )
        publish_artifacts(summary)  # the UI's run names its ledger row, as every run's does
        raise
    summary.mode = mode.value
    summary.status = "noop" if mode is Mode.NOOP else "running"
    summary.run_id = ledger.start_run(
        control,
        as_of=as_of,
        seed_dir=summary.seed_dir,
        status=summary.status,
        mode=mode.value + (" (replace)" if summary.replacing else ""),
        fingerprint=fingerprint,
        files=prints,
        flow_run_id=prefect.runtime.flow_run.id,  # None when the flow body runs alone
    )
    return mode


def _in_words(exc: BaseException) -> str:
    """One line for people on an error: the CLI's last line and the ledger's error alike
    (the ledger had a repr, "ValueError('...\\n...')")."""
    if isinstance(exc, IngestError):
        return str(exc)
    explained = db.explain_failure(exc)
    if explained is not None:
        return explained
    return f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())}"


def _settle_failed_run(
    control: psycopg.Connection,
    url: str,
    summary: RunSummary,
    exc: BaseException,
    verdict: Verdict,
    stop_staging: Verdict,
    staging: list[PrefectFuture],
    published: PrefectFuture | None,
    clock: Stopwatch,
) -> None:
    """Refuse the month of a run that raised ``exc``, and record the run.

    Recorded first (a second signal, or docker stop's SIGKILL, may come soon), then the
    COPYs still running are waited for while the run holds the writer lock: they check
    it before they commit, and blamed a network cut once it was gone. A signal, first
    or at any point here, cancels them instead (one may be waiting for a reader's lock).
    A signal after validation passed does not stop the publisher, which commits: the
    run is then recorded whole, and PublishedThenInterrupted raised in place of ``exc``.
    """
    stopped = errors.is_stop(exc)
    verdict.reject_for(exc)
    try:
        if stopped:
            stop_staging.reject_for(exc)
        publish_error = None
        if stopped and not verdict.rejected:
            with clock("snapshot_month"):
                publish_error = _publishing_error(published, summary)
            if publish_error is None:
                summary.status = "succeeded"
                _record_success(control, url, summary)
                publish_artifacts(summary)
                raise PublishedThenInterrupted(exc) from None
        _record_failure(control, url, summary, exc, publish_error)
        for future in staging:
            future.wait()
    except BaseException as late:
        if errors.is_stop(late):
            stop_staging.reject_for(late)
            for future in staging:
                future.wait(timeout=5)  # cancelled: they end at once
        raise


def _publishing_error(published: PrefectFuture | None, summary: RunSummary) -> BaseException | None:
    """None once the publisher of an accepted month has committed it (its counts go to
    ``summary``), else why it did not."""
    if published is None:
        return RuntimeError("the publishing task never started")
    try:
        summary.tables = published.result()
    except Exception as exc:  # its own failure (a lost writer lock): the month did not land
        return exc
    return None


def _record_failure(
    control: psycopg.Connection,
    url: str,
    summary: RunSummary,
    exc: BaseException,
    publish_error: BaseException | None = None,
) -> None:
    """The failed run in the ledger, in the run's logs and in its artifact.

    ``publish_error``: an interrupted run's month had passed validation, and this is
    why its publisher did not commit it.
    """
    summary.status = "failed"
    if isinstance(exc, ValidationFailed):  # the artifact's per-table expectation counts
        summary.suites = exc.suites
    if errors.is_stop(exc):  # words, not repr()
        by_sigterm = errors.stopped_by_signal(exc) == signal.SIGTERM
        summary.error = f"interrupted ({'SIGTERM' if by_sigterm else 'Ctrl-C or SIGINT'}); " + (
            f"the month had passed validation, but publishing failed: {_in_words(publish_error)}; "
            "nothing was published"
            if publish_error is not None
            else "nothing was published"
        )
    else:
        summary.error = _in_words(exc)
    # The same one line the CLI prints, for runs started from the UI.
    get_run_logger().error("ingest failed: %s", summary.error)
    _finish_run(
        control,
        url,
        summary.run_id,
        status="failed",
        validation=getattr(exc, "failures", None),
        timings=summary.timings,
        error=summary.error,
    )
    publish_artifacts(summary)


def _end_suites(suites: validation.SuitesProcess, summary: RunSummary, *, stopped: bool) -> None:
    """The GX process's end. It builds the Data Docs after its verdict, alongside the
    commit: they are waited for, unless a signal stopped the run (a SIGTERM reaches this
    process only, and the child would go on validating): then it is killed."""
    if stopped:
        suites.close()
        return
    try:
        docs_error = suites.finish()
    except KeyboardInterrupt as exc:
        suites.close()
        if summary.status == "succeeded":  # the CLI says so rather than "interrupted"
            publish_artifacts(summary)
            raise PublishedThenInterrupted(exc) from None
        raise
    if docs_error:
        get_run_logger().warning("GX Data Docs not built: %s", docs_error)


def _record_success(control: psycopg.Connection, url: str, summary: RunSummary) -> None:
    """The run's counts and timings in the ledger. The commit already marked it
    succeeded: a connection lost now loses only these."""
    _finish_run(
        control,
        url,
        summary.run_id,
        status="succeeded",
        table_stats=[t.as_dict() for t in summary.tables],
        validation=[
            {"table": s.table, "passed": s.passed, "failed": s.failed} for s in summary.suites
        ],
        timings=summary.timings,
    )


_RUN_FLAGS = ("--seed-dir", "--as-of", "--replace", "--allow-gap")
LAST_RUN: list[RunSummary] = []


def _without_the_api(exc: Exception) -> tuple[int, str | None, str] | None:
    """The run's own outcome when Prefect's API stopped answering during it: (exit code,
    stdout line, stderr line), or None for another error.

    Prefect's client retries for minutes, then the flow call raises its ConnectError in
    place of the run's outcome, though the ledger has it: a published month read as
    'unexpected ConnectError' (exit 1), a failed one lost its reason.
    """
    import httpx

    if not isinstance(exc, httpx.TransportError):
        return None
    api = os.environ.get("PREFECT_API_URL") or "the CLI's temporary server"
    lost = (
        f"Prefect's API ({api}) stopped answering during the run ({errors.first_line(exc)}): "
        "the run's state in the Prefect UI is not its outcome, ingest_runs has it"
    )
    summary = LAST_RUN[0] if LAST_RUN else None
    if summary is not None and summary.status in ("succeeded", "noop"):
        return 0, summary.one_line(), f"warning: {lost}"
    if summary is not None and summary.status == "failed" and summary.error:
        return 1, None, f"ingest failed: {summary.error} ({lost})"
    return 1, None, f"ingest failed: {lost}"


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser(__doc__)
    args = parser.parse_args(argv)
    if args.command == "serve":
        given = [
            a for a in (sys.argv[1:] if argv is None else argv) if a.split("=")[0] in _RUN_FLAGS
        ]
        if given:  # they would be ignored without a word: each run brings its own
            parser.error(
                f"serve takes no {', '.join(given)}: a deployment run gets seed_dir, as_of, "
                "replace and allow_gap as its parameters"
            )
        ingest_month.serve(name=DEPLOYMENT_NAME)
        return 0
    missing = [
        f"{env} (or {flag})"
        for env, flag, value in (
            ("SEED_DIR", "--seed-dir", args.seed_dir),
            ("AS_OF", "--as-of", args.as_of),
        )
        if not value
    ]
    if missing:  # a usage error, like argparse's own: exit code 2
        print(f"ingest failed: set {' and '.join(missing)}", file=sys.stderr)
        return 2
    try:
        result = ingest_month(
            seed_dir=text_path(args.seed_dir),
            as_of=args.as_of,
            replace=replace_wanted(args),
            allow_gap=allow_gap_wanted(args),
        )
    except IngestError as exc:
        print(f"ingest failed: {exc}", file=sys.stderr)
        return 1
    except TerminationSignal:  # Prefect's SIGTERM in a flow run: stopped as on Ctrl-C
        raise Terminated from None
    except Exception as exc:  # still one line for people; the traceback is in the run logs
        if (lost := _without_the_api(exc)) is not None:
            code, out, err = lost
            if out:
                print(out)
            print(err, file=sys.stderr)
            return code
        if isinstance(exc, RuntimeError) and str(exc).startswith("Failed to reach API"):
            # Prefect's words name the address, not where it came from, nor that an HTTP
            # error (a URL without /api) reads the same.
            print(
                f"ingest failed: {exc} (PREFECT_API_URL, or the CLI's temporary server): is "
                "that server up, and does the URL end in /api?",
                file=sys.stderr,
            )
            return 1
        print(f"ingest failed: {_in_words(exc)}", file=sys.stderr)
        return 1
    print(result["line"])
    if result.get("data_docs"):
        print(f"GX Data Docs: {result['data_docs']}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt from here
    signal.signal(signal.SIGTERM, errors.raise_terminated)  # and Terminated, its kin
    WARMUP.run(main)
