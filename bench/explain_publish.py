"""EXPLAIN (ANALYZE, BUFFERS) of the publish step's queries, month 2 on top of month 1.

    python bench/explain_publish.py --users 1000000 [--ref HEAD]

Starts the bench's PostgreSQL, publishes month 1 with the flow body (Prefect
bypassed), stages month 2, records the statements publishing.publish_month runs for
it, and replays them under EXPLAIN ANALYZE in one transaction, in the same order,
then rolls back. Writes the plans to
bench/out/explain_users_<N>.txt and prints a per-query summary. (No foreign-key
trigger fires: the publishing transaction runs with session_replication_role =
replica, db/sql/publish.sql says why.)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_bench

# What EXPLAIN ANALYZE can run; the rest (SET, locks, DDL) is replayed as it was.
_EXPLAINED = ("SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "WITH")


def explain(url: str, month2: Path, as_of: date) -> list[tuple[str, float, str]]:
    """Record the statements publish_month runs, then replay them under EXPLAIN ANALYZE.

    Recording keeps this independent of how publishing builds its queries; both the
    recorded run and the replay are rolled back.
    """
    import psycopg
    from streamflow import loading, publishing
    from streamflow.registry import TABLES

    recorded: list[tuple[str, object]] = []
    original = psycopg.Cursor.execute

    def recording(self, query, params=None, **kwargs):
        text = query if isinstance(query, str) else query.as_string(self)
        recorded.append((text, params))
        return original(self, query, params, **kwargs)

    out: list[tuple[str, float, str]] = []
    with psycopg.connect(url) as conn:
        for spec in TABLES:
            loading.stage_file(conn, spec, month2 / spec.file_name)
        conn.execute("ANALYZE")
        conn.commit()
        psycopg.Cursor.execute = recording  # type: ignore[method-assign]
        try:
            publishing.publish_month(conn, as_of, newest=True)
        finally:
            psycopg.Cursor.execute = original  # type: ignore[method-assign]
        conn.rollback()
        with conn.cursor() as cur:
            for text, params in recorded:
                code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("--"))
                words = code.split()
                if words and words[0].upper() in _EXPLAINED:
                    start = time.perf_counter()
                    cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + code, params)  # type: ignore[call-overload]
                    took = time.perf_counter() - start
                    plan = "\n".join(row[0] for row in cur.fetchall())
                    label = " ".join(words)
                    out.append((label[:90], took, plan))
                else:
                    cur.execute(text, params)  # type: ignore[call-overload]
        conn.rollback()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--ref", help="measure this commit instead of the working tree")
    args = parser.parse_args(argv)
    bench, months = run_bench.side_bench(args.users, args.ref)
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
    for label, took, _plan in results:
        print(f"  {took:7.3f} s  {label[:80]}")
    print(f"plans: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
