"""What validation found, in words for people: each expectation's outcome, the one
line that names the file, column and examples of the first failure, and the verdict
(``check`` raises ValidationFailed when anything failed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any

from .errors import ValidationFailed, clipped
from .registry import BY_NAME, EARLIEST_DATE, KEY, KEY_MAX_LENGTH, PARENT


class Check(StrEnum):
    """The pipeline's own names for checks GX names generically (its expectation type
    is the name of the others): in the suites' meta, the ledger and the messages."""

    UNIQUE = "unique"
    KEY_SPELLING = "key_spelling"
    KEY_LENGTH = "key_length"
    NOT_NUMBERS = "not_numbers"
    CEILING = "ceiling"
    DATE_RANGE = "date_range"
    ALL_EMPTY = "all_empty"
    ORPHANS = "orphans"
    MISSING_USERS = "missing_users"
    USERS_DROP = "users_drop"
    USERS_KEPT = "users_kept"


@dataclass
class ExpectationOutcome:
    table: str
    expectation: str
    column: str | None
    success: bool
    unexpected_count: int | None = None
    examples: list[str] = field(default_factory=list)
    """Values as written in a file: 'Lifetime' quoted, -2.5 or NaN bare."""
    example_user_ids: list[Any] = field(default_factory=list)
    example_lines: list[list[int]] = field(default_factory=list)
    """The file lines of each example user_id, in its order: every copy of a duplicated
    one; the one row of a failed value check (``locate_rows``). Empty: not looked up."""
    detail: str = ""
    error: str = ""
    """GX could not evaluate the expectation (its exception's first line)."""
    rows_query: str = ""
    """A SQL check's own query (``{batch}`` left in), which finds its rows on failure."""

    def as_dict(self) -> dict:
        d = asdict(self)
        d["example_user_ids"] = [_jsonable(v) for v in self.example_user_ids]
        if not self.example_lines:  # few failures have them: keep the ledger's JSON short
            del d["example_lines"]
        if not self.error:
            del d["error"]
        del d["rows_query"]  # the registry rebuilds it; the ledger keeps what was found
        return d


@dataclass
class SuiteOutcome:
    table: str
    passed: int
    failed: int
    expectations: list[ExpectationOutcome]

    @property
    def success(self) -> bool:
        return self.failed == 0


_SHOWN_CHARS = 40


def shown(value: Any) -> str:
    """A value as written in a file (strings quoted), cut short."""
    if isinstance(value, str):
        return repr(clipped(value, _SHOWN_CHARS))
    text = str(value)
    if len(text) <= _SHOWN_CHARS:
        return text
    if isinstance(value, Decimal) and value.is_finite():
        # PostgreSQL writes 1e400 out in 401 digits. Scientific notation from the digits
        # themselves (normalize() would round to 28 of them): 1E+400, -9.99…E+44.
        sign, digits, exponent = value.as_tuple()
        kept = "".join(map(str, digits)).rstrip("0") or "0"
        mantissa = kept[0] + (f".{kept[1 : _SHOWN_CHARS // 2]}" if len(kept) > 1 else "")
        mantissa += "…" if len(kept) > _SHOWN_CHARS // 2 else ""
        return f"{'-' if sign else ''}{mantissa}E{len(digits) + int(exponent) - 1:+d}"
    return clipped(text, _SHOWN_CHARS)


def shown_id(value: Any) -> str:
    """A user_id as is when it reads unambiguously, else quoted like other values: a
    leading space, a newline or a zero-width character would not show, or worse."""
    if isinstance(value, str) and value.isprintable() and len(value) <= _SHOWN_CHARS:
        if not any(c.isspace() or c in "'\",`" for c in value):
            return value
    return shown(value)


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def describe_failure(o: ExpectationOutcome) -> str:
    """One clause a person can act on: file, column, what was expected, examples."""
    spec = BY_NAME[o.table]
    where = spec.file_name + (f", column {o.column}" if o.column else "")
    n = o.unexpected_count
    eg_values = ", ".join(dict.fromkeys(o.examples))  # each example once
    eg_ids = _named_rows(o)
    rows = f" (user_id {eg_ids})" if eg_ids else ""
    if o.error:
        return f"{where}: {o.expectation} could not be evaluated: {o.error}"
    match o.expectation:
        case "expect_column_values_to_be_between":
            what = f"{n} value(s) below 0, expected >= 0, e.g. {eg_values}{rows}"
        case "expect_column_values_to_not_be_null":
            what = f"{n} empty value(s); every row needs a {o.column}{rows}"
        case Check.UNIQUE:
            lines = o.example_lines or [[] for _ in o.example_user_ids]
            copies = ", ".join(
                f"{shown_id(uid)} ({c} rows"
                + (f": lines {', '.join(map(str, at))})" if at else ")")
                for uid, c, at in zip(o.example_user_ids, o.examples, lines, strict=False)
            )
            what = f"{n} duplicated {o.column} value(s), e.g. {copies or eg_ids}"
        case Check.NOT_NUMBERS:
            what = (
                f"{n} value(s) that are not a finite number (NaN, Infinity, or beyond "
                f"1.8e308, which no float holds), e.g. {eg_values}{rows}"
            )
        case Check.CEILING:
            assert o.column is not None  # the check is a column's
            col = spec.column(o.column)
            what = (
                f"{n} value(s) above {col.at_most}, {col.at_most_is}, e.g. {eg_values}{rows}; "
                "an export in another unit, or over another window?"
            )
        case "expect_column_values_to_be_in_set":
            assert o.column is not None  # GX's column expectations name their column
            allowed = "/".join(spec.column(o.column).value_set or ())
            what = f"{n} value(s) outside {allowed}, e.g. {eg_values}{rows}"
        case Check.ALL_EMPTY:
            where = f"{spec.file_name}, column {', '.join(o.examples)}"
            what = "empty in every row; a month's export that lost this column's values"
        case Check.KEY_LENGTH:
            what = (
                f"{n} value(s) longer than {KEY_MAX_LENGTH} characters, e.g. {_keys_on_lines(o)}; "
                "a user_id is a short code"
            )
        case Check.KEY_SPELLING:
            what = (
                f"{n} value(s) with a space, control, invisible or private-use character, or "
                f"a word read as missing (NA, NULL, None, nan), e.g. {_keys_on_lines(o)}; "
                "a user_id is matched exactly, so each would be another user, and pandas' "
                "read_csv reads those words as no user_id at all"
            )
        case Check.DATE_RANGE:
            what = (
                f"{n} date(s) before {EARLIEST_DATE} or after the month's as_of {o.detail}, "
                f"e.g. {eg_values}{rows}; a month's files hold what was known on its as_of"
            )
        case "expect_table_row_count_to_be_between":
            what = "no data rows; expected at least one"
        case Check.USERS_DROP:
            what = (
                f"{n} users, {o.detail}: an export cut short? If that many users really "
                "left, rerun with --allow-drop (ALLOW_DROP=1; a deployment run: --param "
                "allow_drop=true)"
            )
        case Check.USERS_KEPT:
            what = (
                f"{o.detail}: were its user_ids re-keyed, or is it another export? If those "
                "users really left, rerun with --allow-drop (ALLOW_DROP=1; a deployment run: "
                "--param allow_drop=true)"
            )
        case Check.ORPHANS:
            what = f"{n} row(s) whose user_id is not in {PARENT.file_name}, e.g. {eg_ids}"
            where = f"{spec.file_name}, column {KEY}"
        case Check.MISSING_USERS:
            what = f"{o.detail}; expected one row per user"
            if n:
                what += f", none for {n} user(s) of {PARENT.file_name}, e.g. {eg_ids}"
                what += f" ({PARENT.file_name}'s lines)" if any(o.example_lines) else ""
        case _:
            what = f"{o.expectation} failed {o.detail}".strip()
    return f"{where}: {what}"


def _on_line(at: list[int]) -> str:
    """' on line N' for an example found on one line; nothing when it was not found."""
    return f" on line {at[0]}" if len(at) == 1 else ""


def _keys_on_lines(o: ExpectationOutcome) -> str:
    """A key check's examples (the user_ids themselves, shown), each with its file line
    when it is known: an invisible character is not found by searching the file."""
    lines = o.example_lines or [[] for _ in o.examples]
    return ", ".join(
        dict.fromkeys(v + _on_line(at) for v, at in zip(o.examples, lines, strict=False))
    )


def _named_rows(o: ExpectationOutcome) -> str:
    """The example user_ids, each with its file line when it is known: 'A on line 3, B'."""
    lines = o.example_lines or [[] for _ in o.example_user_ids]
    return ", ".join(
        shown_id(uid) + _on_line(at)
        for uid, at in zip(o.example_user_ids, lines, strict=False)
        if uid is not None
    )


# Checks whose examples are rows of the failing file, named by their user_id (the key
# checks' examples are the user_ids themselves).
_ROW_CHECKS = frozenset(
    {
        "expect_column_values_to_be_between",
        "expect_column_values_to_not_be_null",
        "expect_column_values_to_be_in_set",
        Check.NOT_NUMBERS,
        Check.CEILING,
        Check.DATE_RANGE,
        Check.ORPHANS,
        Check.KEY_SPELLING,
        Check.KEY_LENGTH,  # its examples are the user_ids (validation._suite_outcome)
        Check.MISSING_USERS,  # rows of users.csv, the users the file leaves out
    }
)


def locate_rows(outcomes: list[SuiteOutcome], files: dict[str, Path]) -> None:
    """Add the file lines of the rows a failure names: each copy of every duplicated
    user_id shown as an example, and the rows of the failures the run lists (its line
    and the log's, up to LISTED).

    Staging keeps no line numbers, so the file is read again (loading.key_lines): at
    1M rows, up to ~1.6-1.7 s for a row at the end of the file, once per file for all
    the listed failures' rows. Only in a file whose user_ids are unique, where an id
    names one row.
    """
    from .loading import key_lines

    def lines_of(named: list[ExpectationOutcome], copies: dict[str, int], table: str) -> None:
        try:  # the lines are a help: nothing here may hide the failure itself
            at = key_lines(BY_NAME[table], files[table], copies)
        except Exception:
            return
        # The file may have changed since it was staged: lines are trusted only when
        # every copy was found.
        for e in named:
            e.example_lines = [
                at[str(uid)] if uid is not None and len(at[str(uid)]) == copies[str(uid)] else []
                for uid in e.example_user_ids
            ]

    for e in (e for s in outcomes for e in s.expectations):
        if e.expectation == Check.UNIQUE and not e.success and e.example_user_ids:
            try:  # examples hold each id's number of rows, from the duplicates query
                pairs = zip(e.example_user_ids, e.examples, strict=True)
                lines_of([e], {str(i): int(c) for i, c in pairs}, e.table)
            except (TypeError, ValueError):
                continue
    # The rows of the failures the run names (its line, and the log's line for each
    # further one), in one read of each file.
    duplicated = {
        s.table
        for s in outcomes
        for x in s.expectations
        if x.expectation == Check.UNIQUE and not x.success
    }
    wanted: dict[str, list[ExpectationOutcome]] = {}
    for e in _shown_failures(outcomes)[:LISTED]:
        table = PARENT.name if e.expectation == Check.MISSING_USERS else e.table
        if e.expectation in _ROW_CHECKS and table not in duplicated and any(_ids(e)):
            wanted.setdefault(table, []).append(e)
    for table, named in wanted.items():
        lines_of(named, {uid: 1 for e in named for uid in _ids(e)}, table)


def _ids(e: ExpectationOutcome) -> list[str]:
    return [str(uid) for uid in e.example_user_ids if uid is not None]


_NO_ROWS = "expect_table_row_count_to_be_between"  # at least one row


def _shown_failures(outcomes: list[SuiteOutcome]) -> list[ExpectationOutcome]:
    """The failures the run names, the first of them in its line."""
    failed = [e for s in outcomes for e in s.expectations if not e.success]
    # A file with no rows fails its other checks too ("unique", "missing users"): they
    # only repeat that, and would hide where the other broken files are. With no users
    # in users.csv, every row of the five other files is an orphan: that repeats it too.
    empty = {e.table for e in failed if e.expectation == _NO_ROWS}
    failures = [
        e
        for e in failed
        if e.expectation == _NO_ROWS
        or not (e.table in empty or (PARENT.name in empty and e.expectation == Check.ORPHANS))
    ]
    # GX raises on values it cannot hold (1e400 as a float); the SQL check of the same
    # column says what the value is, so that failure is the one to show.
    explained = {(e.table, e.column) for e in failures if not e.error and e.column}
    return [e for e in failures if not (e.error and (e.table, e.column) in explained)]


LISTED = 20
"""The failures a refused month names one by one (its line, and the log's lines): a
month wrong everywhere has ~90; the rest are counted, and all are in the Data Docs."""


def further_failures(outcomes: list[SuiteOutcome]) -> list[str]:
    """A line for each failure after the one the run's line names: that line only
    counts them, and a person should not need the Data Docs to see what they are."""
    failures = _shown_failures(outcomes)
    listed = failures[:LISTED]
    lines = [
        f"failed expectation {i} of {len(failures)}: {describe_failure(f)}"
        for i, f in enumerate(listed[1:], start=2)
    ]
    if len(failures) > len(listed):
        more = len(failures) - len(listed)
        lines.append(f"+{more} more failed expectation(s): see the GX Data Docs")
    return lines


def check(outcomes: list[SuiteOutcome]) -> None:
    failures = _shown_failures(outcomes)
    if failures:
        first = describe_failure(failures[0])
        # The line names one failure; say where the others are, so that a month with
        # several broken files is not fixed one rerun at a time.
        files = dict.fromkeys(BY_NAME[f.table].file_name for f in failures[1:])
        more = (
            f" (+{len(failures) - 1} more failed expectation(s), in {', '.join(files)})"
            if len(failures) > 1
            else ""
        )
        raise ValidationFailed(
            f"validation failed: {first}{more}", [f.as_dict() for f in failures], outcomes
        )
