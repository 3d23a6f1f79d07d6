"""The pipeline's SQL, kept as SQL: the named queries of db/sql/*.sql, and the quoting
of the identifiers they take (from the table registry, never from file content)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache
from typing import LiteralString

from psycopg import sql

from .settings import DB_DIR

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def own_sql(text: str) -> LiteralString:
    """``text``, SQL of the project's own (a db/ file's, or composed from one), as
    psycopg's ``execute`` and ``sql.SQL`` want their SQL: a ``LiteralString``, which
    text read from a file is not. The project keeps its SQL in files rather than in
    string literals; this is the one place that vouches for it. Never for a value.
    """
    # mypy reads LiteralString as str (it takes this as is, and calls a cast to it
    # redundant); pyright and Pylance do not.
    return text  # pyright: ignore[reportReturnType]


@cache
def queries(file: str) -> dict[str, LiteralString]:
    """Named queries of ``db/sql/<file>.sql``: each block starts with ``-- name: <name>``."""
    text = (DB_DIR / "sql" / f"{file}.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)
    return {
        name: own_sql(body.strip()) for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }


def query(file: str, name: str, **identifiers: sql.Composable) -> sql.Composed:
    """A named query with its ``{placeholders}`` filled by already-quoted identifiers."""
    return sql.SQL(queries(file)[name]).format(**identifiers)


def staged(table: str) -> sql.Identifier:
    """``staging.<table>``: where a registry table's month waits for its verdict."""
    return sql.Identifier("staging", table)


def ident_list(names: Sequence[str], prefix: str | None = None) -> sql.Composed:
    """``a, b`` or ``prefix.a, prefix.b``: names come from the table registry only."""
    if prefix is None:
        return sql.SQL(", ").join(sql.Identifier(n) for n in names)
    return sql.SQL(", ").join(sql.Identifier(prefix, n) for n in names)
