"""Errors meant for people: each names the file, the row or column, and what was expected."""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path


def one_line(text: str) -> str:
    """``text`` with each character a terminal or a log would act on or not show (line
    ends, escapes, zero-width and direction marks) written as its escape, ``\\n``.

    Messages quote values from the month's files (a user_id, a header, PostgreSQL's
    quote of a bad cell): a quoted newline must not start a line of its own in the log,
    where it could pass for one of the pipeline's ("… INFO | Flow run succeeded").
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def first_few(shown: list[str], limit: int = 5) -> str:
    """``shown`` joined, cut after ``limit`` with how many more: a header of 3,000
    unknown columns made a 47,000-character line."""
    more = f" (+{len(shown) - limit} more)" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


class IngestError(Exception):
    """A failure the operator can act on; ``str(err)`` is one line, printed as is."""

    def __init__(self, message: str = "", *args: object) -> None:
        super().__init__(one_line(message), *args)


def clipped(text: str, keep: int = 40) -> str:
    """``text``, or its start and its length: a 100 KB cell must not become the line."""
    return text if len(text) <= keep + 20 else f"{text[:keep]}... ({len(text)} characters)"


# A long quoted value in PostgreSQL's message (it quotes the bad value whole, wherever
# the message puts it); quoted names are short. A value that holds a quote itself is
# left whole: the pattern cannot tell where it ends.
_QUOTED = re.compile(r'"([^"]{61,})"')


def clipped_quotes(message: str) -> str:
    """``message`` with each long quoted value clipped, and the words around it kept."""
    return _QUOTED.sub(lambda m: f'"{clipped(m.group(1))}"', message)


def first_line(exc: BaseException) -> str:
    """The first line of an error's message: libpq's run on with hints and details."""
    lines = str(exc).strip().splitlines()
    return one_line(lines[0]) if lines else type(exc).__name__


class WithoutTraceback(logging.Filter):
    """Drops the traceback from a log record of an ``IngestError``, or of an error
    ``explained`` words for people (the database's: unreachable, refused login...).

    Prefect logs every task and flow failure with its traceback, ~30 lines each; an
    ``IngestError``'s message already names the file, row or column, and the stack
    says nothing more to the person reading it. Any other exception is a bug and
    keeps its traceback.
    """

    def __init__(self, explained: Callable[[BaseException], object] | None = None) -> None:
        super().__init__()
        self._explained = explained

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and _for_people(exc, self._explained):
            record.exc_info = None
            record.exc_text = None
        return True


class SaidOnce(logging.Filter):
    """Writes the reason of a failure in full once per flow run; Prefect's later records
    of the same failure get ``(see above)`` in its place.

    Prefect repeats an error in each record it makes of it (the task failed, the task
    finished Failed, the flow caught it, the flow finished Failed): one bad value was
    printed five times, each up to a line long. The first record keeps it, in the
    terminal and in the UI, which shows a flow run's records in one list.
    """

    _RUNS_KEPT = 64  # a bound, should one process run many flows
    _ENGINES = frozenset({"task_engine", "flow_engine"})  # Prefect's modules that log them

    def __init__(self, explained: Callable[[BaseException], object] | None = None) -> None:
        super().__init__()
        self._explained = explained
        self._said: OrderedDict[object, list[str]] = OrderedDict()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        # A filter's error is not caught by logging (a handler's is): it would raise in
        # Prefect's engine, mid state change. The words are formed outside the lock.
        try:
            self._shorten(record)
        except Exception:
            pass
        return True

    def _shorten(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        run = getattr(record, "flow_run_id", None)
        reason = str(exc) if exc is not None and _for_people(exc, self._explained) else ""
        with self._lock:
            said = list(self._said.get(run, []))
            if reason and reason not in said:
                self._said[run] = [*said, reason]
                self._said.move_to_end(run)
                while len(self._said) > self._RUNS_KEPT:
                    self._said.popitem(last=False)
        if record.module not in self._ENGINES:  # our own lines keep their words
            return
        message = record.getMessage()
        shortened = message
        for earlier in said:  # this record's own reason, if new, stays whole
            for written in (earlier, repr(earlier)[1:-1]):
                shortened = shortened.replace(written, "(see above)")
        if shortened != message:
            record.msg, record.args = shortened, ()


def _for_people(exc: BaseException, explained: Callable[[BaseException], object] | None) -> bool:
    return isinstance(exc, IngestError) or (explained is not None and explained(exc) is not None)


class InputError(IngestError):
    """The month folder, a file, or a run parameter is wrong."""


def unreadable(path: Path, exc: OSError) -> InputError:
    """A month file the system would not let us read, named."""
    return InputError(f"{path.parent}: {path.name} cannot be read ({exc.strerror or exc})")


class ValidationFailed(IngestError):
    """The staged month broke at least one expectation; nothing was published."""

    def __init__(
        self, message: str, failures: list[dict] | None = None, suites: list | None = None
    ) -> None:
        super().__init__(message)
        self.failures = failures or []
        self.suites = suites or []  # every suite's outcome (outcomes.SuiteOutcome)


class MonthConflict(IngestError):
    """A rerun rule refused the month: other files for a published as_of, another as_of's
    files, or a gap after the latest month."""


class LockTimeout(IngestError):
    """Another ingestion held the lock for too long."""


class LockLost(IngestError):
    """The run's writer lock went with its control connection: another run may write."""


class NotPublished(IngestError):
    """The publishing transaction was rolled back: the month was refused (validation
    failed, or the run failed or was stopped)."""


class SchemaOutdated(IngestError):
    """The database predates this version's db/init and the login may not update it."""


class TablesNotOurs(IngestError):
    """The database has tables of the pipeline's names in another shape (the lab's own
    schema): nothing is created or changed in it."""


class HistoryIncomplete(IngestError):
    """A published month is missing from a history table (its partition detached or
    dropped by hand): no month is published on top of a history that lost one."""
