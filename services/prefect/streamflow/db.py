"""Connections, schema bootstrap, the writer lock, and the named SQL queries in db/sql."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import cache

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, timeout_from_conninfo

from .errors import InputError, LockLost, LockTimeout, SchemaOutdated, clipped, first_line
from .settings import DB_DIR

# One key for the whole pipeline: months are published strictly one at a time.
LOCK_KEY = 0x5F1_0E_1A  # arbitrary constant, shared by every writer
_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


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
}


def _login_fix(text: str) -> str | None:
    """The setting to change, when libpq's words say the login itself was incomplete."""
    return next((fix for words, fix in _LOGIN_SETTINGS.items() if words in text), None)


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
_NEEDS = {
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
        return f"the database could not be reached: {reason}"
    if exc.sqlstate in _TIMEOUT_SQLSTATES:
        # The pipeline sets neither timeout: the login's, the database's or the server's
        # did. Inside a function, the context names the statement (an ATTACH PARTITION).
        context = (exc.diag.context or "").strip().splitlines()
        during = f" ({clipped(context[0], 200)})" if context else ""
        return (
            f"PostgreSQL refused the work: {reason}{during}; the pipeline sets no timeout: "
            f"a statement_timeout or lock_timeout of {_SET_ELSEWHERE} stopped it (give the "
            "pipeline none, or a higher one), or someone cancelled the statement"
        )
    if isinstance(exc, psycopg.OperationalError):
        return f"PostgreSQL refused the work: {reason}"
    needs = _NEEDS.get(type(exc))
    return None if needs is None else f"PostgreSQL refused the work: {reason}; {needs}"


@cache
def queries(file: str) -> dict[str, str]:
    """Named queries of ``db/sql/<file>.sql``: each block starts with ``-- name: <name>``."""
    text = (DB_DIR / "sql" / f"{file}.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def query(file: str, name: str, **identifiers: sql.Composable) -> sql.Composed:
    """A named query with its ``{placeholders}`` filled by already-quoted identifiers."""
    return sql.SQL(queries(file)[name]).format(**identifiers)  # type: ignore[arg-type]


def staged(table: str) -> sql.Identifier:
    """``staging.<table>``: where a registry table's month waits for its verdict."""
    return sql.Identifier("staging", table)


def ident_list(names: Sequence[str], prefix: str | None = None) -> sql.Composed:
    """``a, b`` or ``prefix.a, prefix.b``: names come from the table registry only."""
    if prefix is None:
        return sql.SQL(", ").join(sql.Identifier(n) for n in names)
    return sql.SQL(", ").join(sql.Identifier(prefix, n) for n in names)


# COPY reads the files' dates under the session's DateStyle, which a server takes from
# its locale at initdb ("ISO, MDY" in the postgres image, "ISO, DMY" under fr_FR): the
# same 03/04/2024 would be March 4 on one server and 3 April on another. Under YMD,
# PostgreSQL refuses a day- or month-first date whatever the server's setting.
# The pipeline's tables are public's, named without a schema in its SQL: a search_path
# set on the role or database that put another schema first (staging, or one with a
# table of the same name) would have the live upserts write there, and the run report
# them published.
SESSION_OPTIONS = "-c DateStyle=ISO,YMD -c search_path=public"


def session_options(url: str, *extra: str) -> str:
    """The connection's own options, then ``extra``, then SESSION_OPTIONS (last wins).

    libpq reads PGOPTIONS only when no options are given, and we always give some: the
    URL's options, else PGOPTIONS, are kept by passing them on. (A service file's
    options, read by libpq after, would be replaced: set them in the URL instead.)
    """
    own = conninfo_to_dict(url).get("options") or os.environ.get("PGOPTIONS")
    return " ".join(o for o in (own, *extra, SESSION_OPTIONS) if o)


# psycopg waits 130 s for a server that takes the connection and never answers (a
# stuck proxy, a host that drops packets): a run sat silent for minutes. A URL's
# connect_timeout or PGCONNECT_TIMEOUT still decides when given (a service file's
# does not: this default comes first).
CONNECT_TIMEOUT_SECONDS = 15


def _given_connect_timeout(params: dict) -> str | None:
    """The connect timeout libpq parameters ``params`` or PGCONNECT_TIMEOUT give (an
    empty value is none)."""
    return params.get("connect_timeout") or os.environ.get("PGCONNECT_TIMEOUT")


# The files are UTF-8, and COPY reads them in the session's client encoding: one set on
# the role or database (client_encoding), PGCLIENTENCODING, or a LATIN1 database's
# default had é stored as "Ã©" (exit 0, every table), and let a byte that is no UTF-8
# through. A connection parameter wins over all of them; `-c client_encoding` in the
# options does not win over PGCLIENTENCODING.
CLIENT_ENCODING = "UTF8"


def default_connect_timeout(params: dict) -> dict[str, int]:
    """``{"connect_timeout": 15}`` unless one is given: for the flow's connections and
    GX's alike."""
    return {} if _given_connect_timeout(params) else {"connect_timeout": CONNECT_TIMEOUT_SECONDS}


def connect(
    url: str, *, autocommit: bool = False, application_name: str = "streamflow-ingest"
) -> psycopg.Connection:
    params = conninfo_to_dict(url)
    extra = default_connect_timeout(params)
    try:
        waited = timeout_from_conninfo({**params, **extra})  # what psycopg will wait
    except psycopg.ProgrammingError:
        raise InputError(
            f"connect_timeout {_given_connect_timeout(params)!r} (in DATABASE_URL or "
            "PGCONNECT_TIMEOUT) is not a "
            "number of seconds"
        ) from None
    try:
        conn = psycopg.connect(
            url,
            autocommit=autocommit,
            application_name=application_name,
            options=session_options(url),
            client_encoding=CLIENT_ENCODING,
            **extra,
        )
    except psycopg.errors.ConnectionTimeout as exc:
        # libpq's words name neither the server nor the wait.
        raise psycopg.errors.ConnectionTimeout(
            f"{_server_named(params)} did not answer within {waited} s (connect_timeout in "
            "DATABASE_URL, or PGCONNECT_TIMEOUT, sets the wait)"
        ) from exc
    check_server_encoding(conn)
    return conn


_UTF8_DATABASE = "CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0"  # advice, not run


def check_server_encoding(conn: psycopg.Connection) -> None:
    """InputError, the connection closed, unless the database stores UTF-8.

    In a LATIN1 database a value outside LATIN1 cannot be stored at all; in a SQL_ASCII
    one the validation's character checks (invisible characters, spelling) would read
    bytes, not characters.
    """
    encoding = conn.info.parameter_status("server_encoding")
    if encoding == CLIENT_ENCODING:
        return
    name = conn.info.dbname
    conn.close()
    raise InputError(
        f"database {name!r} uses the encoding {encoding}: the pipeline needs a UTF8 database "
        f"(the month files are UTF-8, and the validation reads characters); create one with "
        f"{_UTF8_DATABASE}"
    )


def _server_named(params: dict) -> str:
    host = str(params.get("host") or os.environ.get("PGHOST") or "")
    port = str(params.get("port") or os.environ.get("PGPORT") or "5432")
    if not host:
        return f"the default socket, port {port},"
    if "," in host:  # each host of a list is given the whole wait
        return f"each of {host} (port {port})"
    return f"{host} port {port}"


def schema_present(conn: psycopg.Connection) -> bool:
    row = conn.execute(queries("control")["schema_present"]).fetchone()  # type: ignore[arg-type]
    return bool(row and row[0])


def apply_init_sql(conn: psycopg.Connection) -> list[str]:
    """Run ``db/init/*.sql`` in name order, as the postgres image's entrypoint does."""
    applied = []
    for path in sorted((DB_DIR / "init").glob("*.sql")):
        conn.execute(path.read_text(encoding="utf-8"))  # type: ignore[arg-type]
        applied.append(path.name)
    conn.commit()
    return applied


# A database initialised by an older version of this pipeline lacks one of these, or
# has a lower streamflow_schema_version(), and gets the (idempotent) init SQL again.
NEWEST_OBJECT = "streamflow_schema_version()"
NEWEST_COLUMN = ("public.ingest_runs", "flow_run_id")


def _init_sql_version() -> int:
    """The version db/init/001_schema.sql gives itself: written there only."""
    text = (DB_DIR / "init" / "001_schema.sql").read_text(encoding="utf-8")
    found = re.search(r"FUNCTION streamflow_schema_version\(\)[^;]*?AS 'SELECT (\d+)'", text)
    if found is None:
        raise RuntimeError("db/init/001_schema.sql defines no streamflow_schema_version()")
    return int(found.group(1))


SCHEMA_VERSION = _init_sql_version()


def ensure_schema(conn: psycopg.Connection) -> list[str]:
    """Apply the init SQL on an empty or older database; leave a current one alone."""
    if schema_present(conn):
        if _schema_version(conn) >= SCHEMA_VERSION:
            return []
        try:
            return apply_init_sql(conn)
        except psycopg.errors.InsufficientPrivilege as exc:
            conn.rollback()
            raise SchemaOutdated(
                "the database was initialised by an older version of this pipeline "
                f"(no {'.'.join(NEWEST_COLUMN)}, or db/init's version below "
                f"{SCHEMA_VERSION}), and this login may not update it: have a superuser (the "
                "login that initialised it; POSTGRES_USER in Docker) run "
                "db/init/001_schema.sql once (it is idempotent). PostgreSQL said: "
                f"{exc.diag.message_primary}"
            ) from exc
    return apply_init_sql(conn)


def _schema_version(conn: psycopg.Connection) -> int:
    """streamflow_schema_version(), 0 without it or without NEWEST_COLUMN."""
    q = queries("control")
    table, column = NEWEST_COLUMN
    present = conn.execute(
        q["schema_is_current"],  # type: ignore[arg-type]
        {"signature": NEWEST_OBJECT, "table": table, "column": column},
    ).fetchone()
    version = conn.execute(q["schema_version"]).fetchone()[0] if present[0] else 0  # type: ignore[arg-type, index]
    conn.rollback()
    return version


@contextmanager
def writer_lock(
    conn: psycopg.Connection,
    wait_seconds: float,
    on_wait: Callable[[str], object] | None = None,
) -> Iterator[None]:
    """Hold the pipeline's session advisory lock; wait up to ``wait_seconds`` for it.

    ``on_wait`` is told once, when the lock is taken: a run waiting up to 10 minutes
    showed 'Running' with no word in the UI.
    """
    deadline = time.monotonic() + wait_seconds
    q = queries("control")
    key = {"key": LOCK_KEY}
    told = False
    while not conn.execute(q["try_writer_lock"], key).fetchone()[0]:  # type: ignore[arg-type]
        holder = conn.execute(q["writer_lock_holder"], key).fetchone()  # type: ignore[arg-type]
        who = f" (held by backend pid {holder[0]})" if holder else ""
        if time.monotonic() >= deadline:
            raise LockTimeout(
                f"another ingestion is running{who}; waited {wait_seconds:g}s for it "
                "(set LOCK_WAIT_SECONDS to wait longer)"
            )
        if on_wait is not None and not told:
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
                conn.execute(q["unlock_writer_lock"], key)  # type: ignore[arg-type]


def check_writer_lock(conn: psycopg.Connection, holder_pid: int | None) -> None:
    """Raise LockLost unless backend ``holder_pid`` (the run's control connection) still
    holds the writer lock. Called before each commit: a session lock ends with its
    session, silently (a network cut, idle_session_timeout, pg_terminate_backend), and
    a waiting run then takes it and rewrites the staging tables this run reads.
    """
    if holder_pid is None:
        return
    held, taken_by = conn.execute(
        queries("control")["holds_writer_lock"],  # type: ignore[arg-type]
        {"holder": holder_pid, "key": LOCK_KEY},
    ).fetchone()
    if held:
        return
    # (A terminated backend lingers in pg_stat_activity after its locks are gone: whether
    # it is still there tells nothing.)
    why = (
        "its control connection to PostgreSQL ended: a server restart, a network cut, "
        "idle_session_timeout or pg_terminate_backend"
    )
    if taken_by is not None:
        then = (
            f"; another session (pid {taken_by}) holds it now and may be writing the staging tables"
        )
    else:
        then = "; no other run holds it"
    raise LockLost(
        f"the run lost the pipeline's writer lock ({why}){then}; nothing of this run was "
        "published: rerun it"
    )
