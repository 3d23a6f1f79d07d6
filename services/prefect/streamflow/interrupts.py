"""Signals: Ctrl-C and SIGTERM (timeout, systemd, docker stop) stop a run in one line
and a known exit code, whatever it was doing, and never cut a short write in two.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
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


class PublishedThenInterrupted(KeyboardInterrupt):
    """A signal that stopped the run once its month had committed: while the run was
    being recorded, or while its Data Docs were being built."""

    def __init__(self, stopped_by: BaseException | None = None) -> None:
        super().__init__()  # no arguments kept: it unpickles (Prefect may store it)
        self.signum = signal.SIGINT if stopped_by is None else stopped_by_signal(stopped_by)


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
    if isinstance(exc, PublishedThenInterrupted):
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


# The signals of the run in progress, as their handlers saw them (signals_noted).
_NOTED: list[int] = []


@contextmanager
def signals_noted() -> Iterator[None]:
    """SIGINT and SIGTERM handled as before during the block, and noted: a handler that
    raises while the main thread runs a finalizer (a ``__del__``, a weakref callback,
    the garbage collector) has its exception swallowed by Python ("Exception ignored
    in ..."). A SIGTERM once went that way, and the run published its month and exited 0
    (a CI flake). ``stop_if_signalled`` then stops the run at its next checkpoint.
    Main thread only, as handlers are.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _NOTED.clear()
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s, handler in before.items():
        if callable(handler):
            signal.signal(s, _noting(handler))
    try:
        yield
    finally:
        for s, handler in before.items():
            if callable(handler):
                signal.signal(s, handler)
        _NOTED.clear()


def _noting(handler: Callable[[int, Any], Any]) -> Callable[[int, Any], Any]:
    def note_then_handle(signum: int, frame: Any) -> Any:
        _NOTED.append(signum)
        return handler(signum, frame)

    return note_then_handle


def stop_if_signalled() -> None:
    """Raise the stop of a signal noted during the run (``signals_noted``): one whose
    handler's exception was swallowed. A signal handled as it should be never lets the
    run get this far."""
    if _NOTED:
        raise Terminated if _NOTED[0] == signal.SIGTERM else KeyboardInterrupt
