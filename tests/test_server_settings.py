"""What a server, database or role setting that the pipeline does not control cannot
change: the values stored, where history is stored, and the reason a run gives
(an audit of the settings a DBA or a managed PostgreSQL may set)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psycopg
import pytest
from conftest import DATA_TABLES, dump, member_login, scalar, with_database
from month_files import AS_OF, read_rows, small_months, with_value, write_rows
from psycopg import sql
from streamflow.registry import KEY, PARENT, SNAPSHOT_TABLES, TABLES

JAN, FEB = AS_OF["month_000"], AS_OF["month_001"]


@pytest.fixture(scope="module")
def months(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_months(tmp_path_factory.mktemp("small"))


def with_user_id(months: Path, tmp_path: Path, new_id: str) -> Path:
    """month_000 with its first user renamed ``new_id`` in all six files."""
    folder = tmp_path / "month_000"
    shutil.copytree(months / "month_000", folder)
    old = read_rows(folder / PARENT.file_name)[1][0]
    for spec in TABLES:
        path = folder / spec.file_name
        rows = read_rows(path)
        key = rows[0].index(KEY)
        write_rows(
            path,
            [[new_id if i == key and v == old else v for i, v in enumerate(row)] for row in rows],
        )
    return folder


def set_on_database(url: str, setting: str, value: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                sql.Identifier(name), sql.Identifier(setting), sql.Literal(value)
            )
        )


def refused_for_a_negative_watch_hours(result: tuple[int, str, str]) -> str:
    """The CLI's last line, once checked to name the month's one negative watch_hours_30d."""
    rc, _, err = result
    last = err.strip().splitlines()[-1]
    assert rc == 1 and last.startswith(
        "ingest failed: validation failed: usage_agg_30d.csv, column watch_hours_30d: "
        "1 value(s) below 0"
    ), last
    return last


def test_a_client_encoding_set_elsewhere_does_not_change_the_stored_values(
    run_flow, db_url, months, tmp_path, monkeypatch
):
    """The files are UTF-8; a client_encoding set on the database (or a LATIN1
    database's default, or PGCLIENTENCODING) had COPY read them as LATIN1: 'é' was
    stored as 'Ã©' in every table, exit 0 (settings audit)."""
    set_on_database(db_url, "client_encoding", "LATIN1")
    monkeypatch.setenv("PGCLIENTENCODING", "WIN1252")
    folder = with_user_id(months, tmp_path, "7590-VHVéG")

    rc, _, err = run_flow(db_url, folder, JAN)

    assert rc == 0, err[-3000:]
    for table in DATA_TABLES:
        query = sql.SQL("SELECT array_agg(user_id) FROM {} WHERE user_id LIKE '7590-%%'")
        ids = scalar(db_url, query.format(sql.Identifier(table)))
        assert ids == ["7590-VHVéG"], table


def test_gx_reads_the_values_as_utf8_whatever_the_client_encoding(
    run_flow, db_url, months, tmp_path
):
    """A failed check's example rows come through GX's connection: under a LATIN1
    client_encoding a user_id outside LATIN1 (€) made the lookup fail, "validation
    could not run (GX process): UntranslatableCharacter", instead of naming the value
    and its user (review)."""
    set_on_database(db_url, "client_encoding", "LATIN1")
    folder = with_user_id(months, tmp_path, "7590-V€G")
    rows = read_rows(folder / "usage_agg_30d.csv")
    row = next(i for i, r in enumerate(rows) if r[0] == "7590-V€G")
    rows[row][rows[0].index("watch_hours_30d")] = "-1"
    write_rows(folder / "usage_agg_30d.csv", rows)

    last = refused_for_a_negative_watch_hours(run_flow(db_url, folder, JAN))
    assert "7590-V€G" in last, last


def test_a_byte_that_is_not_utf8_is_refused_whatever_the_client_encoding(
    run_flow, db_url, months, tmp_path, monkeypatch
):
    """Under a LATIN1 client encoding a 0xff byte in a user_id was published as 'ÿ'."""
    set_on_database(db_url, "client_encoding", "LATIN1")
    folder = tmp_path / "month_000"
    shutil.copytree(months / "month_000", folder)
    users = folder / "users.csv"
    lines = users.read_bytes().split(b"\n")
    lines[1] = b"7590-VHV\xffG" + lines[1][lines[1].index(b",") :]
    users.write_bytes(b"\n".join(lines))

    rc, _, err = run_flow(db_url, folder, JAN)

    assert rc == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("ingest failed: users.csv, line 2") and "UTF8" in last, last
    assert scalar(db_url, "SELECT count(*) FROM users") == 0


def test_a_database_not_in_utf8_is_refused_by_name(run_flow, pg_admin_url, months):
    """A LATIN1 database failed with "unexpected UnicodeEncodeError: 'latin-1' codec
    can't encode character '\\u2026'" (the init SQL's comments) and a traceback; values
    outside LATIN1 could not be stored there anyway."""
    name = f"sf_latin1_{os.getpid()}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE DATABASE {} ENCODING 'LATIN1' TEMPLATE template0 "
                "LC_COLLATE 'C' LC_CTYPE 'C'"
            ).format(sql.Identifier(name))
        )
    url = with_database(pg_admin_url, name)
    try:
        rc, _, err = run_flow(url, months / "month_000", JAN)
        assert rc == 1
        assert err.strip().splitlines()[-1] == (
            f"ingest failed: database '{name}' uses the encoding LATIN1: the pipeline needs a "
            "UTF8 database (the month files are UTF-8, and the validation reads characters); "
            "create one with CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0"
        )
        assert scalar(url, "SELECT to_regclass('public.ingest_runs')") is None
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def limit_connections(url: str, admin_url: str, limit: int) -> None:
    role = psycopg.conninfo.conninfo_to_dict(url)["user"]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER ROLE {} CONNECTION LIMIT {}").format(
                sql.Identifier(role), sql.Literal(limit)
            )
        )


def test_a_run_needs_four_connections_and_says_so_when_it_has_fewer(
    run_flow, db_url, pg_admin_url, months, tmp_path
):
    """GX's process opened connections of its own for the users' count and for a
    failed check's example rows: a login limited to four connections had a month with
    one bad value fail with "the database could not be reached: ... too many
    connections" (twice in a row), not with the value (settings audit)."""
    bad = with_value(months, tmp_path / "month_000", "usage_agg_30d.csv", "watch_hours_30d", "-1")
    with member_login(db_url, pg_admin_url, "streamflow_ingest", "pw") as url:
        limit_connections(url, pg_admin_url, 4)
        refused_for_a_negative_watch_hours(run_flow(url, bad, JAN))
        rc, _, err = run_flow(url, months / "month_000", JAN)
        assert rc == 0, err[-3000:]

        limit_connections(url, pg_admin_url, 1)
        rc, _, err = run_flow(url, months / "month_001", FEB)
        assert rc == 1
        last = err.strip().splitlines()[-1]
        assert "the database took no more connections" in last, last
        assert "a run needs up to 4 at once (the login's CONNECTION LIMIT" in last, last


@pytest.mark.parametrize(
    ("setting", "in_transaction", "needs"),
    [
        ("idle_in_transaction_session_timeout", True, "the publisher waits up to 1 s"),
        ("idle_session_timeout", False, "the control connection waits through staging"),
    ],
)
def test_an_idle_session_timeout_is_named_as_a_setting(db_url, setting, in_transaction, needs):
    """idle_in_transaction_session_timeout under about a second ended the publisher's
    session while it waited for the verdict: "unexpected IdleInTransactionSessionTimeout"
    and a traceback (settings audit); an idle_session_timeout ends the control
    connection, idle through staging and validation, whatever its length (review)."""
    import time

    from streamflow import diagnosis

    with psycopg.connect(db_url, autocommit=not in_transaction) as conn:
        conn.execute(sql.SQL("SET {} = '50ms'").format(sql.Identifier(setting)))
        conn.execute("SELECT 1")  # in a transaction or not, then idle
        time.sleep(0.5)
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("SELECT 1")
    words = diagnosis.explain_failure(caught.value)
    assert words is not None and words.startswith("PostgreSQL ended the session: "), words
    assert f"the pipeline sets no {setting}" in words and needs in words, words
    # An ended idle session is a lost connection (retried, the outcome recorded on a new
    # one); an aborted transaction is not.
    assert diagnosis.connection_lost(caught.value) is (not in_transaction)


def test_exit_on_error_does_not_hide_the_bad_value(run_flow, db_url, months, tmp_path):
    """With exit_on_error on, the server closes the session on a bad value: the rollback
    that followed raised in turn, and the run said "the database could not be reached"
    after two retries, instead of the line and column (settings audit)."""
    set_on_database(db_url, "exit_on_error", "on")
    folder = with_value(months, tmp_path / "month_000", "users.csv", "signup_date", "2024-13-45", 4)

    rc, _, err = run_flow(db_url, folder, JAN)

    assert rc == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("ingest failed: users.csv, line 5, column signup_date"), last


def test_history_is_built_in_the_default_tablespace_whatever_the_login_asks(
    run_flow, db_url, pg_admin_url, months
):
    """The SECURITY DEFINER functions that build month partitions and live keys ran
    with the caller's default_tablespace: a login without CREATE on a tablespace had
    every month partition and key put there, by the owner's rights (settings audit)."""
    data_dir = Path(scalar(pg_admin_url, "SHOW data_directory"))  # type: ignore[arg-type]
    if not data_dir.is_dir():
        pytest.skip("the server's data directory is not on this machine")
    where = data_dir / f"ts_{os.getpid()}"  # the server's user can reach it
    where.mkdir()
    owner = data_dir.stat()
    try:
        os.chown(where, owner.st_uid, owner.st_gid)
    except PermissionError:
        pytest.skip("cannot give the server's user a folder")
    space = f"sf_odd_{os.getpid()}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE TABLESPACE {} LOCATION {}").format(
                sql.Identifier(space), sql.Literal(str(where))
            )
        )
    try:
        with member_login(db_url, pg_admin_url, "streamflow_ingest", "pw") as url:
            role = psycopg.conninfo.conninfo_to_dict(url)["user"]
            with psycopg.connect(db_url, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("ALTER ROLE {} SET default_tablespace = {}").format(
                        sql.Identifier(role), sql.Literal(space)
                    )
                )
            for folder, as_of in (("month_000", JAN), ("month_001", FEB)):
                rc, _, err = run_flow(url, months / folder, as_of)
                assert rc == 0, err[-3000:]
        placed = scalar(
            db_url,
            "SELECT count(*) FROM pg_class c JOIN pg_tablespace t ON t.oid = c.reltablespace "
            "WHERE t.spcname = %s",
            (space,),
        )
        assert placed == 0
        partitions = (
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE c.relkind = 'r'"
        )
        assert scalar(db_url, partitions) == 2 * len(SNAPSHOT_TABLES)
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(psycopg.conninfo.conninfo_to_dict(db_url)["dbname"])
                )
            )
            conn.execute(sql.SQL("DROP TABLESPACE IF EXISTS {}").format(sql.Identifier(space)))


def _postgres_catalogues() -> list[Path]:
    """PostgreSQL's own message translations on this machine (Debian's packages)."""
    import glob

    return sorted(Path(p) for p in glob.glob("/usr/share/locale/*/LC_MESSAGES/postgres-*.mo"))


def test_copy_errors_keep_their_line_and_column_on_a_server_speaking_another_language():
    """Under lc_messages=fr_FR (a DBA's choice, not the pipeline's: a non-superuser
    may not set it) every COPY error lost its line and column: "users.csv: valeur du
    champ date/time en dehors des limites". The context is read in each language
    PostgreSQL ships, from its own catalogues."""
    import gettext

    from streamflow.copy_errors import copy_context
    from streamflow.registry import BY_NAME

    catalogues = _postgres_catalogues()
    if not catalogues:
        pytest.skip("no PostgreSQL message catalogue on this machine")
    spec = BY_NAME["usage_agg_30d"]
    contexts = {
        # The value or row shown may hold any word, a column's name or "line 3" too.
        'COPY %s, line %llu, column %s: "%s"': ("usage_agg_30d", 7, "watch_hours_30d", "line 3"),
        "COPY %s, line %llu, column %s: null input": ("usage_agg_30d", 7, "skips_7d"),
        'COPY %s, line %llu: "%s"': ("usage_agg_30d", 7, "u1,skips_7d,line 3"),
        "COPY %s, line %llu": ("usage_agg_30d", 7),
    }
    read = 0
    for path in catalogues:
        with path.open("rb") as f:
            words = gettext.GNUTranslations(f)
        for msgid, args in contexts.items():
            context = words.gettext(msgid).replace("%llu", "%s") % args
            line, column, _ = copy_context(spec, context)  # type: ignore[misc]
            assert line == 7, (path, context)
            assert column == (args[2] if "column" in msgid else None), (path, context)
            read += 1
    assert read == 4 * len(catalogues)


def test_a_database_that_keeps_execute_from_public_still_runs(
    run_flow, empty_db_url, pg_admin_url, months
):
    """ALTER DEFAULT PRIVILEGES ... REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC, a common
    hardening: the ingest login could not call streamflow_schema_version(), which 001
    left to PUBLIC, and every run failed with "permission denied for function" and the
    advice to grant a role it had (upgrade audit)."""
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute("ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC")
    rc, _, err = run_flow(empty_db_url, months / "month_000", JAN)  # a superuser: the schema
    assert rc == 0, err[-3000:]
    with member_login(empty_db_url, pg_admin_url, "streamflow_ingest", "pw") as url:
        rc, _, err = run_flow(url, months / "month_001", FEB)
        assert rc == 0, err[-3000:]


def test_a_server_out_of_connections_is_named(db_url):
    """A superuser login (the embedded server's) at the server's max_connections gets
    "sorry, too many clients already", which read as "the database could not be
    reached" (review): it is named as the connection limit."""
    from streamflow import diagnosis

    limit = int(scalar(db_url, "SHOW max_connections"))  # type: ignore[arg-type]
    if limit > 200:
        pytest.skip(f"max_connections is {limit}: too many sessions to open for a test")
    held: list[psycopg.Connection] = []
    try:
        with pytest.raises(psycopg.OperationalError) as refused:
            for _ in range(limit + 1):
                held.append(psycopg.connect(db_url))
    finally:
        for conn in held:
            conn.close()
    words = diagnosis.explain_failure(refused.value)
    assert "too many clients already" in str(refused.value)
    assert words is not None and words.startswith("the database took no more connections"), words


def test_a_server_without_wal_for_new_tables_publishes_the_same_months(
    run_flow, db_url, months, tmp_path
):
    """wal_level=minimal (docs/stack.md, optional): the month partitions, created and
    filled by the publishing transaction, then write no WAL and are synced at the
    commit. The same runs (a first month, the next on top, that month replaced, a
    backfill) give the same tables as on the default server."""
    import pgserver
    from streamflow import embedded

    pgdata = tmp_path / "pgdata"
    server = pgserver.get_server(pgdata, cleanup_mode="delete")
    try:
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET wal_level = minimal")
            conn.execute("ALTER SYSTEM SET max_wal_senders = 0")
        embedded.stop(pgdata)  # wal_level is read at the server's start only
        embedded._forget_instance(pgdata)
        server = pgserver.get_server(pgdata, cleanup_mode="delete")
        minimal = server.get_uri()
        assert scalar(minimal, "SHOW wal_level") == "minimal"
        replaced = with_value(months, tmp_path / "feb", "labels.csv", "churn_label", "True", 5)
        older = with_value(months, tmp_path / "dec", "usage_agg_30d.csv", "watch_hours_30d", "1")
        for url in (db_url, minimal):
            assert run_flow(url, months / "month_000", JAN)[0] == 0
            assert run_flow(url, months / "month_001", FEB)[0] == 0
            assert run_flow(url, replaced, FEB, "--replace")[0] == 0
            assert run_flow(url, older, "2023-12-31")[0] == 0

        assert dump(minimal, DATA_TABLES) == dump(db_url, DATA_TABLES)
        assert scalar(minimal, "SELECT count(DISTINCT as_of) FROM labels_snapshots") == 3
    finally:
        server.cleanup()
