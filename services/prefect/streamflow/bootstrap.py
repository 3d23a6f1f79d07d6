"""The pipeline's schema on a database: db/init applied on an empty or older one (as
the postgres image's entrypoint does in Docker), or on a current one that lost what
db/init grants; a current, complete one left alone."""

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
    return bool(one_row(conn.execute(queries("control")["schema_present"]))[0])


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
    """Apply the init SQL on an empty or older database, or on one of this version that
    lacks what db/init grants (a dump restored into another cluster); leave a complete
    one, or a newer version's, alone. ``warn`` hears what was mended, or left open."""
    if not schema_present(conn):
        refuse_tables_not_ours(conn)
        return apply_init_sql(conn)
    version = _schema_version(conn)
    if version > SCHEMA_VERSION:
        return []  # a newer pipeline's: its functions must not go back (docs/stack.md)
    if version == SCHEMA_VERSION:
        return _mend_grants(conn, warn)
    refuse_tables_not_ours(conn)
    try:
        return apply_init_sql(conn)
    except psycopg.errors.InsufficientPrivilege as exc:
        conn.rollback()
        table, column = NEWEST_COLUMN
        raise SchemaOutdated(
            "the database was initialised by an older version of this pipeline (no "
            f"{table}.{column}, or db/init's version below {SCHEMA_VERSION}), and this login "
            f"may not update it: {_ASK_SUPERUSER}. PostgreSQL said: {exc.diag.message_primary}"
        ) from exc


_ASK_SUPERUSER = (
    "have a superuser (the login that initialised it; POSTGRES_USER in Docker) run "
    "db/init/001_schema.sql once (it is idempotent)"
)


def _mend_grants(conn: psycopg.Connection, warn: Callable[[str], object]) -> list[str]:
    """A superuser's run applies db/init again where a grant or role is missing; another
    login's run is refused if it would fail on what is missing, else warned. A login
    that may not apply db/init never tries (each try would be an error in the server's
    log, and take table locks first)."""
    missing = grants_not_db_init(conn)
    if not missing:
        return []
    because = (
        f"the database's roles or grants are not db/init's ({_listed(missing)}: a restore "
        "into another cluster?)"
    )
    if conn.info.parameter_status("is_superuser") == "on":
        applied = apply_init_sql(conn)
        still = grants_not_db_init(conn)
        if any(breaks_runs for _, breaks_runs in still):
            raise SchemaOutdated(
                f"{because}; db/init/001_schema.sql was applied again and still leaves "
                f"{_listed(still)}"
            )
        warn(
            f"db/init/001_schema.sql applied again (the two groups' privileges are its own "
            f"again): {because}" + (f"; still {_listed(still)}" if still else "")
        )
        return applied
    if any(breaks_runs for _, breaks_runs in missing):
        raise SchemaOutdated(f"{because}, and this login may not update it: {_ASK_SUPERUSER}")
    warn(f"{because}: {_ASK_SUPERUSER}")
    return []


def _listed(problems: list[tuple[str, bool]]) -> str:
    return first_few([problem for problem, _ in problems])


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
        f"(the lab's own schema?): {first_few(shown)}. Nothing was changed: move all of the "
        "lab's tables to a schema of their own, or use an empty database (docs/stack.md, "
        "'Coming from the lab's database')"
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
