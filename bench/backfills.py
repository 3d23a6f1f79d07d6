"""What a backfill costs with many months after it, A/B between two source trees.

    python bench/backfills.py --users 200000 --later 24 --trees OLD_TREE NEW_TREE

Publishes ``--later`` generated months (the newest ones) of ``--users`` users into one
fresh database, then backfills the six months before them, newest first, alternating
the two trees' code (each a checkout's root, through bench/workers.py ``core``: the
flow's body without Prefect). Each backfill has one more later month than the one
before it, so the second tree's runs have as many later months or one more. Prints one
JSON line per backfill: process wall and the ledger's step timings (``snapshot_month``
is what publishing took after validation's verdict). Writes no file; docs/performance.md
quotes what a run printed. Needs the bench requirements (see bench/run_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "services" / "prefect"))

from many_months import (  # noqa: E402
    FIRST_MONTH,
    generated_months,
    ledger_timings,
    month_end,
    timed_process,
)
from run_bench import OUT, WORKERS, Server, base_env  # noqa: E402

BACKFILLS = 6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--later", type=int, default=24, help="months published first")
    parser.add_argument("--trees", nargs=2, type=Path, required=True, metavar="TREE")
    args = parser.parse_args(argv)
    folders = generated_months(args.users, args.later + BACKFILLS)
    flow_dirs = [str(tree.resolve() / "services" / "prefect") for tree in args.trees]
    server = Server.start(OUT / "pg_backfills", {})
    try:
        url = server.fresh_database("backfills")
        env = {**base_env(), "DATABASE_URL": url, "BENCH_FLOW_DIR": flow_dirs[0]}
        start = time.perf_counter()
        for i in range(BACKFILLS, BACKFILLS + args.later):
            as_of = month_end(FIRST_MONTH, i).isoformat()
            timed_process([sys.executable, str(WORKERS), "core", url, str(folders[i]), as_of], env)
        took = time.perf_counter() - start
        print(f"{args.later} months of {args.users} users published in {took:.0f} s", flush=True)
        for k, i in enumerate(range(BACKFILLS - 1, -1, -1)):
            as_of = month_end(FIRST_MONTH, i)
            wall, _ = timed_process(
                [sys.executable, str(WORKERS), "core", url, str(folders[i]), as_of.isoformat()],
                {**env, "BENCH_FLOW_DIR": flow_dirs[k % 2]},
            )
            row = {
                "tree": str(args.trees[k % 2]),
                "as_of": as_of.isoformat(),
                "later_months": args.later + k,
                "wall_s": round(wall, 2),
                **ledger_timings(url, as_of),
            }
            print(json.dumps(row), flush=True)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        server.stop(save_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
