"""What the suites expect of a staged month: GX Core expectations derived from the table
registry, and the SQL checks (db/sql/validation.sql) GX runs for what its own
expectations cannot say or say too slowly. Each check's reason is beside it.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from typing import TYPE_CHECKING

from psycopg import sql

from .outcomes import Check
from .registry import EARLIEST_DATE, KEY, KEY_MAX_LENGTH, PARENT, TableSpec
from .sqlfiles import queries, query

if TYPE_CHECKING:
    from types import ModuleType

    import great_expectations as gx
    from great_expectations.execution_engine import ExecutionEngine


def import_gx() -> ModuleType:
    """``import great_expectations``, without loading ``scipy.stats`` for nothing.

    GX imports ``scipy.stats`` at start-up for its distribution expectations (KL
    divergence, KS tests), which these suites do not use: about a quarter of GX's
    import, paid by every validation process. The module is registered lazily
    instead; it loads on its first attribute access, so an expectation that needs
    it still gets the real module.
    """
    if "scipy.stats" not in sys.modules:
        import scipy  # a dependency of GX's

        spec = importlib.util.find_spec("scipy.stats")
        if spec is not None and spec.loader is not None:
            spec.loader = importlib.util.LazyLoader(spec.loader)
            stats = importlib.util.module_from_spec(spec)
            sys.modules["scipy.stats"] = stats
            spec.loader.exec_module(stats)
            # GX does `from scipy import stats`: found as an attribute, it skips the
            # import machinery, whose check of a module's __spec__ would load it.
            scipy.stats = stats
    import great_expectations as gx

    return gx


def build_suite(spec: TableSpec) -> gx.ExpectationSuite:
    gx = import_gx()
    from great_expectations import expectations as gxe

    suite = gx.ExpectationSuite(name=f"{spec.name}_suite")
    suite.add_expectation(
        gxe.ExpectTableColumnsToMatchSet(column_set=list(spec.column_names), exact_match=True)
    )
    suite.add_expectation(gxe.ExpectTableRowCountToBeBetween(min_value=1))
    # One row per user. GX's ExpectColumnValuesToBeUnique sorts the month through a
    # window function twice (count, then examples); a proportion of distinct values
    # of exactly 1 is one count(DISTINCT) that GX folds into the table's aggregates,
    # 5x cheaper at 1M rows. The duplicates are looked up only when it fails.
    suite.add_expectation(
        gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(
            column=KEY, min_value=1, max_value=1, meta={"check": Check.UNIQUE}
        )
    )
    if spec is PARENT:
        # user_ids are matched exactly: ' 7590-VHVEG' would be a new user in every table
        # and snapshot. A child's ids must be users.csv's (the orphans check), so
        # users.csv is the one file to look at. In SQL: a regex's \s misses no-break
        # spaces and byte-order marks, and "C" collation classes know only ASCII.
        suite.add_expectation(
            counted_rows_expectation()(
                unexpected_rows_query=rows_query("key_spelling"),
                description=(
                    f"{KEY} holds no space, control, invisible or private-use character and is "
                    "not a word read as missing (NA, NULL, None, nan)"
                ),
                meta={"check": Check.KEY_SPELLING, "column": KEY},
            )
        )
        # An id is a short code (the lab's have 10 characters). A longer one is an export
        # error, and past ~2,700 bytes no primary key can index it: the publish would
        # fail on the index, far from the file. GX folds this into its aggregates.
        suite.add_expectation(
            gxe.ExpectColumnValueLengthsToBeBetween(
                column=KEY, max_value=KEY_MAX_LENGTH, meta={"check": Check.KEY_LENGTH}
            )
        )
        # A month cut short (an export that stopped part-way, one region's files) passes
        # every other check: its six files agree with each other. Only the month
        # published before it shows that most of its users are gone. The floor is 0
        # when there is none, or the run allows the drop. GX counts the rows once for
        # every row-count expectation: no extra scan.
        suite.add_expectation(
            gxe.ExpectTableRowCountToBeBetween(
                min_value={"$PARAMETER": USERS_FLOOR}, meta={"check": Check.USERS_DROP}
            )
        )
    for col in spec.columns:
        if col.required:
            suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=col.name))
        if col.non_negative:
            suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column=col.name, min_value=0))
        if col.pg_type == "numeric":
            # COPY takes NaN and Infinity as numerics, and NaN passes ">= 0". GX's own
            # value expectations cannot report a NaN (it sorts the examples), hence SQL.
            suite.add_expectation(
                counted_rows_expectation()(
                    unexpected_rows_query=rows_query("not_numbers", col.name),
                    description=f"{col.name} holds finite numbers: no NaN, Infinity, 1e400",
                    meta={"check": Check.NOT_NUMBERS, "column": col.name},
                )
            )
        if col.at_most is not None:
            suite.add_expectation(
                counted_rows_expectation()(
                    unexpected_rows_query=rows_query("above_ceiling", col.name, col.at_most),
                    description=f"{col.name} at most {col.at_most}, {col.at_most_is}",
                    meta={"check": Check.CEILING, "column": col.name},
                )
            )
        if col.value_set:
            suite.add_expectation(
                gxe.ExpectColumnValuesToBeInSet(column=col.name, value_set=list(col.value_set))
            )
        if col.until_as_of:
            suite.add_expectation(
                gxe.ExpectColumnValuesToBeBetween(
                    column=col.name,
                    min_value=EARLIEST_DATE,
                    max_value={"$PARAMETER": AS_OF},
                    meta={"check": Check.DATE_RANGE},
                )
            )
    optional = [c.name for c in spec.columns if not c.required]
    if optional:
        # An empty cell may be NULL, but a column empty in every row is an export that
        # lost it (the header kept): its NULLs would be published over every user. One
        # query per table, each column's EXISTS stopping at its first value (GX's
        # non-null proportion cost ~0.85 s of validation at 1M, docs/performance.md, 28).
        suite.add_expectation(
            counted_rows_expectation()(
                unexpected_rows_query=empty_columns_query(optional),
                description=f"no column empty in every row ({', '.join(optional)})",
                meta={"check": Check.ALL_EMPTY},
            )
        )
    if spec is not PARENT:
        suite.add_expectation(
            counted_rows_expectation()(
                unexpected_rows_query=queries("validation")["orphans"],
                description=f"every {KEY} exists in {PARENT.file_name}",
                meta={"check": Check.ORPHANS},
            )
        )
        # Every user of users.csv has a row: user_id is unique here and known to
        # users.csv (the checks above), so a file that misses a user has fewer rows.
        # GX counts the rows once for both row-count expectations: no extra scan.
        suite.add_expectation(
            gxe.ExpectTableRowCountToBeBetween(
                min_value={"$PARAMETER": USERS_ROWS},
                meta={"check": Check.MISSING_USERS},
            )
        )
    return suite


# Expectation parameters, given at run time: rows staged from users.csv, the run's as_of,
# the fewest users the month may list (validation.UsersBefore).
USERS_ROWS = "users_rows"
USERS_FLOOR = "users_floor"
AS_OF = "as_of"
COUNTED_ROWS = "expect_query_to_return_no_rows"  # counted_rows_expectation's GX type


@cache
def counted_rows_expectation() -> type:
    """GX's UnexpectedRowsExpectation, asking PostgreSQL for the count only.

    The stock expectation evaluates its query twice, once for a count and once for
    the rows, and a query that finds nothing scans the whole month both times (the
    orphan anti-join: ~0.8 s per table at 1M). The rows are only needed when it fails,
    and then ``_add_row_examples`` fetches five of them.
    """
    from great_expectations import expectations as gxe

    class ExpectQueryToReturnNoRows(gxe.UnexpectedRowsExpectation):
        metric_dependencies = ("unexpected_rows_query.row_count",)

        def _validate(
            self,
            metrics: dict,
            runtime_configuration: dict | None = None,
            execution_engine: ExecutionEngine | None = None,
        ) -> dict:
            count = metrics["unexpected_rows_query.row_count"]
            return {"success": count == 0, "result": {"observed_value": count}}

    return ExpectQueryToReturnNoRows


def empty_columns_query(columns: list[str]) -> str:
    """db/sql/validation.sql 'empty_columns' for these registry columns, ``{batch}`` left."""
    filled = sql.SQL(", ").join(
        query(
            "validation", "empty_columns_row", column_name=sql.Literal(c), column=sql.Identifier(c)
        )
        for c in columns
    )
    text = queries("validation")["empty_columns"]
    return sql.SQL(text).format(batch=sql.SQL("{batch}"), filled=filled).as_string()


def rows_query(name: str, column: str | None = None, bound: int | None = None) -> str:
    """A query of db/sql/validation.sql for GX, ``{column}`` and ``{bound}`` filled from
    the registry (GX runs the text as it is: no parameters).

    ``{batch}`` is left in place: GX substitutes the validated table for it.
    """
    text = queries("validation")[name]
    if column is None:
        return text
    filled = sql.SQL(text).format(
        batch=sql.SQL("{batch}"),
        column=sql.Identifier(column),
        **({} if bound is None else {"bound": sql.Literal(int(bound))}),
    )
    return filled.as_string()
