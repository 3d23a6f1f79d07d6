"""The orphan checks of validation: one query per child table against one for all five.

    python bench/orphan_checks.py --users 1000000 [--ref HEAD] [--repeats 2]

Starts the bench's PostgreSQL, stages month 1, then times the five per-table counts of
``db/sql/validation.sql``'s ``orphans`` query (what GX runs, one expectation per
table) against a single query that anti-joins the five children's ``user_id``s at once
and counts per table. (Until 48e5a4f the orphan check also looked in the live
``users``, and this bench timed it with them empty and full; the check no longer does.)
A lead for validation's cost, measured rather than adopted: see docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_bench


def compare(url: str, month: Path, repeats: int) -> list[tuple[str, str, float, dict]]:
    import psycopg
    from psycopg import sql
    from streamflow import loading
    from streamflow.registry import KEY, PARENT, TABLES
    from streamflow.sqlfiles import query

    children = [t.name for t in TABLES if t is not PARENT]  # as expectations.build_suite

    def per_table(conn: psycopg.Connection) -> dict:
        counts = {}
        for name in children:
            rows = query("validation", "orphans", batch=sql.Identifier("staging", name))
            q = sql.SQL("SELECT count(*) FROM ({}) AS o").format(rows)
            counts[name] = conn.execute(q).fetchone()[0]  # type: ignore[index]
        return counts

    union = sql.SQL(" UNION ALL ").join(
        sql.SQL("SELECT {} AS t, {} AS key FROM {}").format(
            sql.Literal(name), sql.Identifier(KEY), sql.Identifier("staging", name)
        )
        for name in children
    )
    # The same anti-join as db/sql/validation.sql's orphans, once for all the children.
    combined_q = sql.SQL(
        "SELECT o.t, count(*) FROM ({union}) AS o WHERE o.key IS NOT NULL"
        " AND NOT EXISTS (SELECT 1 FROM {staged} AS s WHERE s.{key} = o.key)"
        " GROUP BY o.t"
    ).format(
        union=union,
        key=sql.Identifier(KEY),
        staged=sql.Identifier("staging", PARENT.name),
    )

    def combined(conn: psycopg.Connection) -> dict:
        return dict(conn.execute(combined_q).fetchall())  # type: ignore[arg-type]

    out = []
    with psycopg.connect(url, autocommit=True) as conn:
        for spec in TABLES:
            loading.stage_file(conn, spec, month / spec.file_name)
        conn.execute("ANALYZE")
        live = "month 1"
        for _ in range(repeats):
            found = []
            for label, fn in (("one query per table", per_table), ("one query", combined)):
                start = time.perf_counter()
                counts = fn(conn)
                out.append((live, label, time.perf_counter() - start, counts))
                found.append({t: n for t, n in counts.items() if n})
            if found[0] != found[1]:
                raise SystemExit(f"the two forms disagree: {found}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--ref", help="measure this commit instead of the working tree")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    bench, months = run_bench.side_bench(args.users, args.ref)
    server = run_bench.Server.start(run_bench.OUT / f"pg-orphans-{os.getpid()}", {})
    try:
        url = server.fresh_database("bench_orphans")
        bench.apply_schema(url)
        results = compare(url, months[0], args.repeats)
    finally:
        server.stop()
    print(f"{args.users:,} users, orphan checks of month 1's five child tables:")
    for live, label, took, counts in results:
        print(f"  {live:17} {label:20} {took:6.2f} s  orphans {sum(counts.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
