"""One run of the flow, from its ledger row to its outcome: opened, recorded, settled.

The flow (ingest_flow.py) says what a month goes through; this module says what the
run leaves behind whichever way it ends: a ledger row with its counts or its error in
words, the Prefect artifact, and the staging and publishing tasks brought to a stop.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Required, TypedDict, Unpack

import prefect.runtime
import psycopg

from . import db, diagnosis, errors, fingerprints, interrupts, ledger, rerun, validation
from .errors import (
    HistoryIncomplete,
    IngestError,
    LockLost,
    MonthConflict,
    NotPublished,
    ValidationFailed,
)
from .interrupts import PublishedThenInterrupted
from .publishing import TableStats
from .reporting import RunSummary, Stopwatch, publish_artifacts
from .rerun import Mode
from .verdict import Verdict

if TYPE_CHECKING:
    from prefect.futures import PrefectFuture

# The run in progress, for the CLI's last word when Prefect's API goes away mid-run and
# the flow call raises the client's error in place of the run's outcome.
LAST_RUN: list[RunSummary] = []


def in_words(exc: BaseException) -> str:
    """One line for people on an error: the CLI's last line and the ledger's error alike
    (the ledger had a repr, "ValueError('...\\n...')")."""
    if isinstance(exc, IngestError):
        return str(exc)
    explained = diagnosis.explain_failure(exc)
    if explained is not None:
        return explained
    return f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())}"


@contextmanager
def published_then_stopped_said(
    summary: RunSummary, log: logging.Logger | logging.LoggerAdapter
) -> Iterator[None]:
    """A signal that stops the run once its month has committed is said in the run's
    log. The CLI says it in its last line; a deployment run cancelled from the UI (a
    SIGTERM, 4-5 s after the click) showed Cancelled, and nothing said the month was in.
    """
    try:
        yield
    except BaseException as exc:
        if interrupts.is_stop(exc) and summary.status == "succeeded":
            said = exc if isinstance(exc, PublishedThenInterrupted) else None
            line, _ = (said or PublishedThenInterrupted(exc, docs_built=None)).line()
            log.warning("%s: run %s is recorded as succeeded", line, summary.run_id)
        raise


def _unpublished_because(error: str) -> str:
    """A failed run's words for the CLI's line should a signal stop it afterwards."""
    return f"nothing was published; the run had failed: {error}"


class _Outcome(TypedDict, total=False):
    """What ``ledger.finish_run`` records of a run, its keywords."""

    status: Required[str]
    table_stats: list[dict] | None
    validation: list[dict] | None
    timings: dict[str, float] | None
    error: str | None


@dataclass
class MonthRun:
    """A month's run while it holds the writer lock: its control connection, its summary
    (what the ledger, the artifact and the CLI's last line say), and the tasks it started.

    ``verdict`` decides the publisher's commit; ``stop_staging`` is rejected by a signal
    only (a bad file lets the other COPYs finish).
    """

    control: psycopg.Connection
    url: str
    summary: RunSummary
    clock: Stopwatch
    log: logging.Logger | logging.LoggerAdapter
    verdict: Verdict = field(default_factory=Verdict)
    stop_staging: Verdict = field(default_factory=Verdict)
    staging: list[PrefectFuture] = field(default_factory=list)
    published: PrefectFuture | None = None

    def open(
        self,
        as_of: date,
        prints: list[fingerprints.FileFingerprint],
        fingerprint: str,
        *,
        replace: bool,
        allow_gap: bool,
    ) -> Mode:
        """Decide what the month is (new, backfill, replacement, no-op) and start its run
        in the ledger. A refusal is a decision too: the ledger keeps it, then it is raised."""
        summary = self.summary
        try:
            mode, summary.replacing = rerun.decide_mode(
                self.control, as_of, prints, replace=replace, allow_gap=allow_gap
            )
        except (MonthConflict, HistoryIncomplete) as exc:
            summary.mode, summary.status, summary.error = "refused", "failed", str(exc)
            summary.stopped_outcome = _unpublished_because(summary.error)
            summary.run_id = ledger.record_refusal(
                self.control,
                as_of=as_of,
                seed_dir=summary.seed_dir,
                fingerprint=fingerprint,
                files=prints,
                timings=summary.timings,
                error=summary.error,
                flow_run_id=prefect.runtime.flow_run.id,
            )
            publish_artifacts(summary)  # the UI's run names its ledger row, as every run's does
            self.log.error("ingest failed: %s", summary.error)  # as any failed run's log
            raise
        summary.mode = mode.value
        summary.status = "noop" if mode is Mode.NOOP else "running"
        summary.run_id = ledger.start_run(
            self.control,
            as_of=as_of,
            seed_dir=summary.seed_dir,
            status=summary.status,
            mode=mode.value + (" (replace)" if summary.replacing else ""),
            fingerprint=fingerprint,
            files=prints,
            flow_run_id=prefect.runtime.flow_run.id,  # None when the flow body runs alone
        )
        return mode

    @property
    def run_id(self) -> int:
        """The run's ingest_runs row, which ``open`` starts (a refusal's too)."""
        if self.summary.run_id is None:
            raise RuntimeError("the run has no ledger row before open()")
        return self.summary.run_id

    def record_success(self) -> None:
        """The run's counts and timings in the ledger. The commit already marked it
        succeeded: a connection lost now loses only these."""
        summary = self.summary
        summary.status = "succeeded"
        try:
            self._finish(
                status="succeeded",
                table_stats=[t.as_dict() for t in summary.tables],
                validation=[
                    {"table": s.table, "passed": s.passed, "failed": s.failed}
                    for s in summary.suites
                ],
                timings=summary.timings,
            )
        except psycopg.Error as exc:
            # The month is published, and its run already marked succeeded with its
            # counts (by the commit): a refused write here (a revoked grant, a full
            # disk) loses only the timings and expectation counts. It made the CLI say
            # "ingest failed" (exit 1) of a published month.
            self.log.warning(
                "the published month's timings and expectation counts were not recorded "
                "in ingest_runs: %s",
                in_words(exc),
            )

    def settle_failure(self, exc: BaseException) -> None:
        """Refuse the month of a run that raised ``exc``, and record the run.

        Recorded first (a second signal, or docker stop's SIGKILL, may come soon), then
        the COPYs still running are waited for while the run holds the writer lock: they
        check it before they commit, and blamed a network cut once it was gone. A signal,
        first or at any point here, cancels them instead (one may be waiting for a
        reader's lock). A signal after validation passed does not stop the publisher,
        which commits: the run is then recorded whole, and PublishedThenInterrupted
        raised in place of ``exc``.
        """
        stopped = interrupts.is_stop(exc)
        self.verdict.reject_for(exc)
        try:
            if stopped:
                self.stop_staging.reject_for(exc)
            publish_error = None
            if stopped and not self.verdict.rejected:
                with self.clock("snapshot_month"):
                    publish_error = self._publishing_error()
                if publish_error is None:
                    self.record_success()
                    publish_artifacts(self.summary)
                    raise PublishedThenInterrupted(exc) from None
            self._record_failure(exc, publish_error)
            for future in self.staging:
                future.wait()
        except BaseException as late:
            if interrupts.is_stop(late):
                self.stop_staging.reject_for(late)
                for future in self.staging:
                    future.wait(timeout=5)  # cancelled: they end at once
            raise

    def end_suites(self, suites: validation.SuitesProcess, *, stopped: bool) -> None:
        """The GX process's end. It builds the Data Docs after its verdict, alongside the
        commit: they are waited for, unless a signal stopped the run (a SIGTERM reaches
        this process only, and the child would go on validating): then it is killed."""
        if stopped:
            suites.close()
            return
        try:
            docs_error = suites.finish()
        except KeyboardInterrupt as exc:
            suites.close()
            if self.summary.status == "succeeded":  # the CLI says so rather than "interrupted"
                publish_artifacts(self.summary)
                raise PublishedThenInterrupted(exc) from None
            raise
        if docs_error:
            self.log.warning("GX Data Docs not built: %s", docs_error)
        # Only docs this run built are named (by the CLI, the artifact): a refused
        # month's too, its failing checks with examples.
        index = None if docs_error else suites.docs_index
        self.summary.data_docs = None if index is None else str(index)

    def published_tables(self) -> list[TableStats]:
        """The publisher's counts of its month. If its task failed after its COMMIT
        returned, the month is in all the same: the run said "ingest failed" (exit 1) of
        a month the ledger listed as succeeded. The counts are then read back from the
        ledger, where the publishing transaction wrote them."""
        if self.published is None:
            raise RuntimeError("the publishing task never started")
        try:
            return self.published.result()
        except Exception as exc:
            recorded = None
            if self.verdict.committed:
                with suppress(psycopg.Error):  # unreadable: the task's own error stands
                    recorded = ledger.published_stats(self.control, self.run_id)
            if recorded is None:
                raise
            self.log.warning(
                "the month is published (its COMMIT returned), but its publishing task "
                "then failed: %s",
                in_words(exc),
            )
            return [TableStats(**t) for t in recorded]

    def _publishing_error(self) -> BaseException | None:
        """None once the publisher of an accepted month has committed it (its counts go
        to the summary), else why it did not."""
        try:
            self.summary.tables = self.published_tables()
        except Exception as exc:  # its own failure (a lost writer lock): the month did not land
            return exc
        return None

    def _record_failure(
        self, exc: BaseException, publish_error: BaseException | None = None
    ) -> None:
        """The failed run in the ledger, in the run's logs and in its artifact.

        ``publish_error``: an interrupted run's month had passed validation, and this is
        why its publisher did not commit it.
        """
        summary = self.summary
        summary.status = "failed"
        if isinstance(exc, ValidationFailed):  # the artifact's per-table expectation counts
            summary.suites = exc.suites
        # Its publisher's COMMIT returned, and its task failed after: the month is in
        # (the ledger's row stays succeeded), and no word may say otherwise.
        committed = self.verdict.committed
        if interrupts.is_stop(exc):  # words, not repr()
            by_sigterm = interrupts.stopped_by_signal(exc) == signal.SIGTERM
            by = "SIGTERM" if by_sigterm else "Ctrl-C or SIGINT"
            if committed:
                summary.error = (
                    f"interrupted ({by}) once the month was published; its publishing task "
                    f"then failed: {in_words(publish_error or exc)}"
                )
            else:
                summary.stopped_outcome = (
                    f"the month had passed validation, but publishing failed: "
                    f"{in_words(publish_error)}; nothing was published"
                    if publish_error is not None
                    else "nothing was published"
                )
                summary.error = f"interrupted ({by}); {summary.stopped_outcome}"
        else:
            summary.error = in_words(exc)
            if not committed:
                summary.stopped_outcome = _unpublished_because(summary.error)
        # The same one line the CLI prints, for runs started from the UI.
        self.log.error("ingest failed: %s", summary.error)
        try:
            self._finish(
                status="failed",
                validation=getattr(exc, "failures", None),
                timings=summary.timings,
                error=summary.error,
            )
        except psycopg.Error as unrecorded:
            # The ledger's write refused too (the same full disk): the run's own error
            # stays the one it reports. It replaced it, and the row stayed "running"
            # with no error until the next run called it abandoned (resource audit).
            self.log.warning(
                "the run's failed outcome could not be recorded in ingest_runs (run %s "
                "stays 'running' until the next run marks it abandoned): %s",
                self.run_id,
                in_words(unrecorded),
            )
        publish_artifacts(summary)

    def _finish(self, **outcome: Unpack[_Outcome]) -> None:
        """ledger.finish_run. If the control connection is gone (a server restart, a
        terminated session), once more, at once, on a new one: the row would otherwise
        stay "running" until the next run marks it abandoned, without the reason the
        terminal gave. If that fails too: a warning, and the run's own outcome stands.

        A signal during the write waits for it (a second Ctrl-C, or timeout's SIGTERM to
        the group, left the row "running" with no error), then acts.
        """
        run_id = self.run_id
        try:
            with interrupts.signals_deferred():
                ledger.finish_run(self.control, run_id, **outcome)
            return
        except psycopg.Error as exc:
            if not diagnosis.connection_lost(exc):
                raise
            lost = exc
        with suppress(psycopg.Error), db.connect(self.url, autocommit=True) as again:
            with interrupts.signals_deferred():
                ledger.finish_run(again, run_id, **outcome)
            return
        self.log.warning(
            "the run's %s outcome could not be recorded in ingest_runs: %s",
            outcome["status"],
            errors.first_line(lost),
        )


def stop_validation_if_failed(suites: validation.SuitesProcess, published: PrefectFuture) -> None:
    """A publisher stopped by the server's state (a full disk, a limit, a right missing,
    the writer lock lost) decides the run: validation is stopped rather than waited for,
    and the run fails with the publisher's error at once (the audit's full disk was
    reported once GX had finished, about 2 minutes later at 10M users). An error of the
    data itself (a duplicate key when the live key is rebuilt) waits for validation,
    which names the file, column and rows; so does the verdict's own refusal."""
    try:
        published.result()
    except NotPublished:
        return
    except Exception as exc:
        if isinstance(exc, LockLost) or diagnosis.about_the_server(exc):
            suites.stop_for(exc)
