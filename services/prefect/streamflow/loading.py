"""Extract: stream one CSV into its staging table through PostgreSQL COPY.

The header is matched by name against the registry (any order, BOM and CRLF
tolerated); the data rows are streamed untouched, in chunks, so memory does not
grow with the file, except blank lines after the last row (an export artifact
the lab's pandas loader skipped), which are left out. PostgreSQL does every type
conversion, and an empty cell stays NULL.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import psycopg
from psycopg import sql

from .copy_errors import explain_copy_error
from .errors import InputError, clipped, first_few, unreadable
from .file_lines import rows_with_lines
from .fingerprints import is_hashed_file
from .locking import check_writer_lock
from .quoting import QuoteGuard
from .registry import KEY, MAX_HEADER_BYTES, TABLES, TableSpec
from .sqlfiles import ident_list, queries, query, staged

CHUNK_BYTES = 1 << 20
_BOM = b"\xef\xbb\xbf"
_BLANK = b" \t\r\n"


@dataclass(frozen=True)
class StagedFile:
    table: str
    rows: int


def read_header(spec: TableSpec, path: Path) -> tuple[list[str], int]:
    """The file's columns, checked against the registry, and the byte offset of row 1."""
    try:
        with path.open("rb") as f:
            first = f.readline(MAX_HEADER_BYTES + 1)
            blank_file = not first.strip(b"\r\n\t " + _BOM) and _blank_from_here(f)
    except OSError as exc:
        raise unreadable(path, exc) from exc
    expected = ",".join(spec.column_names)
    if blank_file:
        raise InputError(f"{path.name}: file is empty; expected a header line: {expected}")
    if not first.strip(b"\r\n\t " + _BOM):  # rows below: not "empty"
        raise InputError(f"{path.name}, line 1: blank; expected the header line: {expected}")
    if b"\x00" in first:  # UTF-16 (Excel's "Unicode text"), or not text at all
        raise InputError(
            f"{path.name}: header line is not UTF-8 text (it holds NUL bytes: UTF-16, or a "
            f"binary file); expected a header line: {expected}"
        )
    if b"\r" in first.rstrip(b"\r\n"):
        raise InputError(
            f"{path.name}: lines end in a carriage return alone (CR, as old Mac exports "
            "write them); expected LF or CRLF line ends"
        )
    if len(first) > MAX_HEADER_BYTES:
        raise InputError(
            f"{path.name}: the first line is over {MAX_HEADER_BYTES // 1024} KB; "
            f"expected a header line: {expected}"
        )
    offset = len(first)
    line = first[len(_BOM) :] if first.startswith(_BOM) else first
    try:
        text = line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path.name}: header line is not UTF-8 text ({exc.reason})") from exc
    try:
        # strict: a quote left open would have the rows start inside a quoted value
        header = next(csv.reader([text], strict=True))
    except csv.Error as exc:
        raise InputError(
            f"{path.name}: header line is not CSV ({exc}); expected {expected}"
        ) from exc
    _check_header(spec, path.name, header)
    return header, offset


def _blank_from_here(f: BinaryIO) -> bool:
    """Whether the rest of the file is only white space, read a chunk at a time."""
    while chunk := f.read(CHUNK_BYTES):
        if chunk.strip(_BLANK):
            return False
    return True


def _check_header(spec: TableSpec, file: str, header: list[str]) -> None:
    expected = spec.column_names
    if not {n.strip().lower() for n in header} & set(expected):
        # Not a header of this file at all (another file, a symlink to something else):
        # its first line is not echoed into logs and the ledger, which readers see. A
        # header of ours in capitals or padded still gets its names shown, below.
        raise InputError(
            f"{file}: the first line is not a {spec.file_name} header: none of its "
            f"{len(header)} field(s) is a column of the file (expected columns: "
            f"{','.join(expected)})"
        )
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise InputError(f"{file}: column {clipped(name)!r} appears twice in the header")
        seen.add(name)
    missing = [c for c in expected if c not in seen]
    unknown = [c for c in header if c not in expected]
    if missing or unknown:
        parts = []
        if unknown:
            parts.append("unexpected column " + first_few([repr(clipped(c)) for c in unknown]))
        if missing:
            parts.append("missing column " + ", ".join(repr(c) for c in missing))
        raise InputError(f"{file}: {'; '.join(parts)} (expected columns: {','.join(expected)})")


def empty_staging(conn: psycopg.Connection) -> None:
    """Empty the six staging tables, in one transaction. For after a month is published;
    a refused month stays staged, to be looked at with SQL, until the next run."""
    tables = sql.SQL(", ").join(staged(spec.name) for spec in TABLES)
    with conn.transaction():
        conn.execute(query("staging", "empty", tables=tables))


def _truncate(cur: psycopg.Cursor, spec: TableSpec, waiting: Callable[[str], object]) -> None:
    """Empty ``staging.<table>``; if another session holds it for a few seconds, say who,
    then wait for it (the run would otherwise seem to hang for as long as a dump runs)."""
    table = staged(spec.name)
    try:
        cur.execute(query("staging", "truncate_or_give_up", staged=table))
        return
    except psycopg.errors.LockNotAvailable:
        cur.execute(queries("staging")["back_before_truncate"])
    holders = cur.execute(queries("staging")["holders"], {"staged": f"staging.{spec.name}"})
    who = first_few([f"pid {pid} ({name})" for pid, name in holders.fetchall()]) or "a session"
    waiting(
        f"{spec.file_name}: waiting for staging.{spec.name}, held by {who} (a pg_dump holds "
        "each table it dumps until it ends); the run goes on when it lets go"
    )
    cur.execute(query("staging", "truncate", staged=table))


def stage_file(
    conn: psycopg.Connection,
    spec: TableSpec,
    path: Path,
    hashed: dict | None = None,
    lock_holder: int | None = None,
    waiting: Callable[[str], object] = lambda message: None,
) -> StagedFile:
    """Replace ``staging.<table>`` with the rows of ``path``, in one committed transaction.

    ``hashed`` is the file's fingerprint (``FileFingerprint.as_json()``): the ledger
    records that hash for the month, so the bytes staged must be those bytes. A file
    rewritten or replaced since it was hashed (an export still being written, a copy
    over it) is refused, and nothing of it is staged.

    ``lock_holder``: the backend pid holding the run's writer lock, checked before the
    commit (``locking.check_writer_lock``).
    ``waiting``: told who holds the staged table when the run has to wait for them.
    """
    header, offset = read_header(spec, path)
    staged_table = staged(spec.name)
    # The column list is the registry's names in the file's order: header text is
    # only ever compared with registry names, never spliced into SQL.
    columns = [spec.column(name).name for name in header]
    try:
        with conn.cursor() as cur:
            _truncate(cur, spec, waiting)
            copy = query("staging", "copy_csv", staged=staged_table, columns=ident_list(columns))
            with path.open("rb") as f, cur.copy(copy) as cp:
                left = _data_end(f, offset) - offset
                f.seek(offset)
                guard = QuoteGuard(path, offset)
                while left > 0 and (chunk := f.read(min(CHUNK_BYTES, left))):
                    guard.feed(chunk, last=len(chunk) == left)  # raising abandons the COPY
                    cp.write(chunk)
                    left -= len(chunk)
                # Inside the COPY: raising here abandons it.
                if hashed is not None and not is_hashed_file(hashed, os.fstat(f.fileno())):
                    raise InputError(
                        f"{path.name}: changed while the run was reading it (it is not the "
                        "file whose sha256 the run recorded); nothing was published: rerun "
                        "once the export is complete"
                    )
            rows = cur.rowcount
        check_writer_lock(conn, lock_holder)
        conn.commit()
    except (psycopg.errors.DataError, psycopg.errors.IntegrityError) as exc:  # NOT NULL on user_id
        _roll_back(conn)
        raise InputError(explain_copy_error(spec, path.name, exc, path, columns)) from exc
    except OSError as exc:  # the COPY was abandoned: nothing of the file is staged
        _roll_back(conn)
        raise unreadable(path, exc) from exc
    except InputError:  # raised inside the COPY, which it abandoned
        _roll_back(conn)
        raise
    return StagedFile(spec.name, rows)


def _roll_back(conn: psycopg.Connection) -> None:
    """Undo the failed COPY; a connection the server closed on the error (exit_on_error)
    undid it already, and must not hide the file's error behind "connection lost"."""
    with suppress(psycopg.OperationalError):
        conn.rollback()


def _data_end(f: BinaryIO, start: int) -> int:
    """Offset just past the last line after ``start`` that holds more than whitespace.

    The file is scanned backwards from its end, a chunk at a time, so memory stays
    flat. Only whole lines of spaces, tabs, CR and LF after the last row are cut:
    that row keeps its line end and any trailing spaces (they are data). Whether the
    file ends inside a quoted field (which could hold newlines) does not change, as
    the cut bytes hold no quote: a valid file loses only blank lines, an unterminated
    quoted field is still refused by COPY.
    """
    pos = f.seek(0, os.SEEK_END)
    while pos > start:
        size = min(CHUNK_BYTES, pos - start)
        f.seek(pos - size)
        kept = f.read(size).rstrip(_BLANK)
        if kept:
            last = pos - size + len(kept)  # just past the last non-blank byte
            f.seek(last)
            while tail := f.read(CHUNK_BYTES):  # whitespace only from here on
                if (eol := tail.find(b"\n")) >= 0:
                    return last + eol + 1
                last += len(tail)
            return last  # the last row has no line end: keep it whole
        pos -= size
    return start


def key_lines(spec: TableSpec, path: Path, copies: Mapping[str, int]) -> dict[str, list[int]]:
    """The file lines (the header is line 1) whose user_id is one of ``copies``' keys.

    A duplicated user_id is named by the lines that hold it, so the file is read again,
    only when validation found one, and only until every copy is found (a failed value
    check's rows too, by their user_id). The file may have changed since it was staged,
    or hold a value too long to read again: the caller trusts the lines only if it finds
    every copy, and the search ends at a row the csv module refuses.
    """
    header, _ = read_header(spec, path)
    column = header.index(KEY)
    found: dict[str, list[int]] = {k: [] for k in copies}
    left = sum(copies.values())
    with suppress(csv.Error, InputError, UnicodeDecodeError), rows_with_lines(path) as rows:
        for start, row in rows:
            key = row[column] if len(row) > column else None
            if key in found:
                found[key].append(start)
                left -= 1
                if left <= 0:
                    break
    return found
