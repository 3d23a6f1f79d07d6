"""What a run tells people: the run summary, and the Prefect artifacts built from it."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .errors import one_line as escaped
from .outcomes import SuiteOutcome
from .publishing import TableStats


@dataclass
class RunSummary:
    seed_dir: str
    as_of: str
    mode: str
    status: str = "running"
    run_id: int | None = None
    replacing: bool = False
    tables: list[TableStats] = field(default_factory=list)
    rows_read: dict[str, int] = field(default_factory=dict)
    suites: list[SuiteOutcome] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    data_docs: str | None = None
    error: str | None = None
    # A failed run whose month did not commit: what it left, in the ledger's words
    # ("nothing was published"), for the CLI's last line if a signal stops it.
    stopped_outcome: str | None = None

    @property
    def duration(self) -> float:
        return round(sum(self.timings.values()), 3)

    def table_rows(self) -> list[dict]:
        suites = {s.table: s for s in self.suites}
        stats = {t.table: t for t in self.tables}
        rows = []
        for table, read in self.rows_read.items() or {t.table: t.read for t in self.tables}.items():
            t = stats.get(table)
            s = suites.get(table)
            # "-": nothing published (a failed run), or nothing compared (a backfill's
            # unchanged and absent): not a count of 0
            rows.append(
                {
                    "table": table,
                    "rows read": read,
                    "inserted": t.inserted if t else "-",
                    "updated": t.updated if t else "-",
                    "unchanged": _known(t.unchanged) if t else "-",
                    "absent, kept live": _known(t.absent) if t else "-",
                    "snapshot rows written": (  # "-" for users too: it has no history
                        (t.snapshot_inserted + t.snapshot_updated)
                        if t and t.snapshot_table
                        else "-"
                    ),
                    "expectations passed": s.passed if s else "-",
                    "expectations failed": s.failed if s else "-",
                }
            )
        return rows

    def one_line(self) -> str:
        if self.status == "noop":
            return (
                f"{self.seed_dir} as_of {self.as_of}: already published from the same files; "
                "nothing to do"
            )
        history_lines = [
            f"{t.snapshot_table} +{t.snapshot_inserted} ~{t.snapshot_updated}"
            + (f" -{t.snapshot_removed}" if t.snapshot_removed else "")
            for t in self.tables
            if t.snapshot_table
        ]
        if self.mode == "backfill":  # what was written: history, and the live rows of
            # the users no later month lists, if any
            live = [
                f"{t.table} +{t.inserted} ~{t.updated}"
                for t in self.tables
                if t.inserted or t.updated
            ]
            changes = ", ".join(history_lines) + (f"; live: {', '.join(live)}" if live else "")
        else:
            changes = ", ".join(
                f"{t.table} +{t.inserted} ~{t.updated} ={t.unchanged}"
                + (f" ({t.absent} absent, kept)" if t.absent else "")
                for t in self.tables
            )
            if self.replacing:  # a replaced month's history is rewritten row by row
                changes += f"; history: {', '.join(history_lines)}"
        what = "history (backfill)" if self.mode == "backfill" else "live + history"
        verb = "replaced" if self.replacing else "published"
        return (
            f"{self.seed_dir} as_of {self.as_of}: {verb} {what} in {self.duration:.1f}s [{changes}]"
        )

    def markdown(self) -> str:
        verdict = {
            "succeeded": "✅ published",
            "noop": "✅ no-op (same files)",
            "failed": "❌ failed",
        }
        lines = [
            f"# StreamFlow ingest — {self.as_of}",
            "",
            "| | |",
            "|---|---|",
            f"| month folder | {_code(str(self.seed_dir))} |",
            f"| as_of | {self.as_of} |",
            f"| mode | {self.mode}{' (replace)' if self.replacing else ''} |",
            f"| verdict | {verdict.get(self.status, self.status)} |",
            f"| duration | {self.duration:.2f} s |",
            f"| ledger run_id | {self.run_id} |",
        ]
        if self.data_docs:
            lines.append(f"| GX Data Docs | {_code(str(self.data_docs))} |")
        if self.error:
            fence = "`" * max(3, _longest_backtick_run(self.error) + 1)
            lines += ["", "## Error", "", f"{fence}\n{self.error}\n{fence}"]
        if self.timings:
            lines += ["", "## Timings (s)", "", "| step | seconds |", "|---|---|"]
            lines += [f"| {k} | {v:.3f} |" for k, v in self.timings.items()]
        return "\n".join(lines)


class Stopwatch:
    """``with clock("step"):`` adds the step's wall time to a timings dict (nestable)."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            # Added, not set: an interrupt's clean-up may time the rest of a step.
            took = time.perf_counter() - start
            self.timings[step] = round(self.timings.get(step, 0.0) + took, 3)


# Text from outside (a folder's name, an error quoting a file's cell) must stay code in
# the artifact: a backtick in it would end the span or the block, and what follows
# would be rendered (an image fetched from anywhere, a link).
def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def _code(text: str) -> str:
    """``text`` as an inline code span inside a table cell."""
    fence = "`" * (_longest_backtick_run(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    cell = escaped(text).replace("|", "\\|")  # a pipe ends the cell even in code
    return f"{fence}{pad}{cell}{pad}{fence}"


def publish_artifacts(summary: RunSummary) -> None:
    """Attach the summary to the current Prefect flow run (no-op outside one).

    Best effort: the ledger is the record. An API that stopped answering mid-run made
    a published month's run end in the artifact's ConnectError (exit 1), and a failed
    month's error give way to it."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.context import FlowRunContext
    from prefect.logging import get_run_logger

    if FlowRunContext.get() is None:
        return
    key = f"ingest-{summary.as_of}"
    try:
        create_markdown_artifact(
            key=f"{key}-summary", markdown=summary.markdown(), description="Month, as_of, verdict"
        )
        rows = summary.table_rows()
        if rows:
            create_table_artifact(
                key=f"{key}-tables", table=rows, description="Per table: rows and expectations"
            )
    except Exception as exc:
        get_run_logger().warning(
            "the run's artifacts were not published (Prefect API: %s); ingest_runs has the run",
            " ".join(str(exc).split()) or type(exc).__name__,
        )


def _known(count: int | None) -> int | str:
    return "-" if count is None else count
