"""The pipeline's schema on a database: db/init applied on an empty or older one (as
the postgres image's entrypoint does in Docker), a current one left alone."""

from __future__ import annotations

import re
from collections.abc import Callable

import psycopg

from .db import one_row
from .errors import SchemaOutdated, TablesNotOurs, first_few
from .registry import KEY, TABLES
from .settings import DB_DIR
from .sqlfiles import own_sql, queries


def schema_present(conn: psycopg.Connection) -> bool:
    row = conn.execute(queries("control")["schema_present"]).fetchone()
    return bool(row and row[0])


def apply_init_sql(conn: psycopg.Connection) -> list[str]:
    """Run ``db/init/*.sql`` in name order, as the postgres image's entrypoint does."""
    applied = []
    for path in sorted((DB_DIR / "init").glob("*.sql")):
        conn.execute(own_sql(path.read_text(encoding="utf-8")))
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


def ensure_schema(
    conn: psycopg.Connection, warn: Callable[[str], object] = lambda message: None
) -> list[str]:
    """Apply the init SQL on an empty or older database, or on one of the current
    version that lacks what db/init grants (a dump restored into another cluster);
    leave a current, complete one alone. ``warn`` is told of what is left open when this
    login may not apply it, and of what applying it mended."""
    if schema_present(conn):
        if _schema_version(conn) >= SCHEMA_VERSION:
            missing = grants_not_db_init(conn)
            if not missing:
                return []
            found = first_few([problem for problem, _ in missing])
            because = (
                f"the database's roles or grants are not db/init's ({found}: a restore into "
                "another cluster?)"
            )
        else:
            table, column = NEWEST_COLUMN
            missing = []
            because = (
                "the database was initialised by an older version of this pipeline (no "
                f"{table}.{column}, or db/init's version below {SCHEMA_VERSION})"
            )
        refuse_tables_not_ours(conn)
        try:
            applied = apply_init_sql(conn)
        except psycopg.errors.InsufficientPrivilege as exc:
            conn.rollback()
            if missing and not any(breaks_runs for _, breaks_runs in missing):
                warn(f"{because}: have a superuser run {_APPLY_ONCE}")
                return []
            raise SchemaOutdated(
                f"{because}, and this login may not update it: have a superuser (the login "
                f"that initialised it; POSTGRES_USER in Docker) run {_APPLY_ONCE}. PostgreSQL "
                f"said: {exc.diag.message_primary}"
            ) from exc
        if missing:
            warn(f"db/init/001_schema.sql applied again: {because}")
        return applied
    refuse_tables_not_ours(conn)
    return apply_init_sql(conn)


_APPLY_ONCE = "db/init/001_schema.sql once (it is idempotent)"


def grants_not_db_init(conn: psycopg.Connection) -> list[tuple[str, bool]]:
    """(what is missing, whether a run would fail on it), in a database of the current
    version: roles and the parameter grant live in the cluster, not in a dump."""
    rows = conn.execute(queries("control")["grants_not_db_init"]).fetchall()
    conn.rollback()
    return [(problem, breaks_runs) for problem, breaks_runs in rows]


def _expected_columns() -> list[tuple[str, str | None]]:
    """(table, column) the pipeline writes; (history table, None): partitioned by as_of."""
    expected: list[tuple[str, str | None]] = []
    for t in TABLES:
        expected += [(t.name, c) for c in t.column_names]
        if t.snapshot_table:
            expected.append((t.snapshot_table, None))
            expected += [(t.snapshot_table, c) for c in (KEY, "as_of", *t.snapshot_columns)]
    return expected


def refuse_tables_not_ours(conn: psycopg.Connection) -> None:
    """Raise TablesNotOurs, before db/init touches the database, if it holds tables of
    the pipeline's names in another shape."""
    expected = _expected_columns()
    found = conn.execute(
        queries("control")["tables_not_ours"],
        {"tables": [t for t, _ in expected], "columns": [c for _, c in expected]},
    ).fetchall()
    conn.rollback()
    if not found:
        return
    shown = [
        f"{table} is not partitioned by as_of" if column is None else f"{table} has no {column}"
        for table, column in found
    ]
    raise TablesNotOurs(
        "this database already has tables of the pipeline's names that it did not create "
        f"(the lab's own schema?): {first_few(shown)}. Nothing was changed: move them to a "
        "schema of their own or use an empty database (docs/stack.md, 'Coming from the "
        "lab's database')"
    )


def _schema_version(conn: psycopg.Connection) -> int:
    """streamflow_schema_version(), 0 without it or without NEWEST_COLUMN."""
    q = queries("control")
    table, column = NEWEST_COLUMN
    present = one_row(
        conn.execute(
            q["schema_is_current"], {"signature": NEWEST_OBJECT, "table": table, "column": column}
        )
    )
    version = one_row(conn.execute(q["schema_version"]))[0] if present[0] else 0
    conn.rollback()
    return version
