"""The validation verdict a publishing transaction waits for before it commits.

Validation and publishing are both SQL over the staged month, on separate
connections, so they run side by side (one core each on a 2-core machine). The
publishing transaction does all of its writes, then holds them uncommitted until the
verdict: nothing unvalidated is ever visible, and a rejected month rolls back to
exactly what was there before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from .errors import ValidationFailed
from .interrupts import is_stop


class Rejected(Exception):
    """The publisher stopped: the verdict came, and it is no."""


class Verdict:
    """Set once by the flow (``accept`` or ``reject``), awaited by the publisher."""

    def __init__(self) -> None:
        self._decided = threading.Event()
        self._accepted = False
        self._on_reject: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self.waited_seconds = 0.0
        self.reason = ""
        """Why the month was refused, for the publisher's own failure message."""
        self.committed = False
        """Set by the publisher once its COMMIT returned: the month is in, whatever the
        run's later errors say (the CLI must not say "nothing was published")."""

    def accept(self) -> None:
        with self._lock:
            if not self._decided.is_set():
                self._accepted = True
                self._decided.set()

    def reject(self, reason: str = "the run failed") -> None:
        """Refuse the month (a no-op once accepted), and cancel the publisher's work."""
        with self._lock:
            if self._decided.is_set() and self._accepted:
                return
            if not self._decided.is_set():
                self.reason = reason
            # An accept cut short by an interrupt (flag set, event not) is no accept.
            self._accepted = False
            self._decided.set()
            hooks = list(self._on_reject)
        for hook in hooks:
            # A cancel that cannot be sent leaves the publisher to find the verdict
            # itself; the refusal must not fail for it.
            with suppress(Exception):
                hook()

    @contextmanager
    def deciding(self, then: Callable[[], object] = lambda: None) -> Iterator[None]:
        """Accept the month if the block ends normally; on any exception (a failed
        expectation, an interrupt) reject it, let ``then`` wait for the publisher to
        stop, and re-raise."""
        try:
            yield
        except BaseException as exc:
            self.reject_for(exc)
            then()
            raise
        self.accept()

    def reject_for(self, exc: BaseException) -> None:
        """``reject``, with the reason ``exc`` gives: an interrupt is no verdict on the
        month (the publisher must not say it failed), nor is a GX process that could
        not run."""
        if is_stop(exc):
            self.reject("the run was stopped")
        else:
            failed = isinstance(exc, ValidationFailed)
            self.reject("validation failed" if failed else "the run failed")

    def on_reject(self, hook: Callable[[], None]) -> None:
        """``hook`` runs on reject: the publisher cancels its statement in progress
        (a month's MERGEs and history inserts run tens of seconds at 1M rows)."""
        with self._lock:
            self._on_reject.append(hook)
            already = self.rejected
        if already:  # refused before the publisher got this far
            with suppress(Exception):
                hook()

    @property
    def rejected(self) -> bool:
        return self._decided.is_set() and not self._accepted

    def stop_if_rejected(self) -> None:
        """For the publisher, between statements: give up once the month is refused."""
        if self.rejected:
            raise Rejected("the month was refused while it was being written")

    def wait(self, meanwhile: Callable[[], None] | None = None, every: float = 1.0) -> bool:
        """Block until the flow decides; True if the month may be committed.

        ``meanwhile`` is called every ``every`` seconds while waiting: it raises to give
        up (the run lost its writer lock, and holding the month's locks would only
        keep the run that took it waiting).
        """
        start = time.perf_counter()
        try:
            while not self._decided.wait(every):
                if meanwhile is not None:
                    meanwhile()
        finally:
            self.waited_seconds = time.perf_counter() - start
        return self._accepted
