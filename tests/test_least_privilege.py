"""The flow runs as a login that is only a member of streamflow_ingest (the group role
of db/init/001_schema.sql): it can publish months, and cannot drop, alter or truncate
live data nor create roles. And SQL is never built from file content: identifiers
come from the table registry only (checked on the source).
"""

from __future__ import annotations

import ast
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import FLOW_DIR, member_login, scalar
from month_files import AS_OF, read_rows, small_months, write_rows
from psycopg import sql
from streamflow.registry import TABLES

JAN, FEB = AS_OF["month_000"], AS_OF["month_001"]


@pytest.fixture(scope="module")
def months(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_months(tmp_path_factory.mktemp("small"))


@pytest.fixture
def ingest_url(db_url: str, pg_admin_url: str) -> Iterator[str]:
    """A LOGIN role whose only privilege is membership in streamflow_ingest."""
    # quoting in URLs and SQL must hold
    with member_login(db_url, pg_admin_url, "streamflow_ingest", "s3cret pw'\"$") as url:
        yield url


def test_ingest_role_publishes_months(run_flow, ingest_url, months, tmp_path):
    assert (
        scalar(
            ingest_url,
            "SELECT rolsuper OR rolcreaterole OR rolcreatedb FROM pg_roles "
            "WHERE rolname = current_user",
        )
        is False
    )
    for month, as_of in (("month_000", JAN), ("month_001", FEB)):
        rc, out, err = run_flow(ingest_url, months / month, as_of)
        assert rc == 0, err[-3000:]
    # --replace deletes history rows of that as_of: granted on history only.
    other = tmp_path / "other"
    shutil.copytree(months / "month_001", other)
    for spec in TABLES:
        rows = read_rows(other / spec.file_name)
        del rows[3]
        write_rows(other / spec.file_name, rows)
    rc, out, err = run_flow(ingest_url, other, FEB, "--replace")
    assert rc == 0, err[-3000:]
    feb_labels = "SELECT count(*) FROM labels_snapshots WHERE as_of = %s"
    assert scalar(ingest_url, feb_labels, (FEB,)) == 199
    assert scalar(ingest_url, "SELECT count(*) FROM users") == 200
    statuses = scalar(ingest_url, "SELECT array_agg(status ORDER BY run_id) FROM ingest_runs")
    assert statuses == ["succeeded"] * 3


FORBIDDEN = {
    "drop_table": "DROP TABLE users",
    "drop_history": "DROP TABLE labels_snapshots",
    "alter_table": "ALTER TABLE users ADD COLUMN pwned text",
    "alter_owner": "ALTER TABLE users OWNER TO current_user",
    "create_role": "CREATE ROLE sf_pwned LOGIN SUPERUSER",
    "create_plain_role": "CREATE ROLE sf_pwned_too",
    "truncate_live": "TRUNCATE users CASCADE",
    "truncate_history": "TRUNCATE labels_snapshots",
    "delete_live": "DELETE FROM users",
    "delete_ledger": "DELETE FROM ingest_runs",
    "create_table": "CREATE TABLE public.pwned (x int)",
    "drop_schema": "DROP SCHEMA staging CASCADE",
    "become_superuser": "ALTER ROLE current_user SUPERUSER",
    "set_role_file_writer": "SET ROLE pg_write_server_files",
    "create_function": "CREATE FUNCTION public.pwned() RETURNS int LANGUAGE sql AS 'SELECT 1'",
}


@pytest.mark.parametrize("statement", list(FORBIDDEN.values()), ids=list(FORBIDDEN))
def test_ingest_role_cannot(statement, ingest_url):
    with psycopg.connect(ingest_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement)  # type: ignore[arg-type]
        assert conn.execute("SELECT to_regclass('public.users') IS NOT NULL").fetchone()[0]
        assert (
            conn.execute(
                "SELECT count(*) FROM information_schema.columns "
                "WHERE table_schema = 'public' AND table_name = 'users'"
            ).fetchone()[0]
            == 6
        )


# --------------------------------------------------------------------------- the readers

READER_FORBIDDEN = {
    "insert_history": "INSERT INTO labels_snapshots VALUES ('x', DATE '2024-01-31', true)",
    "update_history": "UPDATE labels_snapshots SET churn_label = NOT churn_label",
    "delete_history": "DELETE FROM usage_agg_30d_snapshots",
    "update_labels": "UPDATE labels SET churn_label = true",
    "forge_ledger": "UPDATE ingest_months SET fingerprint = 'forged'",
    "read_staging": "SELECT count(*) FROM staging.labels",
    "build_partition": "SELECT streamflow_new_month_partition('labels_snapshots', '2030-01-31')",
    "skip_fk_checks": "SET session_replication_role = replica",
}


@pytest.fixture
def reader_url(db_url: str, pg_admin_url: str) -> Iterator[str]:
    """A LOGIN role whose only privilege is membership in streamflow_reader."""
    with member_login(db_url, pg_admin_url, "streamflow_reader", "pw") as url:
        yield url


def test_a_reader_reads_a_training_set_and_changes_nothing(run_flow, db_url, reader_url, months):
    """The feature store's login: history, labels and the ledger to read; nothing to write,
    no staging (a month there is not validated), no switch off the key checks."""
    assert run_flow(db_url, months / "month_000", JAN)[0] == 0
    training_set = (
        "SELECT count(*) FROM usage_agg_30d_snapshots AS u "
        "JOIN labels_snapshots AS l USING (user_id, as_of) "
        "JOIN ingest_months AS m USING (as_of) WHERE as_of = %s"
    )
    assert scalar(reader_url, training_set, (JAN,)) == 200
    assert scalar(reader_url, "SELECT count(*) FROM labels") == 200
    with psycopg.connect(reader_url, autocommit=True) as conn:
        for name, statement in READER_FORBIDDEN.items():
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)  # type: ignore[arg-type]
                pytest.fail(f"{name}: allowed")


# --------------------------------------------------------------------------- source scan

SOURCES = sorted((FLOW_DIR / "streamflow").glob("*.py")) + [FLOW_DIR / "ingest_flow.py"]
# Every expression the code may pass to sql.Identifier, and why it is a registry name.
IDENTIFIER_SOURCES = {
    "spec.name": "a TableSpec of the registry",
    "spec.snapshot_table": "a TableSpec of the registry",
    "history": "publishing.snapshot, build_history: = spec.snapshot_table (checked below)",
    "partition": "publishing.build_history: returned by streamflow_new_month_partition(), which "
    "builds <history table>_<YYYYMMDD> after checking the table against a fixed list",
    "n": "sqlfiles.ident_list: each of the names its callers pass (checked below)",
    "prefix": "sqlfiles.ident_list: a table alias, a string literal at every call (checked below)",
    "column": "expectations.rows_query: col.name of a registry column (checked below)",
    "c": "expectations.empty_columns_query: each of the registry column names its callers "
    "pass (checked below)",
    "e.table": "ExpectationOutcome.table = spec.name of the suite's TableSpec",
    "e.column": "ExpectationOutcome.column = the column of an expectation built from the registry",
    "table": "sqlfiles.staged: each of the table names its callers pass (checked below)",
}
IDENT_LIST_NAMES = {
    "spec.column_names",
    "spec.value_columns",
    "spec.snapshot_columns",
    "values",  # = spec.value_columns
    "cols",  # = spec.snapshot_columns
    "columns",  # loading: [spec.column(name).name for name in header]: the registry's spelling
}
LITERAL_IDENTIFIERS = {"staging", "excluded", "live", "h", "s", "t"}  # schema, aliases
# Local names used above, and the only value each may be assigned.
ALIASES = {
    "history": {"spec.snapshot_table"},
    "optional": {"[c.name for c in spec.columns if not c.required]"},
    "values": {"spec.value_columns"},
    "cols": {"spec.snapshot_columns"},
    "partition": {"one_row(cur.execute(q['new_month_partition'], params))[0]"},
    "columns": {"[spec.column(name).name for name in header]"},
}
SQL_WORDS = re.compile(
    r"\b(SELECT|INSERT|UPDATE|DELETE|COPY|CREATE|DROP|ALTER|TRUNCATE|GRANT|FROM|WHERE)\b"
)


def _calls(tree: ast.AST, name: str) -> Iterator[ast.Call]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if called == name:
                yield node


def _parsed() -> list[tuple[str, ast.AST]]:
    return [(p.name, ast.parse(p.read_text(encoding="utf-8"))) for p in SOURCES]


def test_identifiers_come_from_the_registry():
    seen = set()
    for file, tree in _parsed():
        for call in _calls(tree, "Identifier"):
            for arg in call.args:
                if isinstance(arg, ast.Constant):
                    assert arg.value in LITERAL_IDENTIFIERS, f"{file}: Identifier({arg.value!r})"
                    continue
                expr = ast.unparse(arg)
                assert expr in IDENTIFIER_SOURCES, f"{file}:{call.lineno}: Identifier({expr})"
                seen.add(expr)
        for call in _calls(tree, "staged"):
            table = ast.unparse(call.args[0])
            assert table in IDENTIFIER_SOURCES, f"{file}:{call.lineno}: staged({table})"
            assert table != "table", f"{file}:{call.lineno}"
        for call in _calls(tree, "ident_list"):
            names = ast.unparse(call.args[0])
            assert names in IDENT_LIST_NAMES, f"{file}:{call.lineno}: ident_list({names})"
            for prefix in call.args[1:]:
                assert isinstance(prefix, ast.Constant), f"{file}:{call.lineno}"
                assert prefix.value in LITERAL_IDENTIFIERS
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name) and target.id in ALIASES:
                        value = ast.unparse(node.value)
                        assert value in ALIASES[target.id], (
                            f"{file}:{node.lineno}: {target.id} = {value}"
                        )
        for call in _calls(tree, "rows_query"):
            if len(call.args) > 1:
                assert ast.unparse(call.args[1]) == "col.name", f"{file}:{call.lineno}"
        for call in _calls(tree, "empty_columns_query"):
            assert ast.unparse(call.args[0]) in {
                "optional",
                "[c.name for c in spec.columns if not c.required]",
            }, f"{file}:{call.lineno}"
    assert seen >= {"spec.name", "n"}  # the scan found the real call sites
    # Registry names are plain lower-case words: nothing to quote, nothing to inject.
    for spec in TABLES:
        for name in (spec.name, spec.snapshot_table or "x", *spec.column_names):
            assert re.fullmatch(r"[a-z_][a-z0-9_]*", name), name


def test_no_sql_is_built_by_string_formatting():
    """No f-string, %-format or str.format() produces SQL text: SQL lives in db/sql/*.sql."""
    problems = []
    for file, tree in _parsed():
        for node in ast.walk(tree):
            text = None
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            elif (
                isinstance(node, ast.BinOp)
                and isinstance(node.op, ast.Mod)
                and isinstance(node.left, ast.Constant)
                and isinstance(node.left.value, str)
            ):
                text = node.left.value
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "format"
                and isinstance(node.func.value, ast.Constant)
                and isinstance(node.func.value.value, str)
            ):
                text = node.func.value.value
            if text is not None and SQL_WORDS.search(text):
                problems.append(f"{file}:{node.lineno}: {ast.unparse(node)[:80]}")
        for call in _calls(tree, "execute"):
            arg = call.args[0] if call.args else None
            if isinstance(arg, ast.JoinedStr | ast.BinOp):
                problems.append(f"{file}:{call.lineno}: execute({ast.unparse(arg)[:60]})")
    assert not problems, "\n".join(problems)


HISTORY_ONLY = "not a history table"
KEYED_TO_USERS_ONLY = "not a live table keyed to users"  # users keeps its key: FKs point at it


@pytest.mark.parametrize(
    ("call", "refusal"),
    [
        ("SELECT streamflow_new_month_partition('users', DATE '2024-01-31')", HISTORY_ONLY),
        ("SELECT streamflow_index_month_partition('users', DATE '2024-01-31')", HISTORY_ONLY),
        ("SELECT streamflow_attach_month_partition('users', DATE '2024-01-31')", HISTORY_ONLY),
        # A month that was never built in staging is named, with what was asked of it.
        (
            "SELECT streamflow_index_month_partition('labels_snapshots', DATE '2024-01-31')",
            "no month partition labels_snapshots_20240131 to index",
        ),
        (
            "SELECT streamflow_attach_month_partition('labels_snapshots', DATE '2024-01-31')",
            "no month partition labels_snapshots_20240131 to attach",
        ),
        ("SELECT streamflow_drop_empty_live_key('users')", KEYED_TO_USERS_ONLY),
        ("SELECT streamflow_restore_live_key('users')", KEYED_TO_USERS_ONLY),
        ("SELECT streamflow_drop_empty_live_key('labels_snapshots')", KEYED_TO_USERS_ONLY),
        ("SELECT streamflow_restore_live_key('ingest_runs')", KEYED_TO_USERS_ONLY),
    ],
)
def test_security_definer_functions_only_touch_their_allowlist(ingest_url, call, refusal):
    """The SECURITY DEFINER functions refuse any table outside their allowlist."""
    with psycopg.connect(ingest_url) as conn:
        with pytest.raises(psycopg.errors.RaiseException, match=refusal):
            conn.execute(call)  # type: ignore[arg-type]


def test_only_the_ingest_group_may_call_the_security_definer_functions(db_url, reader_url):
    """They run as their owner, a superuser: PostgreSQL grants EXECUTE on every new
    function to PUBLIC, so each is revoked from PUBLIC and granted to streamflow_ingest
    alone. A reader (or any login of the database) calling one is refused."""
    with psycopg.connect(db_url) as conn:
        granted = conn.execute(
            "SELECT p.proname, coalesce(r.rolname, 'PUBLIC') FROM pg_proc AS p "
            "CROSS JOIN aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) AS a "
            "LEFT JOIN pg_roles AS r ON r.oid = a.grantee "
            "WHERE p.prosecdef AND p.pronamespace = 'public'::regnamespace "
            "AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner "
            "ORDER BY 1, 2"
        ).fetchall()
    functions = {name for name, _ in granted}
    assert len(functions) >= 6, granted  # the month partitions' three, the live keys', ...
    assert granted == [(name, "streamflow_ingest") for name in sorted(functions)]
    with psycopg.connect(reader_url) as conn:
        for name in ("streamflow_drop_staged_months()", "streamflow_drop_empty_live_key('labels')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"SELECT {name}")
            conn.rollback()


def test_live_key_is_only_dropped_from_an_empty_table(run_flow, ingest_url, months):
    with psycopg.connect(ingest_url) as conn:  # empty: dropped, rolled back with the transaction
        assert conn.execute("SELECT streamflow_drop_empty_live_key('labels')").fetchone()[0]
        assert conn.execute("SELECT to_regclass('labels_pkey')").fetchone()[0] is None
        conn.rollback()
    assert scalar(ingest_url, "SELECT to_regclass('labels_pkey')::text") == "labels_pkey"
    keys = "SELECT array_agg(to_regclass(t || '_pkey')::oid ORDER BY t) FROM unnest(%s::text[]) t"
    tables = ([spec.name for spec in TABLES],)
    fresh = scalar(ingest_url, keys, tables)
    rc, _, err = run_flow(ingest_url, months / "month_000", JAN)
    assert rc == 0, err[-3000:]
    # The first load rebuilt every key but users'; a later month rebuilds none.
    loaded = scalar(ingest_url, keys, tables)
    rebuilt = {t for t, a, b in zip(sorted(tables[0]), fresh, loaded, strict=True) if a != b}
    assert rebuilt == {spec.name for spec in TABLES} - {"users"}
    rc, _, err = run_flow(ingest_url, months / "month_001", FEB)
    assert rc == 0, err[-3000:]
    assert scalar(ingest_url, keys, tables) == loaded
    with psycopg.connect(ingest_url) as conn:  # a table in use keeps its key, unlocked
        dropped = conn.execute("SELECT streamflow_drop_empty_live_key('labels')").fetchone()[0]
        assert dropped is False
        locks = "SELECT count(*) FROM pg_locks WHERE relation = 'labels'::regclass AND granted"
        assert conn.execute(locks + " AND mode = 'AccessExclusiveLock'").fetchone()[0] == 0
        key = conn.execute("SELECT to_regclass('labels_pkey')::text").fetchone()[0]
        assert key == "labels_pkey"


@pytest.mark.parametrize("lacks", ["function", "column", "version"])
def test_an_older_schema_is_brought_up_to_date_or_named(
    run_flow, db_url, ingest_url, months, lacks
):
    """A database initialised before the newest db/init objects, or by an older
    version of 001_schema.sql whose function bodies differ (a changed body reached new
    databases only): the owner's run re-applies the idempotent init SQL; a login that
    may not gets a clear error."""
    from streamflow import bootstrap
    from streamflow.errors import SchemaOutdated

    table, column = bootstrap.NEWEST_COLUMN
    drop = {
        "function": f"DROP FUNCTION {bootstrap.NEWEST_OBJECT}",
        "column": f"ALTER TABLE {table} DROP COLUMN {column}",
        "version": (
            "CREATE OR REPLACE FUNCTION streamflow_schema_version() RETURNS integer "
            f"LANGUAGE sql IMMUTABLE AS 'SELECT {bootstrap.SCHEMA_VERSION - 1}'"
        ),
    }[lacks]
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(drop)  # type: ignore[arg-type]
    with psycopg.connect(ingest_url) as conn, pytest.raises(SchemaOutdated) as info:
        bootstrap.ensure_schema(conn)
    assert (
        "have a superuser (the login that initialised it; POSTGRES_USER in Docker) run "
        "db/init/001_schema.sql" in str(info.value)
    )
    rc, _, err = run_flow(ingest_url, months / "month_000", JAN)
    assert rc == 1 and "older version of this pipeline" in err
    with psycopg.connect(db_url) as conn:
        assert bootstrap.ensure_schema(conn) == ["001_schema.sql"]
        assert bootstrap.ensure_schema(conn) == []
    rc, _, err = run_flow(ingest_url, months / "month_000", JAN)
    assert rc == 0, err[-3000:]


def test_a_function_left_to_public_is_a_warning_until_a_superuser_runs(
    run_flow, db_url, ingest_url, months, caplog
):
    """EXECUTE on a function that builds history with its owner's rights, granted to
    PUBLIC (what a restore without the cluster's roles leaves): any login could attach
    partitions through it. The ingest login cannot take it back and still publishes,
    with a warning; a superuser's run applies db/init again, which revokes it."""
    function = "streamflow_new_month_partition(text, date)"
    public_may_run = f"SELECT has_function_privilege('public', '{function}', 'EXECUTE')"
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"GRANT EXECUTE ON FUNCTION {function} TO PUBLIC")  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        rc, _, err = run_flow(ingest_url, months / "month_000", JAN)
    assert rc == 0, err[-3000:]
    assert (
        "the database's roles or grants are not db/init's (PUBLIC may run "
        "streamflow_new_month_partition(text, date), which runs with its owner's rights: a "
        "restore into another cluster?): have a superuser (the login that initialised it; "
        "POSTGRES_USER in Docker) run db/init/001_schema.sql once (it is idempotent)"
    ) in caplog.text
    assert scalar(db_url, public_may_run) is True
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rc, _, err = run_flow(db_url, months / "month_001", FEB)
    assert rc == 0, err[-3000:]
    assert "db/init/001_schema.sql applied again" in caplog.text
    assert scalar(db_url, public_may_run) is False


def test_a_backfill_without_temporary_tables_is_named(run_flow, db_url, ingest_url, months, caplog):
    """A backfill finds its users once, into a temporary table: a database whose
    TEMPORARY privilege the ingest group lacks (revoked from PUBLIC, db/init applied by a
    login that does not own the database) still publishes new months, with a warning,
    and refuses a backfill in words, not with "the login needs the streamflow_ingest
    role"; a superuser's run applies db/init again, which grants it back."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        database = conn.info.dbname
        conn.execute(
            sql.SQL("REVOKE TEMPORARY ON DATABASE {} FROM PUBLIC, streamflow_ingest").format(
                sql.Identifier(database)
            )
        )
    with caplog.at_level(logging.WARNING):
        rc, _, err = run_flow(ingest_url, months / "month_001", FEB)
    assert rc == 0, err[-3000:]
    assert (
        "streamflow_ingest may not create temporary tables in this database, which a "
        "backfill (a month older than the latest) needs"
    ) in caplog.text
    before = scalar(db_url, "SELECT count(*) FROM labels_snapshots")

    rc, _, err = run_flow(ingest_url, months / "month_000", JAN)

    assert rc == 1
    assert err.strip().splitlines()[-1] == (
        "ingest failed: PostgreSQL refused the work: permission denied to create temporary "
        f'tables in database "{database}"; a backfill (a month older than the latest) needs '
        "TEMPORARY on the database: GRANT TEMPORARY ON DATABASE <database> TO streamflow_ingest, "
        "or have its owner apply db/init/001_schema.sql"
    )
    assert scalar(db_url, "SELECT count(*) FROM labels_snapshots") == before
    rc, _, err = run_flow(db_url, months / "month_000", JAN)
    assert rc == 0, err[-3000:]
    temporary = "SELECT has_database_privilege('streamflow_ingest', current_database(), 'TEMP')"
    assert scalar(db_url, temporary) is True


def test_a_grant_db_init_does_not_bring_back_stops_the_run(db_url, monkeypatch):
    """A superuser's run checks again after applying db/init: what is still missing (here
    db/init's apply made a no-op, so staging's USAGE stays revoked) stops the run in
    words, rather than a re-apply on every run and a failure at staging; applied for
    real, the grant is back."""
    from streamflow import bootstrap
    from streamflow.errors import SchemaOutdated

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("REVOKE USAGE ON SCHEMA staging FROM streamflow_ingest")
        monkeypatch.setattr(bootstrap, "apply_init_sql", lambda conn: ["001_schema.sql"])
        with pytest.raises(SchemaOutdated) as info:
            bootstrap.ensure_schema(conn)
        assert str(info.value) == (
            "the database's roles or grants are not db/init's (streamflow_ingest may not use "
            "the staging schema: a restore into another cluster?); db/init/001_schema.sql "
            "was applied again and still leaves streamflow_ingest may not use the staging "
            "schema"
        )
        monkeypatch.undo()
        said: list[str] = []
        assert bootstrap.ensure_schema(conn, warn=said.append) == ["001_schema.sql"]
        assert said == [
            "db/init/001_schema.sql applied again (the two groups' privileges are its own "
            "again): the database's roles or grants are not db/init's (streamflow_ingest may "
            "not use the staging schema: a restore into another cluster?)"
        ]
        usage = "SELECT has_schema_privilege('streamflow_ingest', 'staging', 'USAGE')"
        assert conn.execute(usage).fetchone() == (True,)


def test_the_sql_allowlists_are_the_registrys_tables(db_url):
    """db/init repeats the registry's table names in its allowlists (the partition name,
    the key switch, the leftovers' pattern) and in the catalogue: a table added to one
    and not the other would be refused, or a leftover kept, far from the cause."""
    from streamflow.registry import LIVE_TABLES, PARENT, SNAPSHOT_TABLES

    with psycopg.connect(db_url, autocommit=True) as conn:
        history = {
            name
            for (name,) in conn.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relkind = 'p'"
            )
        }
        assert history == set(SNAPSHOT_TABLES)
        for table in SNAPSHOT_TABLES:
            name = conn.execute(
                "SELECT streamflow_month_partition_name(%s, '2024-01-31')", (table,)
            ).fetchone()[0]
            assert name == f"{table}_20240131"
            conn.execute(sql.SQL("CREATE TABLE staging.{} ()").format(sql.Identifier(name)))
        assert conn.execute("SELECT streamflow_drop_staged_months()").fetchone()[0] == len(
            SNAPSHOT_TABLES
        )
        keyed = [t for t in LIVE_TABLES if t != PARENT.name]
        for table in keyed:
            assert conn.execute("SELECT streamflow_live_key_table(%s)", (table,)).fetchone()[0]
        for wrong in ("users", "ingest_runs"):
            with pytest.raises(psycopg.errors.RaiseException):
                conn.execute("SELECT streamflow_month_partition_name(%s, '2024-01-31')", (wrong,))
        with pytest.raises(psycopg.errors.RaiseException):
            conn.execute("SELECT streamflow_live_key_table('users')")
