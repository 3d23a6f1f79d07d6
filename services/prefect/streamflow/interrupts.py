"""Signals: Ctrl-C and SIGTERM (timeout, systemd, docker stop) stop a run in one line
and a known exit code, whatever it was doing, and never cut a short write in two.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

# The CLI's last line and exit code when a signal stops it (128 + the signal's number).
STOPPED = {
    signal.SIGINT: ("ingest interrupted", 130),
    signal.SIGTERM: ("ingest terminated (SIGTERM)", 143),
}


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, systemd, docker stop): the run stops as on Ctrl-C, in one line."""


def raise_terminated(signum: int, frame: object) -> NoReturn:
    """A SIGTERM handler: ``signal.signal(signal.SIGTERM, raise_terminated)``."""
    raise Terminated


class StopSaid(KeyboardInterrupt):
    """A signal's stop with the CLI's words on what the run left (``line``)."""

    def __init__(self, stopped_by: BaseException | None = None) -> None:
        super().__init__()  # no arguments kept: it unpickles (Prefect may store it)
        self.signum = signal.SIGINT if stopped_by is None else stopped_by_signal(stopped_by)

    def line(self) -> tuple[str, int]:
        """The CLI's last line and exit code."""
        line, code = STOPPED.get(self.signum, STOPPED[signal.SIGINT])
        return line + self.said(), code

    def said(self) -> str:
        return ""


class PublishedThenInterrupted(StopSaid):
    """A signal that stopped the run once its month had committed: while the run was
    being recorded, or while its Data Docs were being built (``docs_built`` False), or
    later (None: whether they were is not known)."""

    def __init__(
        self, stopped_by: BaseException | None = None, docs_built: bool | None = False
    ) -> None:
        super().__init__(stopped_by)
        self.docs_built = docs_built

    def said(self) -> str:
        unbuilt = " (its Data Docs were not built)" if self.docs_built is False else ""
        return " once the month was published" + unbuilt


class StoppedUnpublished(StopSaid):
    """A signal that stopped a run whose month did not commit, once the run was
    recorded failed: the CLI's line says what the ledger says ("nothing was
    published"); "ingest interrupted" alone left people to look it up."""

    def __init__(
        self, stopped_by: BaseException | None = None, outcome: str = "nothing was published"
    ) -> None:
        super().__init__(stopped_by)
        self.outcome = outcome

    def said(self) -> str:
        return f": {self.outcome}"


def is_stop(exc: BaseException) -> bool:
    """A signal's interrupt: KeyboardInterrupt and its kin, or Prefect's
    TerminationSignal (a BaseException carrying ``signal``; not imported: this module
    loads before Prefect)."""
    return isinstance(exc, KeyboardInterrupt) or (
        not isinstance(exc, Exception) and isinstance(getattr(exc, "signal", None), int)
    )


def stopped_by_signal(exc: BaseException) -> signal.Signals:
    """The signal behind an interrupt: Terminated is SIGTERM, Prefect's TerminationSignal
    carries its own (``signal``), anything else is SIGINT."""
    if isinstance(exc, StopSaid):
        return exc.signum
    if isinstance(exc, Terminated):
        return signal.SIGTERM
    carried = getattr(exc, "signal", None)  # not imported: this module loads before Prefect
    return signal.Signals(carried) if isinstance(carried, int) else signal.SIGINT


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM held back during the block, then acted on: a second signal
    (timeout and docker stop signal the group too; people press Ctrl-C twice) must not
    cut a short write in two. For short blocks only: the signal waits for the block.
    Handlers can only be set from the main thread: elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in before:
        signal.signal(s, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if came:
            signal.raise_signal(came[0])  # the handler of before runs now


# The interrupts Python swallowed during the run in progress (signals_noted).
_SWALLOWED: list[BaseException] = []


@contextmanager
def signals_noted() -> Iterator[None]:
    """A signal handler's exception raised while the main thread runs a finalizer (a
    ``__del__``, a weakref callback, the garbage collector) is swallowed by Python
    ("Exception ignored in ...", through ``sys.unraisablehook``). A SIGTERM once went
    that way, and the run published its month and exited 0 (a CI flake). During the
    block such an interrupt is kept, and ``stop_if_signalled`` raises it at the run's
    next checkpoint. The handlers themselves are left alone: Prefect acknowledges a
    runner's cancel only while its own SIGTERM handler is the one installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _SWALLOWED.clear()
    before = sys.unraisablehook

    def keep_interrupts(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if (
            exc is not None
            and is_stop(exc)
            and threading.current_thread() is threading.main_thread()
        ):
            _SWALLOWED.append(exc)
        before(unraisable)

    sys.unraisablehook = keep_interrupts
    try:
        yield
    finally:
        if sys.unraisablehook is keep_interrupts:
            sys.unraisablehook = before
        _SWALLOWED.clear()


def stop_if_signalled() -> None:
    """Raise the interrupt Python swallowed during the run (``signals_noted``), as its
    handler raised it: Prefect's TerminationSignal stays one (a runner's cancel)."""
    if _SWALLOWED:
        raise _SWALLOWED[0].with_traceback(None)
