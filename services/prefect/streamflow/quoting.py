"""Bytes of a file's rows that PostgreSQL's COPY reads otherwise than other CSV readers,
refused as the file streams past: stray quotes, and a line holding only ``\\.``.

COPY takes any quote outside a quoted value for the start of a quoted section and drops
it: ``Fib"er opt"ic`` is staged as ``Fiber optic``, ``A"",`` as ``A``, and ``A",``
opens a section that swallows the next lines; a quote closing a section mid-value
(``"x,"abc``) goes the same way. Other readers (Python's csv module, pandas, a
spreadsheet) keep those quotes, so the month published would not be the file a person
reads. A file quoted as RFC 4180 says (a value quoted whole, each quote inside doubled)
is read alike by all of them.

The rule, per quote, counting the file's quotes from 0: an even one opens a section and
must follow a value's start (a comma, a line end, or the quote before it: ``"a""b"``);
an odd one closes it and must precede a value's end (the same bytes, or the file's
end). A doubled quote inside a value is a close then an open, each well placed.

A line holding only \\. outside a quoted value is COPY's end-of-data marker (PostgreSQL
16): the rows after it were dropped unread, without an error. Its line may end in CR:
rows in CR line ends, or row 1, before COPY knows their style. Inside a quoted value it
is data, as COPY reads it: whether a marker counts is the quotes' parity before it.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import InputError, clipped

_EDGES = b',\r\n"'  # what may touch a quote on its outer side
# From a point outside any quoted section: the longest run of well-placed sections. Not
# possessive (*+), though that keeps no backtracking state: Python before 3.11.3 or so
# (Debian 12's 3.11.2) ends such matches early, and refused "True". The state kept is
# about 150 bytes a section, so slices of _SLICE bytes are matched at a time.
_WELL_PLACED = re.compile(rb'(?:[^"]*(?<![^,\r\n"])"[^"]*"(?![^,\r\n"]))*')
_SLICE = 1 << 16  # a file quoted whole: ~10,000 sections, ~1.5 MB of regex state
_SHOWN = 4096  # bytes read on each side of a refused quote, to show its value
_END_MARKER = re.compile(rb"[\r\n]\\\.[\r\n]")
_END_CARRY = 4  # bytes of the previous chunk searched again: a marker line cut by a read


class QuoteGuard:
    """Judges each chunk of a file's rows as it goes to COPY; raises InputError naming
    the line (and value) of the first quote or end-of-data line COPY would read otherwise.

    A chunk without a quote or a backslash costs two memchr. A quote closing a section
    as the last byte of a chunk is judged with the next chunk's first byte (raising then
    still abandons the COPY, which commits nothing).
    """

    def __init__(self, path: Path, start: int) -> None:
        self.path = path
        self.inside = False  # the bytes fed so far end inside a quoted section
        self._at = start  # file offset of the next chunk
        self._tail = b"\n"  # the bytes before the next chunk: row 1 starts a line
        self._closer: int | None = None  # offset of a closing quote that ended a chunk

    def feed(self, chunk: bytes, last: bool = False) -> None:
        """``last``: the chunk ends the rows (a last line without its line end is one)."""
        self._refuse_end_marker(chunk, last)
        if len(chunk) > _SLICE and b'"' in chunk:
            for at in range(0, len(chunk), _SLICE):
                self._feed(chunk[at : at + _SLICE])
        else:
            self._feed(chunk)

    def _feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._closer is not None:
            if chunk[:1] not in _EDGES:
                self._refuse(self._closer, closing=True)
            self._closer = None
        if b'"' in chunk:
            self._judge(self._tail[-1:] + chunk)
        self._tail = (self._tail + chunk)[-_END_CARRY:]
        self._at += len(chunk)

    def _judge(self, data: bytes) -> None:
        """``data``: the byte before the chunk, then the chunk (which holds a quote)."""
        start = 1
        if self.inside:
            closer = data.index(b'"', start)
            if closer + 1 < len(data) and data[closer + 1 : closer + 2] not in _EDGES:
                self._refuse(self._offset(closer), closing=True)
            start = closer + 1
        end = _WELL_PLACED.match(data, start).end()  # type: ignore[union-attr]
        opener = data.find(b'"', end)
        if opener < 0:
            self.inside = False
            if data.endswith(b'"'):  # a closing quote, its next byte not read yet
                self._closer = self._offset(len(data) - 1)
            return
        if data[opener - 1 : opener] not in _EDGES:
            self._refuse(self._offset(opener), closing=False)
        closer = data.find(b'"', opener + 1)
        if closer < 0:
            self.inside = True  # the section goes on in the next chunk
            return
        # The match stopped before a well-placed opener, so at its closer, whose next
        # byte is read (the end of ``data`` would have matched).
        self._refuse(self._offset(closer), closing=True)

    def _refuse_end_marker(self, chunk: bytes, last: bool) -> None:
        """The first line of ``chunk`` holding only \\. outside a quoted value, searched
        with the bytes read before it (a marker cut by a read)."""
        tail = self._tail
        if b"\\" not in chunk and b"\\" not in tail:  # one memchr: ~2 ms for 60 MB of rows
            return
        data = tail + chunk + (b"\n" if last else b"")
        quotes = int(self.inside) - tail.count(b'"')  # only its parity counts
        counted = 0
        for marker in _END_MARKER.finditer(data):
            if marker.end() <= len(tail):  # searched with the previous chunk
                continue
            quotes += data.count(b'"', counted, marker.start())
            counted = marker.start()
            if quotes % 2 == 0:
                line = _line_at(self.path, self._at + marker.start() + 1 - len(tail))
                raise InputError(
                    f"{self.path.name}, line {line}: a line holding only \\., which "
                    "PostgreSQL takes for the end of the data: the rows after it would be "
                    "dropped unread; expected a row, or the file to end there"
                )

    def _offset(self, index: int) -> int:
        return self._at + index - 1

    def _refuse(self, offset: int, closing: bool) -> None:
        line, value = _line_and_value(self.path, offset, closing)
        raise InputError(
            f"{self.path.name}, line {line}: a quote inside a value ({clipped(value)!r}); "
            'expected a value holding quotes to be quoted whole, each quote doubled ("a""b"): '
            "PostgreSQL would read this one otherwise than other CSV readers"
        )


def _line_at(path: Path, offset: int) -> int:
    """The file line (LF counted, as editors do) that byte ``offset`` is on."""
    line, left = 1, offset
    with path.open("rb") as f:
        while left > 0 and (chunk := f.read(min(1 << 20, left))):
            line += chunk.count(b"\n")
            left -= len(chunk)
    return line


def _line_and_value(path: Path, offset: int, closing: bool) -> tuple[int, str]:
    """The line of the quote at byte ``offset``, and its value as a reader that keeps
    stray quotes shows it: from the quote that opened it, when ``closing`` (back past
    its doubled quotes), else from the comma or line end before it, up to the comma or
    line end after the quote."""
    skip = max(offset - _SHOWN, 0)
    with path.open("rb") as f:
        f.seek(skip)
        near = f.read(offset - skip + _SHOWN)
    at = begin = offset - skip
    if closing:  # the quotes before it pair up as open, close: "a""b" is one value
        while (begin := near.rfind(b'"', 0, begin)) > 0 and near[begin - 1] == ord('"'):
            begin -= 1
    if begin < 0 or not closing:  # an opener, or one too far back to be shown
        begin = max(near.rfind(edge, 0, at) for edge in (b",", b"\n", b"\r")) + 1
    ends = [i for edge in (b",", b"\n", b"\r") if (i := near.find(edge, at + 1)) >= 0]
    value = near[begin : min(ends, default=len(near))].decode("utf-8", "replace")
    return _line_at(path, offset), value
