"""Connections to PostgreSQL: the session every connection of a run gets (options,
encoding, connect timeout), a refusal of a database that cannot hold the files, and the
one row of a statement that always returns one."""

from __future__ import annotations

import os
from typing import TypedDict

import psycopg
from psycopg.conninfo import conninfo_to_dict, timeout_from_conninfo
from psycopg.rows import Row

from . import sqlfiles
from .errors import InputError

# COPY reads the files' dates under the session's DateStyle, which a server takes from
# its locale at initdb ("ISO, MDY" in the postgres image, "ISO, DMY" under fr_FR): the
# same 03/04/2024 would be March 4 on one server and 3 April on another. Under YMD,
# PostgreSQL refuses a day- or month-first date whatever the server's setting.
# The pipeline's tables are public's, named without a schema in its SQL: a search_path
# set on the role or database that put another schema first (staging, or one with a
# table of the same name) would have the live upserts write there, and the run report
# them published.
SESSION_OPTIONS = "-c DateStyle=ISO,YMD -c search_path=public"
DATE_STYLE = "ISO, YMD"  # as the server reports it

# libpq sends these variables of the client's environment as session settings of their
# own (setting: variable), which the server applies after the options' -c switches:
# PGDATESTYLE="ISO, DMY" had 03/04/2023 published as 3 April again. The pipeline's
# child process starts without the one it pins; ``connect`` sets DateStyle again when
# the server reports another.
LIBPQ_SETTING_VARIABLES = {"datestyle": "PGDATESTYLE", "timezone": "PGTZ", "geqo": "PGGEQO"}
LIBPQ_SESSION_ENV = (LIBPQ_SETTING_VARIABLES["datestyle"],)


def session_options(url: str, *extra: str) -> str:
    """The connection's own options, then ``extra``, then SESSION_OPTIONS (last wins).

    libpq reads PGOPTIONS only when no options are given, and we always give some: the
    URL's options, else PGOPTIONS, are kept by passing them on. (A service file's
    options, read by libpq after, would be replaced: set them in the URL instead.)
    """
    given = conninfo_to_dict(url).get("options")  # str: parsed from a string
    own = str(given) if given else os.environ.get("PGOPTIONS")
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


class ConnectTimeout(TypedDict, total=False):
    """Connection parameters the pipeline adds: psycopg.connect's keywords."""

    connect_timeout: int


def default_connect_timeout(params: dict) -> ConnectTimeout:
    """``{"connect_timeout": 15}`` unless one is given: for the flow's connections and
    GX's alike."""
    return {} if _given_connect_timeout(params) else {"connect_timeout": CONNECT_TIMEOUT_SECONDS}


def connect(
    url: str, *, autocommit: bool = False, application_name: str = "streamflow-ingest"
) -> psycopg.Connection:
    params = conninfo_to_dict(url)
    extra = default_connect_timeout(params)
    try:
        waited = timeout_from_conninfo(conninfo_to_dict(url, **extra))  # what psycopg will wait
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
    _pin_date_style(conn)
    return conn


def _pin_date_style(conn: psycopg.Connection) -> None:
    """DateStyle back to ``DATE_STYLE`` if the client's environment changed it; costs
    nothing otherwise, the server reports DateStyle with the connection."""
    if conn.info.parameter_status("DateStyle") == DATE_STYLE:
        return
    conn.execute(sqlfiles.query("session", "pin_date_style"))
    if not conn.autocommit:
        conn.commit()  # a SET outlives its transaction only once committed


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


def one_row(cur: psycopg.Cursor[Row]) -> Row:
    """The row of a statement that always returns one (a count, a function's or an
    expression's value, INSERT ... RETURNING of one row): ``fetchone()`` without the
    None it gives when there is no row, which such a statement never has."""
    row = cur.fetchone()
    if row is None:
        raise RuntimeError("a statement that returns one row returned none")
    return row
