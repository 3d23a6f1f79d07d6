"""Print the verification counts of the README and the report: ``python -m streamflow.verify``.

Connects like the flow does (DATABASE_URL, POSTGRES_*, or the embedded default) and
prints each query of ``db/sql/verify.sql`` as a table (the ledger's shows each run's
error, so a failed run says why).

Exit codes: 0 when the counts were printed; 1 when they could not be, with one line on
stderr saying why (the database cannot be reached, or it has no StreamFlow schema yet:
an empty database is not a pass, since nothing could be checked); 2 for a usage error.
"""

from __future__ import annotations

import argparse
import sys

import psycopg

from . import db, diagnosis
from .bootstrap import schema_present
from .embedded import resolve_database_url
from .errors import IngestError, first_line
from .settings import load_settings
from .sqlfiles import queries
from .streams import escape_unencodable


class NoSchema(Exception):
    """The database answers but was never initialised: no month has been run there yet."""


class VerifyFailed(Exception):
    """The counts could not be read; ``str(err)`` is one line, for people."""


def connect(url: str) -> psycopg.Connection:
    try:
        return db.connect(url, application_name="streamflow-verify")
    except psycopg.OperationalError as exc:  # in the flow's words, hints included
        said = (
            diagnosis.explain_failure(exc) or f"cannot connect to the database: {first_line(exc)}"
        )
        raise VerifyFailed(said) from exc


def counts(url: str) -> list[tuple[str, list[tuple]]]:
    """Each verify query as (name, [header, *rows]); raises NoSchema or VerifyFailed."""
    out = []
    with connect(url) as conn:
        # Checked first: otherwise the first query fails with 'relation "users" does not exist'.
        if not schema_present(conn):
            raise NoSchema(f'database "{conn.info.dbname}" has no StreamFlow schema yet')
        for name, text in queries("verify").items():
            cur = conn.execute(text)
            header = tuple(d.name for d in cur.description or ())
            out.append((name, [header, *cur.fetchall()]))
    return out


def render(results: list[tuple[str, list[tuple]]]) -> str:
    blocks = []
    for name, rows in results:
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        lines = [f"-- {name}"]
        for n, row in enumerate(rows):
            lines.append(" | ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))
            if n == 0:
                lines.append("-+-".join("-" * w for w in widths))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        # Run with -m, argparse would call itself "verify.py".
        prog="python -m streamflow.verify",
        description=(
            "Print the verification counts of the StreamFlow database (db/sql/verify.sql): "
            "live tables, history per as_of, NULL plan flags, and the ingestion ledger "
            "with each run's error."
        ),
        epilog=(
            "The database is DATABASE_URL, else POSTGRES_HOST/POSTGRES_* (also read from "
            ".env), else the embedded server. Exit code 0 when the counts were printed, 1 "
            "when the database cannot be reached or has no StreamFlow schema yet."
        ),
    )


def main(argv: list[str] | None = None) -> int:
    escape_unencodable()  # the ledger quotes runs' errors, and clips them with "…"
    # Arguments first: --help and usage errors must not start or touch a database.
    parser().parse_args(argv)
    try:
        url = resolve_database_url(load_settings())
        results = counts(url)
    except NoSchema as exc:
        print(f"verify: {exc} (run a month first)", file=sys.stderr)
        return 1
    # IngestError: e.g. no database configured and the embedded server not installed.
    except (VerifyFailed, IngestError) as exc:
        print(f"verify failed: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:  # e.g. a login without SELECT, an older schema
        print(f"verify failed: {first_line(exc)}", file=sys.stderr)
        return 1
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
