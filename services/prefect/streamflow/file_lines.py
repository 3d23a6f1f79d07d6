"""A staged file's rows read again, each with the file line it starts on, to name rows
in messages: on the error path only (staging keeps no line numbers).

Python's csv module, strict, reads a file as COPY does once the QuoteGuard let it
through (tests/test_bad_inputs.py checks both against each other): the bytes read again
go through a guard of their own, as the file may have changed since it was staged, and
reading stops where it, or the csv module, refuses them. Callers trust a line only when
it answers what they asked (every copy of a user_id found, the row found).
"""

from __future__ import annotations

import csv
import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError
from .quoting import QuoteGuard
from .registry import MAX_HEADER_BYTES

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

# Each value is held in memory while read again: 16M characters and more end the reading
# (the csv module's default, 131,072, ended it at values that COPY takes: up to 1 GB).
FIELD_LIMIT = 16 << 20

NumberedRow = tuple[int, list[str]]


@contextmanager
def rows_with_lines(path: Path, *, undecodable: bool = False) -> Iterator[Iterator[NumberedRow]]:
    """The rows after the header, as (file line the row starts on, values).

    Lines are counted by their LF, as editors do: the header is line 1, a quoted value
    holding a line end makes its row span lines (a CR alone inside quotes ends none,
    where the csv module's ``line_num`` counts one). ``undecodable``: bytes that are not
    UTF-8 are read as lone surrogates (U+DC80-U+DCFF) instead of raising, to find them.
    Raises csv.Error at a row the csv module refuses, InputError at a quote COPY reads
    otherwise, UnicodeDecodeError, OSError.
    """
    with _field_limit_raised(), path.open("rb") as f:
        f.readline(MAX_HEADER_BYTES + 1)  # the header, as loading.read_header took it
        text = io.TextIOWrapper(
            io.BufferedReader(_Guarded(f, QuoteGuard(path, f.tell()))),
            encoding="utf-8",
            errors="surrogateescape" if undecodable else "strict",
            newline="",
        )
        yield _numbered(csv.reader(text, strict=True))


# The csv module's limit is process-wide, and staging's threads may read two files at
# once: raised while any of them reads, given back when the last one is done.
_readers = 0
_readers_lock = threading.Lock()
_default_limit = 0


@contextmanager
def _field_limit_raised() -> Iterator[None]:
    global _readers, _default_limit
    with _readers_lock:
        if _readers == 0:
            _default_limit = csv.field_size_limit(FIELD_LIMIT)
        _readers += 1
    try:
        yield
    finally:
        with _readers_lock:
            _readers -= 1
            if _readers == 0:
                csv.field_size_limit(_default_limit)


class _Guarded(io.RawIOBase):
    """A file's bytes, each read judged by a QuoteGuard first, as staging judges them;
    its end (its last line without a line end, a \\. there) once the file has no more."""

    def __init__(self, f: io.BufferedReader, guard: QuoteGuard) -> None:
        self._f, self._guard, self._ended = f, guard, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        n = self._f.readinto(buffer)
        if n or not self._ended:
            self._ended = n == 0
            self._guard.feed(bytes(memoryview(buffer)[:n]), last=self._ended)
        return n


def _numbered(reader: Iterator[list[str]]) -> Iterator[NumberedRow]:
    end = 1
    for row in reader:
        start = end + 1
        end = start + sum(value.count("\n") for value in row)
        yield start, row


def undecodable_column(path: Path, line: int, columns: list[str]) -> str | None:
    """The column of the first value, in the row starting on file ``line``, that holds a
    byte no UTF-8 text holds or a NUL; None if not found (the row starts elsewhere, the
    file cannot be read again)."""
    try:
        with rows_with_lines(path, undecodable=True) as rows:
            for start, row in rows:
                if start > line:
                    return None
                if start == line:
                    for name, value in zip(columns, row, strict=False):
                        if "\x00" in value or any("\udc80" <= c <= "\udcff" for c in value):
                            return name
                    return None
    except (csv.Error, InputError, OSError):
        pass
    return None
