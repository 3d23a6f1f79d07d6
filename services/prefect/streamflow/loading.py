"""Extract: stream one CSV into its staging table through PostgreSQL COPY.

The header is matched by name against the registry (any order, BOM and CRLF
tolerated); the data rows are streamed untouched, in chunks, so memory does not
grow with the file. PostgreSQL does every type conversion, and an empty cell
stays NULL.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from .db import ident_list, query
from .errors import InputError
from .registry import TableSpec

CHUNK_BYTES = 1 << 20
_BOM = b"\xef\xbb\xbf"
_COPY_CONTEXT = re.compile(r"line (\d+)(?:, column (\w+))?(?:: \"(.*)\")?", re.DOTALL)


@dataclass(frozen=True)
class StagedFile:
    table: str
    path: str
    rows: int


def read_header(spec: TableSpec, path: Path) -> tuple[list[str], int]:
    """The file's columns, checked against the registry, and the byte offset of row 1."""
    with path.open("rb") as f:
        first = f.readline()
    if not first.strip(b"\r\n\t " + _BOM):
        raise InputError(
            f"{path.name}: file is empty; expected a header line: {','.join(spec.column_names)}"
        )
    offset = len(first)
    line = first[len(_BOM) :] if first.startswith(_BOM) else first
    try:
        text = line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path.name}: header line is not UTF-8 text ({exc.reason})") from exc
    header = next(csv.reader([text]))
    _check_header(spec, path.name, header)
    return header, offset


def _check_header(spec: TableSpec, file: str, header: list[str]) -> None:
    expected = spec.column_names
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise InputError(f"{file}: column {name!r} appears twice in the header")
        seen.add(name)
    missing = [c for c in expected if c not in seen]
    unknown = [c for c in header if c not in expected]
    if missing or unknown:
        parts = []
        if unknown:
            parts.append("unexpected column " + ", ".join(repr(_clip(c)) for c in unknown))
        if missing:
            parts.append("missing column " + ", ".join(repr(c) for c in missing))
        raise InputError(f"{file}: {'; '.join(parts)} (expected columns: {','.join(expected)})")


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def stage_file(conn: psycopg.Connection, spec: TableSpec, path: Path) -> StagedFile:
    """Replace ``staging.<table>`` with the rows of ``path``, in one committed transaction."""
    header, offset = read_header(spec, path)
    staged = sql.Identifier("staging", spec.name)
    # The column list is the registry's names in the file's order: header text is
    # only ever compared with registry names, never spliced into SQL.
    columns = [spec.column(name).name for name in header]
    try:
        with conn.cursor() as cur:
            cur.execute(query("staging", "truncate", staged=staged))
            copy = query("staging", "copy_csv", staged=staged, columns=ident_list(columns))
            with path.open("rb") as f, cur.copy(copy) as cp:
                f.seek(offset)
                while chunk := f.read(CHUNK_BYTES):
                    cp.write(chunk)
            rows = cur.rowcount
        conn.commit()
    except psycopg.errors.DataError as exc:
        conn.rollback()
        raise InputError(explain_copy_error(spec, path.name, exc)) from exc
    except psycopg.errors.IntegrityError as exc:  # NOT NULL on user_id
        conn.rollback()
        raise InputError(explain_copy_error(spec, path.name, exc)) from exc
    return StagedFile(spec.name, str(path), rows)


def explain_copy_error(spec: TableSpec, file: str, exc: psycopg.Error) -> str:
    """Turn PostgreSQL's COPY error into: file, line, column, value, expected type."""
    diag = exc.diag
    primary = (diag.message_primary or str(exc)).strip()
    match = _COPY_CONTEXT.search(diag.context or "")
    where = file
    expected = ""
    if match:
        # COPY numbers the rows it was sent; the header we skipped is file line 1.
        where += f", line {int(match.group(1)) + 1}"
        column = match.group(2)
        if column:
            where += f", column {column}"
            try:
                col = spec.column(column)
                expected = f" (expected {col.pg_type}"
                expected += ", empty for NULL)" if column != "user_id" else ", required)"
            except KeyError:
                pass
    if isinstance(exc, psycopg.errors.NotNullViolation):
        column = diag.column_name or "user_id"
        where = where if ", column" in where else f"{where}, column {column}"
        return f"{where}: empty {column}; every row needs one"
    return f"{where}: {primary}{expected}"
