"""A COPY error in people's words: the file, the line (counted as an editor does), the
column, the value and what was expected; COPY's own context read in English or in the
server's language. The files are read again to say it, on the error path only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import psycopg

from .errors import clipped_quotes
from .file_lines import undecodable_column
from .registry import MAX_HEADER_BYTES, TableSpec

# COPY's words for a file whose lines do not all end alike (a CR or LF where the
# first line's ending says the line goes on).
_LINE_END_ERRORS = ("unquoted carriage return found in data", "unquoted newline found in data")
# COPY's words for a row with more or fewer values than the header has columns.
_FIELD_COUNT_ERRORS = ("extra data after last expected column", "missing data for column")
# What COPY says of a blank line: one empty field where the table has several, or,
# in a file whose rows end in LF (CRLF), a line that is only CRLF (LF).
_BLANK_LINE_ERRORS = ("missing data for column", *_LINE_END_ERRORS)
_COPY_CONTEXT = re.compile(r"COPY \S+, line (\d+)(?:, column (\w+))?(?:: \"(.*)\")?", re.DOTALL)
# A server whose lc_messages is not English words the context in its language ("COPY
# users, ligne 5, colonne signup_date : « … »", "usersのCOPY、行 5、列 …"): the line is
# then the first number standing alone (a table's name holds digits: usage_agg_30d),
# and the column, one of the table's own names between it and the colon before the
# value or row shown (which may hold any word).
_ALONE = "(?<![0-9A-Za-z_]){}(?![0-9A-Za-z_])"
_NUMBER_ALONE = re.compile(_ALONE.format(r"(\d+)"))


def explain_copy_error(
    spec: TableSpec,
    file: str,
    exc: psycopg.Error,
    path: Path | None = None,
    header: Sequence[str] = (),
) -> str:
    """Turn PostgreSQL's COPY error into: file, line, column, value, expected type.

    ``path`` (the file) is read again only on this error path: to name a row by its
    first line, to tell a blank line from a short row when PostgreSQL's error does not
    show the line, and to find the column holding a byte that is not UTF-8 text.
    ``header``: the file's columns, in its order.
    """
    diag = exc.diag
    primary = clipped_quotes((diag.message_primary or str(exc)).strip())
    context = copy_context(spec, diag.context or "")
    if primary.startswith("unterminated CSV quoted field") and path is not None:
        opened = _unclosed_quote_line(path)
        if opened is not None:
            return (
                f"{file}, line {opened}: a quoted field opens on this line and is never "
                'closed (a quote inside a field is written "")'
            )
    where = file
    expected = ""
    line = None
    if context is not None:
        copy_line, column, shown = context
        line = _row_line(path, copy_line)
        where += f", line {line}"
        if column:
            where += f", column {column}"
            try:
                col = spec.column(column)
                expected = f" (expected {_SPELLED.get(col.pg_type, col.pg_type)}"
                expected += ", required)" if col.required else ", empty for NULL)"
            except KeyError:
                pass
        elif primary.startswith(_BLANK_LINE_ERRORS) and _blank_line(shown, path, line):
            return f"{where}: blank line (every line after the header is one user's row)"
        elif primary.startswith(_LINE_END_ERRORS):  # mixed line ends, most often
            return (
                f"{where}: {primary}: the file mixes CRLF and LF line ends, or a value holds "
                "a CR or LF without being quoted (expected one kind of line end throughout, "
                "and a line end inside a value quoted)"
            )
        elif header and primary.startswith(_FIELD_COUNT_ERRORS):
            expected = f" (expected {len(header)} values a row, as the header: {','.join(header)})"
    if isinstance(exc, psycopg.errors.CharacterNotInRepertoire):
        # The encoding is checked before the row is split in values: COPY names no column.
        if path is not None and line is not None and ", column" not in where:
            column = undecodable_column(path, line, list(header))
            where += f", column {column}" if column else ""
        if primary.endswith(": 0x00"):  # valid UTF-8, but no PostgreSQL text holds it
            return f"{where}: a NUL byte (0x00), which no text value can hold"
        return f"{where}: {primary} (the file must be UTF-8 text)"
    if isinstance(exc, psycopg.errors.NotNullViolation):
        column = diag.column_name or "user_id"
        where = where if ", column" in where else f"{where}, column {column}"
        return f"{where}: empty {column}; every row needs one"
    return f"{where}: {primary}{expected}"


def copy_context(spec: TableSpec, context: str) -> tuple[int, str | None, str | None] | None:
    """COPY's error context as (line, column or None, the row or value shown or None),
    in English or, without the row shown, in a server's other language; None without
    a line."""
    english = _COPY_CONTEXT.search(context)
    if english is not None:
        return int(english.group(1)), english.group(2), english.group(3)
    number = _NUMBER_ALONE.search(context)
    if number is None:
        return None
    after = context[number.end() :].split(":", 1)[0]
    named = [
        (found.start(), col.name)
        for col in spec.columns
        if (found := re.search(_ALONE.format(re.escape(col.name)), after)) is not None
    ]
    return int(number.group(1)), min(named)[1] if named else None, None


# Only ISO dates are read the same by every server (db.SESSION_OPTIONS).
_SPELLED = {"date": "a date as YYYY-MM-DD"}


def _row_line(path: Path | None, copy_line: int) -> int:
    """The file line (the header is line 1) where the row COPY calls "line N" starts.

    COPY counts the rows it was sent, plus, inside quoted values, every LF once the
    file's line end is known to be LF, and every CR otherwise (a CRLF file, or the first
    row of any file): it names a row spanning lines by its last one, and every row after
    a bare LF quoted in a CRLF file, or a CR quoted in an LF file's first row, a line off.
    The file is read again, on this error path only, counting the same way by quote
    parity, to name the row by its first line, as the pipeline's other messages do
    (lines counted by their LF, as editors do).
    """
    if path is not None:
        try:
            with path.open("rb") as f:
                f.readline(MAX_HEADER_BYTES + 1)  # the header, as read_header took it
                counted, inside, crlf, line, start = 0, False, None, 2, 2
                for text in f:
                    if not inside:
                        start, counted = line, counted + 1
                    parts = text.split(b'"')
                    quoted = parts[0::2] if inside else parts[1::2]
                    counted += sum(p.count(b"\n" if crlf is False else b"\r") for p in quoted)
                    inside ^= len(parts) % 2 == 0  # an odd number of quotes
                    if not inside:
                        crlf = text.endswith(b"\r\n") if crlf is None else crlf
                        if counted >= copy_line:
                            return start
                    line += 1
        except OSError:
            pass
    return copy_line + 1  # no quoted line ends: COPY's count plus the header


def _unclosed_quote_line(path: Path) -> int | None:
    """The file line where a quoted field that never closes opens, if one does.

    In CSV a quote inside a field is doubled, so the quotes seen so far are odd exactly
    while a field is open; the field left open at the end opened where the count last
    turned odd. Read only after COPY refused the file.
    """
    odd, opened = False, None
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if line.count(b'"') % 2:
                odd = not odd
                if odd:
                    opened = n
    return opened if odd else None


def _blank_line(shown: str | None, path: Path | None, line: int) -> bool:
    """Whether the row COPY choked on is a blank line.

    COPY's error context shows the row it parsed (exact even after quoted fields
    holding newlines), clipped with "..." when long; otherwise file line ``line``
    is read.
    """
    if shown is not None and not shown.endswith("..."):
        return not shown.strip()
    if path is None:
        return False
    with path.open("rb") as f:
        for n, text in enumerate(f, 1):
            if n == line:
                return not text.strip()
    return False
