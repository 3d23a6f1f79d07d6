"""The table registry: the one description of the six monthly files.

Every SQL identifier the pipeline uses comes from here (never from file content):
COPY column lists, expectation suites, live upserts and history snapshots are all
derived from these specs, so adding a column is a one-line change plus its DDL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date


@dataclass(frozen=True)
class Column:
    name: str
    pg_type: str
    """PostgreSQL type: the staging column's, named when a value does not convert; a
    numeric column also gets the finite-number check."""
    non_negative: bool = False
    at_most: int | None = None
    """A bound no real value passes, ``at_most_is`` saying why (the hours in 30 days):
    above it the export is in another unit (minutes) or over another window."""
    at_most_is: str = ""
    value_set: tuple[str, ...] | None = None
    required: bool = False
    """An empty cell is refused (the key, and the label a model is trained on)."""
    until_as_of: bool = False
    """A date from EARLIEST_DATE to the month's as_of: a later one is the future, leaking
    into the snapshot of what was known then (an export taken after its as_of); an
    earlier one is no real date (-infinity, 0001-01-01, a BC date all parse)."""


@dataclass(frozen=True)
class TableSpec:
    name: str
    """Live table, staging table (``staging.<name>``) and file stem (``<name>.csv``)."""
    columns: tuple[Column, ...]
    snapshot_table: str | None = None
    snapshot_columns: tuple[str, ...] = field(default=())
    of_the_month: bool = False
    """Its values are the month's own (a window ending at as_of, the label): a file
    byte for byte another month's is a stale export. users and subscriptions can stay
    the same from one month to the next (the lab's months do)."""

    @property
    def file_name(self) -> str:
        return f"{self.name}.csv"

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def value_columns(self) -> tuple[str, ...]:
        """Every column but the key."""
        return tuple(c.name for c in self.columns if c.name != KEY)

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)


EARLIEST_DATE = date(1900, 1, 1)
KEY = "user_id"
KEY_MAX_LENGTH = 64  # characters; a UUID has 36
# A header of the registry's names is well under 1 KB; a first line past this is not
# a header (a file whose lines end in CR alone, a binary file), and is not read whole.
MAX_HEADER_BYTES = 1 << 16
_key = Column(KEY, "text", required=True)
_gender = ("Male", "Female")
_contracts = ("Month-to-month", "One year", "Two year")
_net_services = ("DSL", "Fiber optic", "No")


def _nn(name: str, pg_type: str, at_most: int | None = None, at_most_is: str = "") -> Column:
    return Column(name, pg_type, non_negative=True, at_most=at_most, at_most_is=at_most_is)


# Parents first: users (PARENT) is the table the five others are keyed to; the live
# publishing, the run report and the ledger walk the tables in this order.
TABLES: tuple[TableSpec, ...] = (
    TableSpec(
        "users",
        (
            _key,
            Column("signup_date", "date", until_as_of=True),
            Column("user_gender", "text", value_set=_gender),
            Column("user_is_senior", "boolean"),
            Column("has_family", "boolean"),
            Column("has_dependents", "boolean"),
        ),
    ),
    TableSpec(
        "subscriptions",
        (
            _key,
            _nn("months_active", "integer"),
            Column("plan_stream_tv", "boolean"),
            Column("plan_stream_movies", "boolean"),
            Column("contract_type", "text", value_set=_contracts),
            Column("paperless_billing", "boolean"),
            _nn("monthly_fee", "numeric"),
            _nn("total_paid", "numeric"),
            Column("net_service", "text", value_set=_net_services),
        ),
        snapshot_table="subscriptions_profile_snapshots",
        snapshot_columns=(
            "months_active",
            "monthly_fee",
            "paperless_billing",
            "plan_stream_tv",
            "plan_stream_movies",
            "net_service",
        ),
    ),
    TableSpec(
        "usage_agg_30d",
        (
            _key,
            _nn("watch_hours_30d", "numeric", 30 * 24, "the hours in 30 days"),
            _nn("avg_session_mins_7d", "numeric", 7 * 24 * 60, "the minutes in 7 days"),
            _nn("unique_devices_30d", "integer"),
            _nn("skips_7d", "integer"),
            _nn("rebuffer_events_7d", "integer"),
        ),
        snapshot_table="usage_agg_30d_snapshots",
        of_the_month=True,
        snapshot_columns=(
            "watch_hours_30d",
            "avg_session_mins_7d",
            "unique_devices_30d",
            "skips_7d",
            "rebuffer_events_7d",
        ),
    ),
    TableSpec(
        "payments_agg_90d",
        (_key, _nn("failed_payments_90d", "integer")),
        snapshot_table="payments_agg_90d_snapshots",
        of_the_month=True,
        snapshot_columns=("failed_payments_90d",),
    ),
    TableSpec(
        "support_agg_90d",
        (
            _key,
            _nn("support_tickets_90d", "integer"),
            _nn("ticket_avg_resolution_hrs_90d", "numeric"),
        ),
        snapshot_table="support_agg_90d_snapshots",
        of_the_month=True,
        snapshot_columns=("support_tickets_90d", "ticket_avg_resolution_hrs_90d"),
    ),
    TableSpec(
        "labels",
        (_key, Column("churn_label", "boolean", required=True)),
        snapshot_table="labels_snapshots",
        of_the_month=True,
        snapshot_columns=("churn_label",),
    ),
)

PARENT = TABLES[0]
BY_NAME: dict[str, TableSpec] = {t.name: t for t in TABLES}
SNAPSHOT_TABLES: tuple[str, ...] = tuple(t.snapshot_table for t in TABLES if t.snapshot_table)
LIVE_TABLES: tuple[str, ...] = tuple(t.name for t in TABLES)
