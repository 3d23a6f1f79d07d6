"""The writer lock: one session advisory lock for the whole pipeline, so that months
are published strictly one at a time, and the check that a run still holds it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC

import psycopg

from .db import one_row
from .errors import LockLost, LockTimeout, one_line
from .sqlfiles import queries

# One key for the whole pipeline: months are published strictly one at a time.
LOCK_KEY = 0x5F1_0E_1A  # arbitrary constant, shared by every writer


@contextmanager
def writer_lock(
    conn: psycopg.Connection,
    wait_seconds: float,
    on_wait: Callable[[str], object] | None = None,
    *,
    name_holder: bool = True,
) -> Iterator[None]:
    """Hold the pipeline's session advisory lock; wait up to ``wait_seconds`` for it.

    ``on_wait`` is told once, when the lock is taken: a run waiting up to 10 minutes
    showed 'Running' with no word in the UI. ``name_holder``: look up who holds it, for
    the words (a caller that does not show them need not wait for the lookup).
    """
    deadline = time.monotonic() + wait_seconds
    q = queries("control")
    key = {"key": LOCK_KEY}
    told = False
    while not one_row(conn.execute(q["try_writer_lock"], key))[0]:
        overdue = time.monotonic() >= deadline
        telling = on_wait is not None and not told
        who = _holder(conn) if name_holder and (overdue or telling) else ""
        if overdue:
            raise LockTimeout(
                f"another ingestion is running{who}; waited {wait_seconds:g}s "
                "for it (set LOCK_WAIT_SECONDS to wait longer)"
            )
        if on_wait is not None and telling:
            on_wait(
                f"another ingestion is running{who}: waiting for it, up to "
                f"{wait_seconds:g}s (LOCK_WAIT_SECONDS)"
            )
            told = True
        time.sleep(0.2)
    try:
        yield
    finally:
        # A connection that broke took its lock with it; its error is not the run's.
        with suppress(psycopg.Error):
            if not conn.closed:
                conn.execute(q["unlock_writer_lock"], key)


def _holder(conn: psycopg.Connection) -> str:
    """Who holds the writer lock, in words: its run when its ledger row says so (an
    operator looks that up in the ledger or the Prefect UI), and its backend pid."""
    q = queries("control")
    holder = conn.execute(q["writer_lock_holder"], {"key": LOCK_KEY}).fetchone()
    if holder is None:  # released between the two queries
        return ""
    pid, since, has_ledger = holder
    run = None
    if has_ledger and since is not None:  # since: hidden from another login without rights
        # A ledger it cannot read (an older schema, a right missing, a lock or statement
        # timeout) leaves the pid: the wait goes on, and its words must not end it.
        # Rolled back in any case: the bounds end with it, also on a connection already
        # in a transaction (a savepoint there: released, its SET LOCAL would outlive it).
        with suppress(psycopg.Error), conn.transaction(force_rollback=True):
            conn.execute(q["writer_lock_run_bounds"])
            run = conn.execute(q["writer_lock_run"], {"since": since}).fetchone()
    if run is None:
        return f" (held by backend pid {pid})"
    run_id, as_of, seed_dir, started_at, flow_run_id = run
    started = started_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    flow_run = f", flow run {flow_run_id}" if flow_run_id else ""
    return one_line(
        f" (run {run_id}: as_of {as_of.isoformat()} from {seed_dir}, started {started}"
        f"{flow_run}; backend pid {pid})"
    )


def check_writer_lock(conn: psycopg.Connection, holder_pid: int | None) -> None:
    """Raise LockLost unless backend ``holder_pid`` (the run's control connection) still
    holds the writer lock. Called before each commit: a session lock ends with its
    session, silently (a network cut, idle_session_timeout, pg_terminate_backend), and
    a waiting run then takes it and rewrites the staging tables this run reads.
    """
    if holder_pid is None:
        return
    held, taken_by = one_row(
        conn.execute(
            queries("control")["holds_writer_lock"], {"holder": holder_pid, "key": LOCK_KEY}
        )
    )
    if held:
        return
    # (A terminated backend lingers in pg_stat_activity after its locks are gone: whether
    # it is still there tells nothing.)
    raise lock_lost(taken_by)


def lock_lost(taken_by: int | None, looked: bool = True) -> LockLost:
    """The run's control connection ended, and the writer lock with it. ``taken_by``:
    the backend holding the lock now; ``looked``: whether anyone looked."""
    why = (
        "its control connection to PostgreSQL ended: a server restart, a network cut, "
        "idle_session_timeout or pg_terminate_backend"
    )
    if not looked:
        then = ""
    elif taken_by is not None:
        then = (
            f"; another session (pid {taken_by}) holds it now and may be writing the staging tables"
        )
    else:
        then = "; no other run holds it"
    return LockLost(
        f"the run lost the pipeline's writer lock ({why}){then}; nothing of this run was "
        "published: rerun it"
    )
