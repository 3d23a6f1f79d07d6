"""EXPLAIN (ANALYZE, BUFFERS) of the publish step's queries, month 2 on top of month 1.

    python bench/explain_publish.py --users 1000000 [--ref HEAD]

Starts the bench's PostgreSQL, publishes month 1 with the flow body (Prefect
bypassed), stages month 2, then runs every publish query of month 2 under EXPLAIN
ANALYZE in one transaction, in publish order, and rolls it back. Writes the plans to
bench/out/explain_users_<N>.txt and prints a per-query summary (the time includes
the foreign-key triggers, which EXPLAIN lists separately).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_bench  # noqa: E402


def explain(url: str, month2: Path, as_of: date) -> list[tuple[str, float, str]]:
    import psycopg
    from psycopg import sql
    from streamflow import db, loading, publishing
    from streamflow.registry import TABLES

    out: list[tuple[str, float, str]] = []
    with psycopg.connect(url) as conn:
        for spec in TABLES:
            loading.stage_file(conn, spec, month2 / spec.file_name)
        conn.execute("ANALYZE")
        conn.commit()
        with conn.cursor() as cur:
            for spec in TABLES:
                staged = sql.Identifier("staging", spec.name)
                values = spec.value_columns
                queries = [
                    (
                        f"upsert_live {spec.name}",
                        db.query(
                            "publish",
                            "upsert_live",
                            live=sql.Identifier(spec.name),
                            staged=staged,
                            columns=db.ident_list(spec.column_names),
                            value_columns=db.ident_list(values),
                            excluded_values=db.ident_list(values, "excluded"),
                            live_values=db.ident_list(values, "live"),
                        ),
                    )
                ]
                if spec.snapshot_table:
                    ids = {"history": sql.Identifier(spec.snapshot_table), "staged": staged}
                    cols = spec.snapshot_columns
                    queries.append(
                        (
                            f"drop_vanished_snapshots {spec.snapshot_table}",
                            db.query("publish", "drop_vanished_snapshots", **ids),
                        )
                    )
                    queries.append(
                        (
                            f"snapshot {spec.snapshot_table}",
                            db.query(
                                "publish",
                                "snapshot",
                                **ids,
                                columns=db.ident_list(cols),
                                excluded_values=db.ident_list(cols, "excluded"),
                                history_values=db.ident_list(cols, "h"),
                            ),
                        )
                    )
                for label, query in queries:
                    stmt = sql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + query
                    start = time.perf_counter()
                    cur.execute(stmt, {"as_of": as_of})
                    took = time.perf_counter() - start
                    plan = "\n".join(row[0] for row in cur.fetchall())
                    out.append((label, took, plan))
        conn.rollback()
    assert publishing  # the queries above are publishing.publish_month's, in its order
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--ref", help="measure this commit instead of the working tree")
    args = parser.parse_args(argv)
    run_bench.checkout(args.ref)
    bench = run_bench.Bench(
        argparse.Namespace(users=args.users, skip="", keep_dbs=False, repeats=1, pg_conf=[])
    )
    months, _ = bench.months()
    server = run_bench.Server.start(run_bench.OUT / f"pg-explain-{os.getpid()}", {})
    try:
        url = server.fresh_database("bench_explain")
        env = dict(bench.env, DATABASE_URL=url)
        cmd = bench.worker_cmd("core", url, months[0], run_bench.AS_OF[0])
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        results = explain(url, months[1], date.fromisoformat(run_bench.AS_OF[1]))
    finally:
        server.stop()
    path = run_bench.OUT / f"explain_users_{args.users}.txt"
    with path.open("w") as f:
        for label, took, plan in results:
            f.write(f"=== {label}: {took:.3f} s\n{plan}\n\n")
    total = sum(t for _, t, _ in results)
    print(f"{args.users:,} users, month 2 on top of month 1: publish queries {total:.2f} s")
    for label, took, plan in results:
        triggers = re.findall(r"Trigger for constraint (\S+): time=([\d.]+) calls=(\d+)", plan)
        fk = sum(float(t) for _, t, _ in triggers) / 1000
        note = f" (FK triggers {fk:.2f} s)" if triggers else ""
        print(f"  {label:<52} {took:7.3f} s{note}")
    print(f"plans: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
