"""Which database errors are a lost connection (retried, "could not be reached") and
which are the server refusing the work: psycopg files both under OperationalError."""

from __future__ import annotations

import psycopg
import pytest
from streamflow.db import connection_lost

UNREACHABLE = "postgresql://postgres@127.0.0.1:9/x"  # nothing listens on port 9


def test_a_refused_connection_is_lost():
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(UNREACHABLE, connect_timeout=5)
    assert connection_lost(caught.value)


def test_a_terminated_session_is_lost(empty_db_url):
    with psycopg.connect(empty_db_url, autocommit=True) as victim:
        pid = victim.info.backend_pid
        with psycopg.connect(empty_db_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg.OperationalError) as caught:
            victim.execute("SELECT 1")
    assert connection_lost(caught.value)


def test_an_index_row_too_big_is_not_a_lost_connection(empty_db_url):
    """A 4 KB key that does not compress: PostgreSQL refuses it (SQLSTATE 54000, an
    OperationalError to psycopg). Retrying it, or saying the database could not be
    reached, would be wrong."""
    with psycopg.connect(empty_db_url) as conn:
        conn.execute("CREATE TEMP TABLE k (id text PRIMARY KEY)")
        with pytest.raises(psycopg.OperationalError) as caught:
            conn.execute(
                "INSERT INTO k SELECT string_agg(md5(i::text), '') FROM generate_series(1, 130) i"
            )
    assert caught.value.sqlstate == "54000"
    assert not connection_lost(caught.value)


def test_data_errors_are_not_lost_connections():
    assert not connection_lost(psycopg.errors.InvalidTextRepresentation("bad"))
    assert not connection_lost(ValueError("not a database error"))
