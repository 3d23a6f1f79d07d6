"""Validate: GX Core expectation suites run inside PostgreSQL over the staged month,
in a child process of their own.

The suites are expectations.py's. Nothing is published unless every expectation of
every table passes; failures come back with counts and examples.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import psycopg
from psycopg import sql

from . import db, sqlfiles
from .db import default_connect_timeout, session_options
from .diagnosis import connection_lost, explain_failure
from .errors import IngestError, clipped, clipped_quotes, first_line
from .expectations import AS_OF, COUNTED_ROWS, USERS_FLOOR, USERS_ROWS, build_suite, import_gx
from .locking import lock_lost
from .outcomes import Check, ExpectationOutcome, SuiteOutcome, shown
from .registry import BY_NAME, EARLIEST_DATE, KEY, PARENT, TABLES, TableSpec
from .sqlfiles import queries, query

if TYPE_CHECKING:
    from great_expectations.core.expectation_validation_result import (
        ExpectationSuiteValidationResult,
    )


def _gx_error(exception_info: dict | None) -> str:
    """The first line of the exception GX caught while computing an expectation, if any.

    GX 1.x keeps either one record or one per metric that failed.
    """
    if not exception_info:
        return ""
    records = [exception_info] if "raised_exception" in exception_info else []
    records += [v for v in exception_info.values() if isinstance(v, dict)]
    for record in records:
        if record.get("raised_exception"):
            message = str(record.get("exception_message") or "").strip()
            line = message.splitlines()[0] if message else "an exception"
            return clipped(clipped_quotes(line), 200)  # the reason follows a quoted value
    return ""


# GX's unique and cross-table checks are hash aggregates and anti-joins over the
# whole month: with the 4MB default work_mem they spill to disk at 1M rows.
# client_connection_check_interval: a child killed mid-query (stop_for) ends its
# statement on the server within a second, instead of when that statement next writes to
# the gone client (seconds of work at 10M rows, or never while it waits on a lock).
GX_SESSION_OPTIONS = "-c work_mem=256MB -c client_connection_check_interval=1s"


def _sqlalchemy_url(database_url: str) -> str:
    """DATABASE_URL (a URL or libpq's key=value form) as SQLAlchemy's psycopg URL.

    The user, password and database go where SQLAlchemy masks the password in its
    messages; every other libpq parameter (host, port, sslmode, ...) rides in the query
    string, which the psycopg dialect hands to libpq as is. Every value is
    percent-encoded, so no ``$`` is left for GX's ``${VAR}`` substitution to read.
    """
    from psycopg.conninfo import conninfo_to_dict
    from sqlalchemy.engine import URL

    params = {k: str(v) for k, v in conninfo_to_dict(database_url).items()}
    # One options parameter: SQLAlchemy turns a repeated one into a tuple, which
    # libpq sends as a single malformed argument and the server refuses.
    params["options"] = session_options(database_url, GX_SESSION_OPTIONS)
    params["client_encoding"] = db.CLIENT_ENCODING  # db.py says why
    params.update({k: str(v) for k, v in default_connect_timeout(params).items()})
    # libpq gives every host of a list the one port; SQLAlchemy wants one port per host.
    hosts = params.get("host", "").split(",")
    if len(hosts) > 1 and "," not in params.get("port", ","):
        params["port"] = ",".join([params["port"]] * len(hosts))
    return URL.create(
        "postgresql+psycopg",
        username=params.pop("user", None),
        password=params.pop("password", None),
        database=params.pop("dbname", None),
        query=params,
    ).render_as_string(hide_password=False)


RESULTS_FOLDER = "results"  # in the docs folder: each validation's result, as JSON
_RESULTS_STORE = "streamflow_results"


class Suites:
    """GX's context and the six suites, built before the database is needed.

    Importing GX and building the suites is ~3 s of CPU that does not read the month:
    it runs while the CLI starts up and the files are COPYed. ``connect`` then adds the
    staged tables, which must exist by then (GX test-queries each one).
    """

    def __init__(self, docs_dir: Path | None) -> None:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
        gx = import_gx()

        logging.getLogger("great_expectations").setLevel(logging.WARNING)
        self.context = context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = {"globally": False}
        self.docs_dir = docs_dir
        self.site = None
        self._results: dict[Any, Any] = {}  # this run's, by key: what build_docs keeps
        if docs_dir is not None:
            docs_dir.mkdir(parents=True, exist_ok=True)
            context.add_data_docs_site(
                site_name="streamflow",
                site_config={
                    "class_name": "SiteBuilder",
                    "store_backend": {
                        "class_name": "TupleFilesystemStoreBackend",
                        # GX reads $NAME in its config as a variable: a folder with a
                        # '$' in its path had the docs written elsewhere, or not at all.
                        "base_directory": str(docs_dir).replace("$", r"\$"),
                    },
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                },
            )
            self.site = docs_dir / "index.html"
        self.suites = [context.suites.add(build_suite(spec)) for spec in TABLES]
        self._engine: Any = None  # the checkpoint's, once connected

    def close(self) -> None:
        """Its connections closed, politely: the process may then end without teardown."""
        if self._engine is not None:
            self._engine.dispose()

    def connect(
        self, database_url: str
    ) -> Callable[[date, int], tuple[list[SuiteOutcome], Path | None]]:
        """Returns the call that validates ``staging.*`` as it is when called: for an
        as_of, and the fewest users it may list (``UsersBefore.floor``).

        It does not build the Data Docs (``build_docs``): the verdict comes first.
        """
        import great_expectations as gx
        from great_expectations.core.run_identifier import RunIdentifier

        context, site = self.context, self.site
        source = context.data_sources.add_sql(
            "staging", connection_string=_sqlalchemy_url(database_url)
        )
        definitions = []
        for spec, suite in zip(TABLES, self.suites, strict=True):
            asset = source.add_table_asset(spec.name, table_name=spec.name, schema_name="staging")
            batch = asset.add_batch_definition_whole_table(f"{spec.name}_month")
            definitions.append(
                context.validation_definitions.add(
                    gx.ValidationDefinition(name=f"{spec.name}_validation", data=batch, suite=suite)
                )
            )
        # A month that passes needs only a yes per expectation: SUMMARY would also fetch
        # examples of unexpected values, one more scan of the month per column check
        # (~2.5 s at 1M). A table that fails is validated again, for counts and examples.
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name="staged_month",
                validation_definitions=definitions,
                actions=[],
                result_format={"result_format": "BOOLEAN_ONLY"},
            )
        )

        # A run is at most four connections: control, two COPYs then the publisher, and
        # GX's (the data source's, which checked the tables, then the checkpoint's). The
        # run's own queries (the users count, a failed check's rows) go through the
        # checkpoint's engine, not connections of their own: a login limited to four got
        # "too many connections" instead of why a month failed.
        engine = self._engine = source.get_execution_engine().engine

        def validate(as_of: date, users_floor: int) -> tuple[list[SuiteOutcome], Path | None]:
            # Each `with` gives the connection back to the pool, which rolls it back: no
            # snapshot of the staged month is kept open across the checkpoint.
            with engine.connect() as shared:
                conn = shared.connection.driver_connection
                parameters = {
                    USERS_ROWS: _staged_rows(conn, PARENT),
                    AS_OF: as_of,
                    USERS_FLOOR: users_floor,
                }
            # Named as the Prefect flow run is: the Data Docs pages said only a time, not
            # which month they validated.
            run_id = RunIdentifier(run_name=f"ingest-{as_of.isoformat()}")
            results = checkpoint.run(expectation_parameters=parameters, run_id=run_id)
            keys = list(results.run_results)
            runs = list(results.run_results.values())
            for i, run in enumerate(runs):
                if not run.success:
                    runs[i] = definitions[i].run(
                        result_format={"result_format": "SUMMARY", "partial_unexpected_count": 5},
                        expectation_parameters=parameters,
                        run_id=run_id,
                    )
            self._results = dict(zip(keys, runs, strict=True))
            outcomes = [_suite_outcome(spec, run) for spec, run in zip(TABLES, runs, strict=True)]
            with engine.connect() as shared:
                _add_row_examples(shared.connection.driver_connection, outcomes, as_of)
            return outcomes, site

        return validate

    def build_docs(self) -> None:
        """This run's pages of the Data Docs site, and its index of every run kept (none
        without a docs dir)."""
        if self.docs_dir is None or not self._results:
            return
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
        )

        # The results kept on disk beside their pages. In the ephemeral context's memory
        # only this run's existed: building the site deleted every earlier run's pages
        # (GX drops a page whose result its store lacks), so the Data Docs showed the
        # last run alone, and a refused month's lasted until the next run. Written here,
        # after the verdict, not by the checkpoint: a docs folder that cannot be written
        # leaves the Data Docs unbuilt, not the month unpublished.
        context = self.context
        kept = context.add_store(
            _RESULTS_STORE,
            {
                "class_name": "ValidationResultsStore",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    # As given: a store's config is not read for $NAME variables.
                    "base_directory": str(self.docs_dir / RESULTS_FOLDER),
                },
            },
        )
        for key, result in self._results.items():
            kept.set(key, result)
        context.validation_results_store_name = _RESULTS_STORE
        # One build for the whole month: GX's UpdateDataDocsAction would rebuild the site
        # once per validation, recompiling every template each time. Only this run's
        # pages are rendered: the earlier runs' are on disk already.
        suites = [ExpectationSuiteIdentifier(name=suite.name) for suite in self.suites]
        context.build_data_docs(
            site_names=["streamflow"], resource_identifiers=[*self._results, *suites]
        )


def _staged_rows(conn: psycopg.Connection, spec: TableSpec) -> int:
    rows = query("staging", "staged_rows", staged=sqlfiles.staged(spec.name))
    return db.one_row(conn.execute(rows))[0]


def prepare_suites(
    database_url: str, docs_dir: Path | None
) -> Callable[..., tuple[list[SuiteOutcome], Path | None]]:
    """Build the suites and connect them: the call that validates ``staging.*``, in
    this process (the tests' way; runs use ``SuitesProcess``)."""
    suites = Suites(docs_dir)
    validate = suites.connect(database_url)

    def validate_and_document(
        as_of: date, users_floor: int = 0
    ) -> tuple[list[SuiteOutcome], Path | None]:
        result = validate(as_of, users_floor)
        suites.build_docs()
        return result

    return validate_and_document


# Users of the month before looked up in this month's users.csv, about this many: enough
# to tell 99% gone from 50% (a simple random sample: ±3 points at 1,000), few enough to
# cost ~45 ms at 1M users (one scan of staging.users with a hashed list).
SAMPLE_USERS = 1000


@dataclass(frozen=True)
class UsersBefore:
    """The month published before the one validated, for the users-drop checks: how
    many users this month lists against it (a GX expectation, ``floor``), and how many of
    its users this month still lists (a sample of them, ``count_listed``).

    Read by the flow on its control connection before the month is published, not by
    the GX process: that one's reads would wait, behind another session's lock request
    (a DROP of an old partition), for the publishing transaction, which waits for
    validation's verdict: a wait no deadlock detector sees.
    """

    as_of: date | None
    users: int
    drop_limit: float | None
    """Percent; None: the run allows any drop."""
    sample: tuple[str, ...] = ()
    """Some of the month's users, each with the same chance: about ``SAMPLE_USERS`` (all
    of a month that has no more)."""
    listed: int | None = None
    """How many of ``sample`` the staged users.csv lists (``count_listed``)."""
    staged: int = 0
    """How many rows the staged users.csv has (``count_listed``, when too few are kept)."""

    @classmethod
    def of(cls, conn: psycopg.Connection, as_of: date, drop_limit: float | None) -> UsersBefore:
        if drop_limit is None:
            return cls(None, 0, None)
        q = queries("validation")
        row = conn.execute(q["month_before"], {"as_of": as_of}).fetchone()
        if row is None:
            return cls(None, 0, drop_limit)
        users = db.one_row(conn.execute(q["users_of_month"], {"as_of": row[0]}))[0]
        percent = min(100.0, 100.0 * SAMPLE_USERS / users) if users else 100.0
        picked = {"as_of": row[0], "percent": percent}
        sample = tuple(r[0] for r in conn.execute(q["users_sample"], picked))
        return cls(row[0], users, drop_limit, sample)

    def count_listed(self, conn: psycopg.Connection) -> UsersBefore:
        """This, with how many of its sampled users the staged month lists (and, when
        too few, how many users it lists, for the message)."""
        if not self.sample or self.drop_limit is None:
            return self
        q = queries("validation")
        try:
            listed = db.one_row(conn.execute(q["still_listed"], {"sample": list(self.sample)}))[0]
            staged = 0
            if not self._kept(listed):
                staged = db.one_row(conn.execute(q["staged_users"]))[0]
        except psycopg.OperationalError as exc:
            # The run's control connection: the writer lock ended with it, and that is
            # what the run must say ("could not be reached" was not true).
            if connection_lost(exc):
                raise lock_lost(None, looked=False) from exc
            raise
        return replace(self, listed=listed, staged=staged)

    def _kept(self, listed: int) -> bool:
        """Whether at most ``drop_limit`` percent of the sample is missing. Fractions: 500
        missing of 1,000 is exactly the 50% allowed, not a float's hair above it."""
        missing = len(self.sample) - listed
        return Fraction(missing * 100, len(self.sample)) <= Fraction(str(self.drop_limit))

    @property
    def floor(self) -> int:
        """The fewest users the month may list: 0 when nothing is compared."""
        if self.as_of is None or self.drop_limit is None:
            return 0
        # Exact: 50% of 7,043 users leaves a floor of 3,522, not 3,521.4999…
        kept = self.users * (100 - Fraction(str(self.drop_limit))) / 100
        return -(-kept.numerator // kept.denominator)

    def judge(self, outcomes: list[SuiteOutcome]) -> None:
        """Word a failed users-drop expectation: against which month, by how much. And
        add the users-kept check to users.csv's outcome: a month whose users are as many
        but others (re-keyed ids, another region's export) passes the count."""
        limit = _percent(self.drop_limit or 0)
        dropped = False
        for e in (e for s in outcomes for e in s.expectations):
            if e.expectation == Check.USERS_DROP and not e.success and self.users:
                dropped = True
                fewer = (self.users - (e.unexpected_count or 0)) * 100 / self.users
                e.detail = (
                    f"{_percent(fewer, unlike=limit)}% fewer than the {self.users} of "
                    f"{self.as_of}, the month published before it; expected at least "
                    f"{self.floor} (at most {limit}% fewer: MAX_USERS_DROP_PERCENT)"
                )
        # A month cut short leaves out the users it lacks: the users-kept check would
        # only repeat the users-drop one, whose words say what happened.
        if self.listed is None or self.drop_limit is None or dropped:
            return
        sampled = len(self.sample)
        missing = sampled - self.listed
        kept = self._kept(self.listed)
        among = (
            f"the {self.users} users"
            if sampled == self.users
            else f"{sampled} users picked at random among the {self.users}"
        )
        share = _percent(missing * 100 / sampled, unlike=limit)
        check = ExpectationOutcome(
            table=PARENT.name,
            expectation=Check.USERS_KEPT,
            column=KEY,
            success=kept,
            unexpected_count=missing,
            detail=(
                f"{missing} of {among} of {self.as_of}, the month published before it, are "
                f"not among its {self.staged} ({share}%; at most {limit}% may be: "
                "MAX_USERS_DROP_PERCENT)"
            ),
        )
        users = next(o for o in outcomes if o.table == PARENT.name)
        users.expectations.append(check)
        if kept:
            users.passed += 1
        else:
            users.failed += 1


def _percent(value: float, unlike: str = "") -> str:
    """50.007 as 50.01, 60.0 as 60; with as many more digits as it takes not to read as
    ``unlike`` (100,000 users of 200,001 are 50.0002% fewer, not "50%" against 50)."""
    for digits in range(2, 10):
        text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
        if text != unlike:
            break
    return text


# The rows behind a failed GX expectation (the SQL checks carry their own query).
_ROW_CHECKS = {
    Check.MISSING_USERS: "missing_users",
    Check.UNIQUE: "duplicates",
    "expect_column_values_to_be_between": "negatives",
    "expect_column_values_to_be_in_set": "outside_set",
    "expect_column_values_to_not_be_null": "empty_values",
    Check.DATE_RANGE: "outside_dates",
}


_UNLIKE_USERS: dict[str, str] = {
    Check.UNIQUE: "a user twice",
    Check.ORPHANS: f"not in {PARENT.file_name}",
}


def _add_row_examples(conn: psycopg.Connection, outcomes: list[SuiteOutcome], as_of: date) -> None:
    """GX's SUMMARY format counts unexpected rows without showing any: fetch a few."""
    # A file's row count says no user of users.csv is missing only while its user_ids
    # are users.csv's, once each: a user twice, or a user_id users.csv lacks, in the
    # place of a user left out keeps the count. Then the exact query decides (only the
    # duplicate or the orphan was named, and the rerun that fixed it was refused again).
    unlike = {
        e.table: e.expectation
        for s in outcomes
        for e in s.expectations
        if e.expectation in (Check.UNIQUE, Check.ORPHANS) and not e.success
    }
    for e in (e for s in outcomes for e in s.expectations):
        if e.expectation == Check.MISSING_USERS and e.success and e.table in unlike:
            e.success = False
    failed = [
        e
        for s in outcomes
        for e in s.expectations
        if (e.rows_query or e.expectation in _ROW_CHECKS) and not e.success
    ]
    if not failed:
        return
    # GX's connection: dates come quoted in ISO whatever the server's (its options).
    for e in failed:
        ids: dict[str, sql.Composable] = {"batch": sqlfiles.staged(e.table)}
        text = sqlfiles.own_sql(e.rows_query)  # the SQL check's, built by expectations.py
        if not text:
            text = queries("validation")[_ROW_CHECKS[e.expectation]]
            if e.column:
                ids["column"] = sql.Identifier(e.column)
        params: dict[str, object] | None = None
        if e.expectation == "expect_column_values_to_be_in_set":
            assert e.column is not None  # GX's column expectations name their column
            params = {"allowed": list(BY_NAME[e.table].column(e.column).value_set or ())}
        elif e.expectation == Check.DATE_RANGE:
            params = {"earliest": EARLIEST_DATE, "as_of": as_of}
            e.detail = as_of.isoformat()
        rows_q = sql.SQL(text).format(**ids)
        first = query("validation", "first_examples", rows=rows_q)
        rows = conn.execute(first, params).fetchall()
        # GX did not count these rows, or raised on a value Python cannot hold (a
        # -infinity date): the SQL check counts them, and its rows explain the failure.
        if e.expectation in (Check.UNIQUE, Check.MISSING_USERS) or (e.error and rows):
            e.error = ""
            count = query("validation", "count_rows", rows=rows_q)
            e.unexpected_count = db.one_row(conn.execute(count, params))[0]
        e.example_user_ids = [row[0] for row in rows]
        # Dates come as text (see outside_dates) and are shown bare, like numbers;
        # so are the column names of all_empty.
        show = str if e.expectation in (Check.DATE_RANGE, Check.ALL_EMPTY) else shown
        e.examples = [show(row[1]) for row in rows if len(row) > 1]
        if e.expectation == Check.MISSING_USERS and e.unexpected_count == 0:
            # The row count stands in for "no user missing"; the exact anti-join says
            # none is (users.csv repeats a user: its own "unique" check fails).
            e.success = True
        elif e.expectation == Check.MISSING_USERS:  # users.csv may have failed too: say both
            rows_here = _staged_rows(conn, BY_NAME[e.table])
            users = _staged_rows(conn, PARENT)
            e.detail = f"{rows_here} row(s) for the {users} of {PARENT.file_name}"
            if e.table in unlike:
                e.detail += f", some of them {_UNLIKE_USERS[unlike[e.table]]}"
    for s in outcomes:
        s.failed = sum(not e.success for e in s.expectations)
        s.passed = len(s.expectations) - s.failed


def _suite_outcome(spec: TableSpec, run: ExpectationSuiteValidationResult) -> SuiteOutcome:
    items = []
    for r in run.results:
        cfg = r.expectation_config
        assert cfg is not None  # GX sets it on the results of a suite's validation
        res = r.result or {}
        kwargs = cfg.kwargs
        meta = cfg.meta or {}
        examples = [shown(v) for v in (res.get("partial_unexpected_list") or [])[:5]]
        ids = [
            row.get(KEY) if isinstance(row, dict) else row
            for row in (res.get("partial_unexpected_index_list") or [])[:5]
        ]
        if not ids and kwargs.get("column") == KEY:  # its values are the user_ids, whole
            ids = list((res.get("partial_unexpected_list") or [])[:5])
        count = res.get("unexpected_count")
        if cfg.type == COUNTED_ROWS:  # the SQL checks: their count is the observed value
            count = res.get("observed_value")
        detail = ""
        if cfg.type == "expect_table_columns_to_match_set":
            detail = f"observed {res.get('observed_value')}"
        elif meta.get("check") == Check.MISSING_USERS:
            count = 0 if r.success else None  # the missing users are counted afterwards
        elif cfg.type == "expect_table_row_count_to_be_between":
            count = res.get("observed_value")
        items.append(
            ExpectationOutcome(
                table=spec.name,
                expectation=meta.get("check", cfg.type),
                column=kwargs.get("column") or meta.get("column"),
                success=bool(r.success),
                unexpected_count=count,
                examples=examples,
                example_user_ids=ids,
                detail=detail,
                error="" if r.success else _gx_error(r.exception_info),
                rows_query=kwargs.get("unexpected_rows_query") or "",  # the SQL checks
            )
        )
    failed = sum(not i.success for i in items)
    return SuiteOutcome(spec.name, len(items) - failed, failed, items)


# ---------------------------------------------------------------------------
# GX in its own interpreter
# ---------------------------------------------------------------------------
# Importing GX costs ~170-220 MB and keeps a database connection open for the life of the
# process. A child process takes both away with it when the suites are done: the
# flow process stays small, whatever the month's size.
URL_ENV = "STREAMFLOW_VALIDATION_URL"  # the URL may hold a password: never in argv
_MARKER = "STREAMFLOW_SUITES "
_CONNECT = "connect"
_GO = "validate"


def child_command() -> list[str]:
    """The command that starts the GX process; it reads ``_child_main``'s protocol.

    One place, so that the test suite can fork its ~80 in-process validations from one
    interpreter that has already imported GX (tests/gx_forkserver.py).
    """
    return [sys.executable, "-m", "streamflow.validation"]


class SuitesProcess:
    """The GX suites in a child process, started before the month is staged.

    The child imports GX and builds its suites (~3 s of CPU) as soon as it starts;
    ``connect()`` (once the staging tables exist) lets it add them while the flow
    COPYs the files; ``run()`` tells it to validate and returns the outcomes as soon
    as the child has them. The child then builds the Data Docs while the month is
    committed; ``finish()`` waits for them. ``close()`` stops a child that was never
    asked (staging failed).

    The CLI starts one before it imports Prefect (``prestart``); the flow ``take``s
    it, or starts its own when run another way (a deployment, a test).
    """

    _prestarted: SuitesProcess | None = None

    def __init__(self, database_url: str, docs_dir: Path | None) -> None:
        self.key = (database_url, docs_dir)
        env = dict(os.environ, **{URL_ENV: database_url})
        for name in db.LIBPQ_SESSION_ENV:  # GX's connections keep the session's options
            env.pop(name, None)
        # A developer's PYTHONWARNINGS=error made GX's own import of a deprecated module
        # ("sre_constants") the run's failure: "validation could not run". Warnings of
        # the libraries in this child are not the month's business.
        env.pop("PYTHONWARNINGS", None)
        cmd = child_command()
        if docs_dir is not None:
            cmd += ["--docs-dir", str(docs_dir.resolve())]
        # The run's working directory, for libpq's relative paths (passfile, sslrootcert,
        # PGSERVICEFILE); the package found on PYTHONPATH, and PYTHONSAFEPATH so that
        # -m does not put that directory first on the path (a ./streamflow there).
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (package_root, env.get("PYTHONPATH"))))
        env["PYTHONSAFEPATH"] = "1"
        # stderr in a file, not a pipe: stdout is read line by line while the child
        # runs, and a full stderr pipe would block it.
        self._stderr = tempfile.TemporaryFile(mode="w+")  # closed by finish/close
        self._asked = False
        # Set by stop_for, from the publisher's thread: why the run no longer waits.
        self._stopped_for: BaseException | None = None
        self._answered = False
        self._state = threading.Lock()
        self._proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )

    @classmethod
    def prestart(cls, database_url: str, docs_dir: Path | None) -> None:
        cls.discard_prestarted()
        cls._prestarted = cls(database_url, docs_dir)

    @classmethod
    def discard_prestarted(cls) -> None:
        if cls._prestarted is not None:
            cls._prestarted.close()
            cls._prestarted = None

    @classmethod
    def take(cls, database_url: str, docs_dir: Path | None) -> SuitesProcess:
        """The pre-started child if it was started for this database, else a new one."""
        child, cls._prestarted = cls._prestarted, None
        if child is not None and child.key == (database_url, docs_dir) and child.alive:
            return child
        if child is not None:
            child.close()
        return cls(database_url, docs_dir)

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def _send(self, order: str) -> None:
        try:
            stdin = self._proc.stdin
            assert stdin is not None  # started with stdin=PIPE
            stdin.write(order + "\n")
            stdin.flush()
        except BrokenPipeError:  # it died while preparing: run() reports its stderr
            pass

    def connect(self) -> None:
        """The staging tables exist: the child may add them to its data source."""
        self._send(_CONNECT)

    def run(self, as_of: date, users_floor: int = 0) -> tuple[list[SuiteOutcome], Path | None]:
        """The suites' outcomes for the staged month; ``stop_for``'s error instead if
        the run failed meanwhile. ``users_floor``: the fewest users it may list."""
        with self._state:
            if self._stopped_for is not None:
                raise self._stopped_for
            self._asked = True
        self._send(f"{_GO} {as_of.isoformat()} {users_floor:d}")
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(_MARKER):
                payload = json.loads(line[len(_MARKER) :])
                with self._state:
                    self._answered = True
                break
        else:  # EOF before the outcomes: it failed, its stderr says why
            self._proc.wait()
            if self._stopped_for is not None:
                raise self._stopped_for
            raise IngestError(f"validation could not run (GX process): {self._last_error()}")
        outcomes = [
            SuiteOutcome(
                table=s["table"],
                passed=s["passed"],
                failed=s["failed"],
                expectations=[ExpectationOutcome(**e) for e in s["expectations"]],
            )
            for s in payload["suites"]
        ]
        return outcomes, Path(payload["site"]) if payload["site"] else None

    def _last_error(self) -> str:
        self._stderr.seek(0)
        lines = [line for line in self._stderr.read().strip().splitlines() if line.strip()]
        said = [line[len(_FAILED) :] for line in lines if line.startswith(_FAILED)]
        if said:
            return said[-1]
        code = self._proc.returncode
        if code is not None and code < 0:  # "exit code -9" told people nothing
            try:
                name = signal.Signals(-code).name
            except ValueError:  # a real-time signal has no name
                name = f"signal {-code}"
            if -code == signal.SIGKILL:
                return f"killed by {name} (out of memory, or stopped from outside the run)"
            return f"stopped by {name}"
        return lines[-1] if lines else f"exit code {code}"

    def stop_for(self, exc: BaseException) -> None:
        """The run failed while the suites ran (its publisher could not write the month:
        a full disk, the writer lock lost): their verdict no longer matters, and at 10M
        users it is minutes away, with GX's queries loading the same server. The child
        is killed (the server ends a statement it has in flight within a second:
        GX_SESSION_OPTIONS); ``run`` raises ``exc``. Nothing once the outcomes are in."""
        with self._state:
            if self._answered:
                return
            self._stopped_for = exc
        if self._proc.poll() is None:
            self._proc.kill()

    @property
    def docs_index(self) -> Path | None:
        """The Data Docs' index page, once ``finish`` found them built for this run."""
        docs_dir = self.key[1]
        built = self._asked and self._stopped_for is None and self._proc.returncode == 0
        return docs_dir.resolve() / "index.html" if built and docs_dir is not None else None

    def finish(self, timeout: float = 300) -> str | None:
        """Wait for the Data Docs of a validated month; None, or why they failed."""
        if not self._asked or self._stopped_for is not None:
            self.close()
            return None
        try:
            self._proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            return f"not built within {timeout:.0f} s"
        error = self._last_error() if self._proc.returncode else None
        self._stderr.close()
        return error

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.communicate()
        self._stderr.close()


_FAILED = "streamflow-gx-failed: "  # the child's last word on stderr, read by the flow


def _reason(exc: BaseException) -> str:
    """One line on why validation could not run, from the innermost error of a chain."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:  # what each error wraps, not
        chain.append(current)  # what was being handled when it was raised
        current = getattr(current, "orig", None) or current.__cause__
    for error in reversed(chain):
        if (explained := explain_failure(error)) is not None:
            return explained
    return f"{type(exc).__name__}: {first_line(exc)}"


def _child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the GX suites on staging.* (internal).")
    parser.add_argument("--docs-dir", type=Path)
    args = parser.parse_args(argv)
    suites = Suites(args.docs_dir)
    try:
        return _serve_orders(suites)
    finally:
        suites.close()


def _serve_orders(suites: Suites) -> int:
    # Each order arrives on stdin; EOF or anything else means the flow stopped first.
    if sys.stdin.readline().strip() != _CONNECT:
        return 0
    try:
        validate = suites.connect(os.environ[URL_ENV])
        order = sys.stdin.readline().split()
        if len(order) != 3 or order[0] != _GO:
            return 0
        outcomes, site = validate(date.fromisoformat(order[1]), int(order[2]))
    except Exception as exc:
        # GX wraps the database's error in SQLAlchemy's, in its own: the flow's message
        # gets the innermost, in the CLI's words, not a repr with its "\n\t". The
        # traceback stays in the child's stderr, above.
        traceback.print_exc()
        print(_FAILED + _reason(exc), file=sys.stderr, flush=True)
        return 1
    suites_out = [
        {
            "table": o.table,
            "passed": o.passed,
            "failed": o.failed,
            "expectations": [e.as_dict() for e in o.expectations],
        }
        for o in outcomes
    ]
    # The verdict first: the flow commits (or rolls back) while the docs are built.
    print(_MARKER + json.dumps({"suites": suites_out, "site": str(site) if site else None}))
    sys.stdout.flush()
    suites.build_docs()
    return 0


def _main() -> NoReturn:
    try:
        code = _child_main()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    # Python's teardown of GX's thousands of modules took ~0.8 s after the Data Docs
    # were written, and the flow waits for this process to end: every run paid it.
    # Nothing is left for the teardown to do (connections closed, files written).
    os._exit(code)


if __name__ == "__main__":
    _main()
