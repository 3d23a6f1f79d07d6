"""What a database error means: for a retry (a lost connection, a rolled-back
transaction) and for people (one line naming the setting or the right that is missing)."""

from __future__ import annotations

import os
import re

import psycopg

from .db import LIBPQ_SETTING_VARIABLES
from .errors import clipped, first_line

# Connection exceptions (class 08), a server going away (57P01-57P03) or ending an idle
# session (57P05, idle_session_timeout): worth a retry,
# and "could not be reached" is true of them. Other OperationalErrors are the
# server refusing the work (an index row too big, a disk full, a cancelled query).
_CONNECTION_SQLSTATES = ("08", "57P01", "57P02", "57P03", "57P05")


def connection_lost(exc: BaseException) -> bool:
    """True for a failure to reach or keep the server, not for an error it reported."""
    if not isinstance(exc, psycopg.OperationalError) or login_refused(exc):
        return False
    state = exc.sqlstate
    return state is None or state.startswith(_CONNECTION_SQLSTATES)


# What a server says when it refuses a login for good (libpq's English; a translated
# server's refusal reads as a lost connection: retried, then reported with its words).
# A server starting up, shutting down or out of connection slots also answers FATAL,
# and may take the same login a moment later: those are not in the list.
_REFUSALS = (
    "authentication failed",  # password, scram, peer, ident
    "does not exist",  # database, role
    "pg_hba.conf",
    "not permitted to log in",
    "permission denied for database",
)


# The login itself is incomplete: libpq had no password to send, or the session's
# options (PGOPTIONS, the URL's options) name a setting the server refuses. The same
# login fails the same way again, and the fix is a setting, named in the message.
_OPTIONS = "check the session options (PGOPTIONS, or options= in DATABASE_URL)"
_LOGIN_SETTINGS = {
    "no password supplied": (
        "no password was given: set POSTGRES_PASSWORD (or the password in DATABASE_URL, "
        "PGPASSWORD, ~/.pgpass)"
    ),
    "unrecognized configuration parameter": _OPTIONS,
    "invalid value for parameter": _OPTIONS,
    "requires a Boolean value": _OPTIONS,
}

# A bad value of one of db.LIBPQ_SETTING_VARIABLES is refused like a bad option: the
# message blamed PGOPTIONS for PGTZ.
_PARAMETER = re.compile(r'parameter "(\w+)"')


# libpq variables that decide how (not where) a connection is made: one left in a shell
# (PGTARGETSESSIONATTRS=read-only, PGREQUIREAUTH, PGSERVICE, ...) refused a server that
# answered, in words that never named it. PGPASSWORD is not shown.
_LIBPQ_CONNECTION_VARIABLES = (
    "PGSERVICE", "PGSERVICEFILE", "PGHOSTADDR", "PGTARGETSESSIONATTRS", "PGLOADBALANCEHOSTS",
    "PGREQUIREAUTH", "PGCHANNELBINDING", "PGGSSENCMODE", "PGSSLMODE", "PGSSLNEGOTIATION",
    "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "PGSSLCRL", "PGSSLMINPROTOCOLVERSION",
    "PGSSLMAXPROTOCOLVERSION", "PGKRBSRVNAME", "PGGSSLIB",
)  # fmt: skip


def _libpq_environment() -> str:
    """ "; libpq's variables set in the environment: NAME=value, ..." or ""."""
    found = [
        f"{variable}={value}"
        for variable in _LIBPQ_CONNECTION_VARIABLES
        if (value := os.environ.get(variable))
    ]
    return f"; libpq's variables set in the environment: {', '.join(found)}" if found else ""


def _login_fix(text: str) -> str | None:
    """The setting to change, when libpq's words say the login itself was incomplete."""
    fix = next((fix for words, fix in _LOGIN_SETTINGS.items() if words in text), None)
    named = _PARAMETER.search(text)
    if fix == _OPTIONS and named is not None:
        variable = LIBPQ_SETTING_VARIABLES.get(named[1].lower())
        if variable is not None and os.environ.get(variable):
            return f"check {variable} in the environment, which libpq sends as {named[1]}"
    return fix


def login_refused(exc: BaseException) -> bool:
    """The server answered the login with a refusal (wrong password, no such database
    or role, pg_hba), or libpq could not make a complete login: either way the same
    login fails again.

    psycopg gives connect-time errors no SQLSTATE: libpq's text is all there is.
    """
    if not isinstance(exc, psycopg.OperationalError) or exc.sqlstate is not None:
        return False
    text = str(exc)
    if _login_fix(text) is not None:
        return True
    return "FATAL:" in text and any(refusal in text for refusal in _REFUSALS)


# A deadlock, a serialization failure (class 40) or a lock not granted in time: the
# server undid the transaction, and the same work may pass when run again.
_RETRY_SQLSTATES = ("40", "55P03")


def worth_retrying(exc: BaseException) -> bool:
    """A lost connection, or a transaction the server rolled back for another's sake."""
    if connection_lost(exc):
        return True
    if not isinstance(exc, psycopg.Error) or exc.sqlstate is None:
        return False
    return exc.sqlstate.startswith(_RETRY_SQLSTATES)


# What a login or a server lacks, when PostgreSQL refuses the pipeline's work for it.
_NEEDS_ROLE = "the login needs the streamflow_ingest role (GRANT streamflow_ingest TO it)"
_NEEDS: dict[type[psycopg.Error], str] = {
    psycopg.errors.InsufficientPrivilege: (
        f"{_NEEDS_ROLE}; the first run on a database without the pipeline's schema needs "
        "a superuser (it creates roles and grants), or db/init/001_schema.sql applied by one"
    ),
    psycopg.errors.ReadOnlySqlTransaction: (
        "the server takes no writes: a standby, or default_transaction_read_only"
    ),
}


# A statement cancelled (statement_timeout, or someone's pg_cancel_backend) or a lock
# not granted in time (lock_timeout): by SQLSTATE, which a server's translated
# messages (lc_messages) leave alone. The pipeline's own cancels never reach here.
_TIMEOUT_SQLSTATES = ("57014", "55P03")
# A session the server ended for idling: idle_in_transaction_session_timeout (the
# publisher idles between its checks, up to 1 s, while validation runs) or
# idle_session_timeout.
_IDLE_IN_TRANSACTION, _IDLE_SESSION = "25P03", "57P05"
# A server or role out of connection slots answers the login without a SQLSTATE:
# libpq's English words are all there is (a translated server's read as a lost
# connection, retried, then reported with its own words).
_NO_SLOTS = (
    "too many connections",  # the login's or the database's CONNECTION LIMIT
    "remaining connection slots are reserved",
    "too many clients already",  # max_connections, for a superuser too
)
CONNECTIONS_PER_RUN = 4
# Where a session setting the pipeline never sets comes from.
_SET_ELSEWHERE = "DATABASE_URL's options or PGOPTIONS, the login, the database or the server"
# The server out of room or resources (class 53). A full disk is disk_full (53100) when
# the operating system said ENOSPC; a file it may not grow further (EFBIG: a ulimit on
# the server, EDQUOT: a quota) is an internal error with the words of its hint, and read
# as a bug ("unexpected InternalError_", a traceback) before (resource audit). Those
# words are English: a translated server's reads as "unexpected".
_DISK_FULL, _NO_MEMORY, _LIMIT_EXCEEDED, _IO_ERROR = "53100", "53200", "53400", "58030"
_CANNOT_GROW = ("could not extend file", "could not write to file", "Check free disk space")
_DISK = (
    "free space on the server's data disk (PGDATA's volume, or the tablespace's), or raise "
    "the quota or file size limit the error names"
)
# The server itself went down and is recovering (a backend crashed: out of memory, a
# full WAL disk): the run's connections end, a new one is refused for a while.
_CRASHED = "57P02"
_RECOVERING = "the database system is in recovery mode"


# Errors a month's own values can cause (a data exception, a duplicate key when the
# live key is rebuilt, a key too long for its index): validation explains them better.
_DATA_SQLSTATES = ("22", "23", "54")


def about_the_server(exc: BaseException) -> bool:
    """The error is the server's state or configuration (a full disk, a limit, a right
    missing, a lost connection), explained by ``explain_failure``, not one the month's
    values may have caused."""
    state = getattr(exc, "sqlstate", None) or ""
    return not state.startswith(_DATA_SQLSTATES) and explain_failure(exc) is not None


def explain_failure(exc: BaseException) -> str | None:
    """One line for people on a database error that is configuration or the server's
    state, not a bug; None for any other error."""
    if not isinstance(exc, psycopg.Error):
        return None
    reason = first_line(exc)  # libpq's message runs on with hints
    if login_refused(exc):
        if "permission denied for database" in reason:  # no CONNECT (db/init/001 says why)
            return f"the database refused the login: {reason}; {_NEEDS_ROLE}"
        fix = _login_fix(str(exc))
        return f"the database refused the login: {reason}" + (f"; {fix}" if fix else "")
    if any(words in reason for words in _NO_SLOTS):
        return (
            f"the database took no more connections: {reason}; a run needs up to "
            f"{CONNECTIONS_PER_RUN} at once (the login's CONNECTION LIMIT, the database's, "
            "or the server's max_connections)"
        )
    if exc.sqlstate in (_IDLE_IN_TRANSACTION, _IDLE_SESSION):
        setting, needs = (
            ("idle_in_transaction_session_timeout", "a few seconds at least: the publisher "
             "waits up to 1 s between its statements while validation runs")
            if exc.sqlstate == _IDLE_IN_TRANSACTION
            else ("idle_session_timeout", "one longer than a month's run: the control "
                  "connection waits through staging and validation, minutes at 10M users")
        )  # fmt: skip
        return (
            f"PostgreSQL ended the session: {reason}; the pipeline sets no {setting}: one of "
            f"{_SET_ELSEWHERE} did (give the pipeline none, or {needs})"
        )
    if connection_lost(exc):
        if exc.sqlstate == _CRASHED or _RECOVERING in str(exc):
            return (
                f"the database server stopped and is recovering (a server process crashed: "
                f"out of memory, a full disk; its log says which): {reason}"
            )
        return f"the database could not be reached: {reason}{_libpq_environment()}"
    out_of_room = _out_of_room(exc, reason)
    if out_of_room is not None:
        return out_of_room
    if exc.sqlstate in _TIMEOUT_SQLSTATES:
        # The pipeline sets neither timeout: the login's, the database's or the server's
        # did. Inside a function, the context names the statement (an ATTACH PARTITION).
        return (
            f"PostgreSQL refused the work: {reason}{_during(exc)}; the pipeline sets no timeout: "
            f"a statement_timeout or lock_timeout of {_SET_ELSEWHERE} stopped it (give the "
            "pipeline none, or a higher one), or someone cancelled the statement"
        )
    if isinstance(exc, psycopg.OperationalError):
        return f"PostgreSQL refused the work: {reason}"
    lacking = _NEEDS.get(type(exc))
    if isinstance(exc, psycopg.errors.InsufficientPrivilege) and "temporary" in reason:
        # A backfill's lookup (publish.sql not_listed_later): the role is there, the
        # database's TEMPORARY privilege is not (revoked from PUBLIC, and db/init applied
        # by a login that does not own the database, which therefore granted nothing).
        lacking = (
            "a backfill (a month older than the latest) needs TEMPORARY on the database: "
            "GRANT TEMPORARY ON DATABASE <database> TO streamflow_ingest, or have its owner "
            "apply "
            "db/init/001_schema.sql"
        )
    return None if lacking is None else f"PostgreSQL refused the work: {reason}; {lacking}"


def _during(exc: psycopg.Error) -> str:
    """The statement an error arose in, from PostgreSQL's context ("COPY usage_agg_30d,
    line 3000", a function's ATTACH PARTITION), in parentheses; "" without one."""
    context = (exc.diag.context or "").strip().splitlines()
    return f" ({clipped(context[0], 200)})" if context else ""


def _out_of_room(exc: psycopg.Error, reason: str) -> str | None:
    """One line for a server out of disk, memory or a limit on either; None otherwise."""
    state = exc.sqlstate or ""
    # Its own words, not the DETAIL or CONTEXT (a COPY's quotes a file's line).
    said = f"{exc.diag.message_primary or ''} {exc.diag.message_hint or ''}"
    if state == _DISK_FULL or (state == "XX000" and any(w in said for w in _CANNOT_GROW)):
        return f"PostgreSQL could not write to its disk: {reason}{_during(exc)}; {_DISK}"
    if state == _IO_ERROR:
        return (
            f"PostgreSQL could not read or write its disk: {reason}{_during(exc)}; an I/O "
            "error (a failing disk or volume): the server's and the system's logs say more"
        )
    if state == _NO_MEMORY:
        hint = exc.diag.message_hint
        return f"PostgreSQL ran out of memory: {reason}{_during(exc)}; " + (
            hint
            if hint
            else "the pipeline's statements ask for up to 256MB of work_mem or "
            "maintenance_work_mem each (see the server's log)"
        )
    if state == _LIMIT_EXCEEDED:
        return (
            f"PostgreSQL refused the work: {reason}{_during(exc)}; a limit of "
            f"{_SET_ELSEWHERE} stopped it (the pipeline sets none: give it none, or a "
            "higher one)"
        )
    if state.startswith("53"):
        return f"PostgreSQL ran out of resources: {reason}{_during(exc)}; see the server's log"
    return None
