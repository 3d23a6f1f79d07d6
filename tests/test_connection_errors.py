"""Which database errors are a lost connection (retried, "could not be reached") and
which are the server refusing the work: psycopg files both under OperationalError."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from conftest import scalar
from month_files import flow_command, flow_env, small_months
from streamflow.diagnosis import connection_lost, explain_failure, login_refused, worth_retrying

UNREACHABLE = "postgresql://postgres@127.0.0.1:9/x"  # nothing listens on port 9


@pytest.fixture(scope="module")
def months(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_months(tmp_path_factory.mktemp("small"))


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
    assert not worth_retrying(psycopg.errors.InvalidTextRepresentation("bad"))


def test_a_deadlock_is_retried_but_not_called_unreachable(empty_db_url):
    """Two sessions locking two rows in opposite orders: PostgreSQL breaks the deadlock by
    rolling one back (40P01). The same work may pass again: worth a retry, yet the
    database was reached."""
    import threading

    with psycopg.connect(empty_db_url, autocommit=True) as setup:
        setup.execute("CREATE TABLE IF NOT EXISTS pair (id int PRIMARY KEY); DELETE FROM pair")
        setup.execute("INSERT INTO pair VALUES (1), (2)")
    a, b = psycopg.connect(empty_db_url), psycopg.connect(empty_db_url)
    errors: list[BaseException] = []
    both_locked = threading.Barrier(2)

    def lock(conn: psycopg.Connection, first: int, second: int) -> None:
        try:
            conn.execute("SET deadlock_timeout = '100ms'")
            conn.execute("SELECT * FROM pair WHERE id = %s FOR UPDATE", (first,))
            both_locked.wait(10)
            conn.execute("SELECT * FROM pair WHERE id = %s FOR UPDATE", (second,))
        except psycopg.Error as exc:
            errors.append(exc)
        finally:
            conn.rollback()

    threads = [threading.Thread(target=lock, args=a_args) for a_args in ((a, 1, 2), (b, 2, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    a.close()
    b.close()
    [deadlock] = errors
    assert deadlock.sqlstate == "40P01"
    assert worth_retrying(deadlock) and not connection_lost(deadlock)


def test_a_lock_not_obtained_in_time_is_retried_but_not_called_unreachable(empty_db_url):
    """lock_timeout (55P03): the staging TRUNCATE of a run waits behind a reader's lock,
    the server gives up. The same work may pass once the reader is done."""
    with psycopg.connect(empty_db_url, autocommit=True) as setup:
        setup.execute("CREATE TABLE IF NOT EXISTS busy (id int)")
    with psycopg.connect(empty_db_url) as reader, psycopg.connect(empty_db_url) as writer:
        reader.execute("SELECT * FROM busy")  # holds ACCESS SHARE until its rollback
        writer.execute("SET lock_timeout = '50ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable) as caught:
            writer.execute("TRUNCATE busy")
        writer.rollback()
        reader.rollback()
    assert caught.value.sqlstate == "55P03"
    assert worth_retrying(caught.value) and not connection_lost(caught.value)


def test_a_refused_login_is_neither_lost_nor_retried(empty_db_url):
    """The server answers FATAL (no such database, wrong password): it was reached, and
    will refuse the same login again."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    from streamflow.diagnosis import login_refused

    params = conninfo_to_dict(empty_db_url)
    params["dbname"] = "sf_no_such_database"
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(make_conninfo("", **params))
    assert login_refused(caught.value)
    assert not connection_lost(caught.value)
    assert not worth_retrying(caught.value)
    with pytest.raises(psycopg.OperationalError) as unreachable:
        psycopg.connect(UNREACHABLE, connect_timeout=5)
    assert not login_refused(unreachable.value)


@pytest.mark.parametrize(
    "case", ["no such database", "no privileges", "no connect", "read-only server"]
)
def test_a_database_that_refuses_the_run_says_what_it_lacks(case, db_url, months, run_flow):
    """Configuration, not bugs: one line that says what the login or server lacks, not
    "could not be reached" nor "unexpected"."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(db_url)
    if case == "no such database":
        params["dbname"] = "sf_no_such_database"
        expected = ["the database refused the login", 'database "sf_no_such_database"']
    elif case == "no privileges":
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute("DROP ROLE IF EXISTS sf_no_privileges")
            admin.execute("CREATE ROLE sf_no_privileges LOGIN")
        params["user"] = "sf_no_privileges"
        expected = ["PostgreSQL refused the work: permission denied", "streamflow_ingest role"]
    elif case == "no connect":  # as db/init/001 leaves the stack's database
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute("DROP ROLE IF EXISTS sf_no_connect")
            admin.execute("CREATE ROLE sf_no_connect LOGIN")
            admin.execute(f'REVOKE CONNECT ON DATABASE "{params["dbname"]}" FROM PUBLIC')
        params["user"] = "sf_no_connect"
        expected = [
            "the database refused the login",
            "permission denied for database",
            "GRANT streamflow_ingest TO it",
        ]
    else:
        params["options"] = "-c default_transaction_read_only=on"
        expected = ["PostgreSQL refused the work", "read-only", "the server takes no writes"]

    rc, _, err = run_flow(make_conninfo("", **params), months / "month_000", "2024-01-31")

    assert rc == 1
    message = err.strip().splitlines()[-1]
    assert all(e in message for e in expected), message
    assert "unexpected" not in message and "could not be reached" not in message, message
    assert scalar(db_url, "SELECT count(*) FROM ingest_runs") == 0


def test_owning_the_database_is_not_enough_for_the_first_run(empty_db_url, months, run_flow):
    """The message told a login refused on the first run to "own the database", which
    it did (operator audit): creating the schema takes a superuser (roles, GRANT SET ON
    PARAMETER). Nothing of the schema is left behind."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(empty_db_url)
    with psycopg.connect(empty_db_url, autocommit=True) as admin:
        admin.execute("DROP ROLE IF EXISTS sf_db_owner")
        admin.execute("CREATE ROLE sf_db_owner LOGIN")
        admin.execute(f'ALTER DATABASE "{params["dbname"]}" OWNER TO sf_db_owner')
        admin.execute("ALTER SCHEMA public OWNER TO sf_db_owner")
    params["user"] = "sf_db_owner"

    rc, _, err = run_flow(make_conninfo("", **params), months / "month_000", "2024-01-31")

    message = err.strip().splitlines()[-1]
    assert rc == 1 and "PostgreSQL refused the work: permission denied" in message, message
    assert "needs a superuser" in message and "own the database" not in message, message
    assert scalar(empty_db_url, "SELECT to_regclass('public.users') IS NULL") is True


def test_a_role_out_of_connections_is_busy_not_refused(empty_db_url):
    """'too many connections for role' is FATAL too, and passes once a session ends:
    worth a retry, not a refused login."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    from streamflow.diagnosis import login_refused

    with psycopg.connect(empty_db_url, autocommit=True) as admin:
        admin.execute("DROP ROLE IF EXISTS sf_no_slots")
        admin.execute("CREATE ROLE sf_no_slots LOGIN CONNECTION LIMIT 0")
    params = conninfo_to_dict(empty_db_url)
    params["user"] = "sf_no_slots"
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(make_conninfo("", **params))
    assert "too many connections" in str(caught.value)
    assert not login_refused(caught.value)
    assert worth_retrying(caught.value)


def test_database_errors_explained_to_people_lose_their_traceback_in_the_run_logs():
    """Prefect logs a failed flow with its traceback: for a database that could not be
    reached (the audit stopped PostgreSQL mid-run) that was ~50 lines above the one
    line that says it. A bug keeps its traceback."""
    import logging
    import socket

    from streamflow.diagnosis import explain_failure
    from streamflow.errors import WithoutTraceback

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens once closed
    try:
        psycopg.connect(f"host=127.0.0.1 port={port} dbname=x user=x connect_timeout=3")
    except psycopg.OperationalError as exc:
        unreachable = exc
    keep = WithoutTraceback(explained=explain_failure)

    def record(exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord(
            "prefect.flow_runs",
            logging.ERROR,
            __file__,
            1,
            "x",
            None,
            (type(exc), exc, exc.__traceback__),
        )

    explained, bug = record(unreachable), record(ZeroDivisionError("bug"))
    keep.filter(explained)
    keep.filter(bug)
    assert explained.exc_info is None
    assert bug.exc_info is not None


def test_a_server_that_never_answers_is_given_up_on_and_named(silent_server, monkeypatch):
    """psycopg waits 130 s by default: a run sat silent for minutes (twice: the CLI's
    no-op look, then the flow), and libpq's 'connection timeout expired' named no server."""
    from streamflow import db

    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    monkeypatch.setattr(db, "CONNECT_TIMEOUT_SECONDS", 2)
    url = f"postgresql://nobody@127.0.0.1:{silent_server.port}/x"
    start = time.monotonic()
    with pytest.raises(psycopg.errors.ConnectionTimeout) as caught:
        db.connect(url)
    assert time.monotonic() - start < 10
    assert connection_lost(caught.value)
    assert explain_failure(caught.value) == (
        f"the database could not be reached: 127.0.0.1 port {silent_server.port} did not answer "
        "within 2 s (connect_timeout in DATABASE_URL, or PGCONNECT_TIMEOUT, sets the wait)"
    )


def test_a_silent_host_list_and_a_bad_timeout_are_named(silent_server, monkeypatch):
    """libpq gives each host of a list the whole wait; a connect_timeout that is no
    number was psycopg's 'unexpected ProgrammingError', after Prefect had started."""
    from streamflow import db
    from streamflow.errors import InputError

    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    hosts = f"host=127.0.0.1,127.0.0.1 port={silent_server.port} user=nobody connect_timeout=2"
    with pytest.raises(psycopg.errors.ConnectionTimeout) as caught:
        db.connect(hosts)
    assert str(caught.value) == (
        f"each of 127.0.0.1,127.0.0.1 (port {silent_server.port}) did not answer within 2 s "
        "(connect_timeout in DATABASE_URL, or PGCONNECT_TIMEOUT, sets the wait)"
    )
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "soon")
    with pytest.raises(InputError) as bad:
        db.connect(f"postgresql://nobody@127.0.0.1:{silent_server.port}/x")
    assert str(bad.value) == (
        "connect_timeout 'soon' (in DATABASE_URL or PGCONNECT_TIMEOUT) is not a number of seconds"
    )


def test_the_cli_gives_up_on_a_silent_server_once(silent_server, months, tmp_path):
    """The CLI's no-op look timed out, then handed the run to the flow, which waited as
    long again after starting Prefect: one wait, one line."""
    url = f"postgresql://nobody@127.0.0.1:{silent_server.port}/x?connect_timeout=3"
    env = flow_env(url, PREFECT_HOME=str(tmp_path / "prefect"))
    start = time.monotonic()
    proc = subprocess.run(
        flow_command(months / "month_000", "2024-01-31"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.monotonic() - start

    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ingest failed: the database could not be reached: 127.0.0.1 port {silent_server.port} "
        "did not answer within 3 s (connect_timeout in DATABASE_URL, or PGCONNECT_TIMEOUT, "
        "sets the wait)"
    ), proc.stderr[-2000:]
    assert len(silent_server.taken) == 1  # one wait: the flow did not try again
    assert seconds < 60, seconds  # not 2 x psycopg's 130 s
    assert not (tmp_path / "prefect" / "prefect.db").exists()


def test_a_session_option_the_server_refuses_is_a_refused_login(empty_db_url, monkeypatch):
    """A typo in PGOPTIONS is FATAL at login: not 'could not be reached', not retried,
    and the message says where the options come from."""
    from streamflow import db

    monkeypatch.setenv("PGOPTIONS", "-c statement_timout=5s")
    with pytest.raises(psycopg.OperationalError) as caught:
        db.connect(empty_db_url)
    assert login_refused(caught.value) and not worth_retrying(caught.value)
    message = explain_failure(caught.value)
    assert message is not None
    assert message.startswith("the database refused the login: ")
    assert 'unrecognized configuration parameter "statement_timout"' in message
    assert message.endswith("; check the session options (PGOPTIONS, or options= in DATABASE_URL)")


@pytest.mark.parametrize(
    ("variable", "value", "parameter"),
    [
        ("PGTZ", "Foo/Bar", "TimeZone"),
        ("PGDATESTYLE", "bogus", "DateStyle"),
        ("PGGEQO", "bogus", "geqo"),
    ],
)
def test_a_bad_libpq_variable_is_named_not_pgoptions(
    empty_db_url, monkeypatch, variable, value, parameter
):
    """libpq sends PGTZ, PGDATESTYLE and PGGEQO as session settings of their own: a bad
    value was blamed on PGOPTIONS, or (geqo) read as "could not be reached"."""
    from streamflow import db

    monkeypatch.setenv(variable, value)
    with pytest.raises(psycopg.OperationalError) as caught:
        db.connect(empty_db_url)
    assert login_refused(caught.value) and not worth_retrying(caught.value)
    message = explain_failure(caught.value)
    assert message is not None and message.startswith("the database refused the login: ")
    assert f'parameter "{parameter}"' in message
    assert message.endswith(
        f"; check {variable} in the environment, which libpq sends as {parameter}"
    )


def test_a_libpq_variable_that_refuses_the_server_is_named(empty_db_url, monkeypatch):
    """PGTARGETSESSIONATTRS=read-only left in a shell: the server answered, and the run
    said it "could not be reached" without naming the variable (environment audit)."""
    from streamflow import db

    monkeypatch.setenv("PGTARGETSESSIONATTRS", "read-only")
    monkeypatch.setenv("PGAPPNAME", "not-a-connection-setting")
    with pytest.raises(psycopg.OperationalError) as caught:
        db.connect(empty_db_url)
    message = explain_failure(caught.value)
    assert message is not None and message.startswith("the database could not be reached: ")
    assert message.endswith(
        "; libpq's variables set in the environment: PGTARGETSESSIONATTRS=read-only"
    ), message


def test_a_login_without_a_password_names_the_setting(tmp_path, monkeypatch):
    """POSTGRES_HOST set and POSTGRES_PASSWORD forgotten, against a server that asks for
    one: libpq has nothing to send. That login fails the same way every time. (A cluster
    of its own: its pg_hba.conf is rewritten.)"""
    import pgserver
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    from streamflow import db

    server = pgserver.get_server(tmp_path / "pgdata", cleanup_mode="delete")
    try:
        url = server.get_uri()
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("CREATE ROLE sf_needs_password LOGIN PASSWORD 'pw'")
            hba = Path(admin.execute("SHOW hba_file").fetchone()[0])
            rule = "local all sf_needs_password scram-sha-256\n"  # first: this role only
            hba.write_text(rule + hba.read_text())
            admin.execute("SELECT pg_reload_conf()")
        params = conninfo_to_dict(url)
        params["user"] = "sf_needs_password"
        params.pop("password", None)
        monkeypatch.delenv("PGPASSWORD", raising=False)
        monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))
        deadline = time.monotonic() + 30
        while True:  # the reload is asynchronous: until the rule applies
            try:
                db.connect(make_conninfo("", **params)).close()
            except psycopg.OperationalError as exc:
                refused = exc
                break
            assert time.monotonic() < deadline, "the pg_hba.conf rule never applied"
            time.sleep(0.1)
    finally:
        server.cleanup()
    assert login_refused(refused) and not worth_retrying(refused)
    message = explain_failure(refused)
    assert message is not None and "no password supplied" in message, message
    assert message.endswith(
        "no password was given: set POSTGRES_PASSWORD (or the password in DATABASE_URL, "
        "PGPASSWORD, ~/.pgpass)"
    ), message


def test_a_lock_timeout_of_the_database_names_the_statement(run_flow, db_url, months, pg_admin_url):
    """A lock_timeout set on the database, and a session holding a lock that the month's
    attach needs: the run said "canceling statement due to lock timeout" and nothing of
    which statement, nor that the setting was the database's (operator audit)."""
    import threading

    from psycopg.conninfo import conninfo_to_dict

    dbname = conninfo_to_dict(db_url)["dbname"]
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE \"{dbname}\" SET lock_timeout = '200ms'")
    holder = psycopg.connect(db_url)
    holder.execute("SET lock_timeout = 0")
    holder.execute("LOCK TABLE labels_snapshots IN SHARE ROW EXCLUSIVE MODE")
    release = threading.Timer(60, holder.rollback)  # if the run waited instead
    release.start()
    try:
        rc, _, err = run_flow(db_url, months / "month_000", "2024-01-31")
    finally:
        release.cancel()
        holder.rollback()
        holder.close()

    message = err.strip().splitlines()[-1]
    assert rc == 1, err[-2000:]
    assert message.startswith(
        "ingest failed: PostgreSQL refused the work: canceling statement due to lock "
        'timeout (SQL statement "ALTER TABLE public.labels_snapshots ATTACH PARTITION'
    ), message
    assert "lock_timeout of DATABASE_URL's options or PGOPTIONS, the login, the database" in message
    assert scalar(db_url, "SELECT count(*) FROM ingest_months") == 0


def test_a_database_refusal_mid_run_is_in_words_in_the_ledger(
    run_flow, db_url, months, monkeypatch
):
    """The CLI said 'PostgreSQL refused the work: canceling statement due to statement
    timeout'; the ledger, which the UI and readers see, said
    QueryCanceled('canceling statement due to statement timeout')."""
    from streamflow import publishing

    with psycopg.connect(db_url) as conn:  # a real cancellation, as a server gives it
        conn.execute("SET statement_timeout = '10ms'")
        with pytest.raises(psycopg.errors.QueryCanceled) as caught:
            conn.execute("SELECT pg_sleep(1)")

    def cancelled(*args: object, **kwargs: object) -> None:
        raise caught.value

    monkeypatch.setattr(publishing, "publish_month", cancelled)
    rc, _, err = run_flow(db_url, months / "month_000", "2024-01-31")

    words = (
        "PostgreSQL refused the work: canceling statement due to statement timeout; the "
        "pipeline sets no timeout: a statement_timeout or lock_timeout of DATABASE_URL's "
        "options or PGOPTIONS, the login, the database or the server stopped it (give the "
        "pipeline none, or a higher one), or someone cancelled the statement"
    )
    assert rc == 1
    assert err.strip().splitlines()[-1] == f"ingest failed: {words}", err[-2000:]
    last = "SELECT status, error FROM ingest_runs ORDER BY run_id DESC LIMIT 1"
    with psycopg.connect(db_url) as conn:
        assert conn.execute(last).fetchone() == ("failed", words)
