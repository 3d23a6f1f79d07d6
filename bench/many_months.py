"""StreamFlow ingest over years of months: does the last month cost what the second did?

    python bench/many_months.py [--users 7043] [--months 58] [--every 1]

Publishes ``--months`` consecutive generated months (as_of 2022-02-28 onwards: the
generator's sign-up dates end in February 2022, and a month in the future is refused),
one after the other into one fresh database, each by the flow's own body with Prefect
bypassed (bench/workers.py core, one process a month). After every ``--every``-th month
it measures, on that database:

- the month's own run: process wall and the steps the ledger recorded;
- the unchanged rerun through the CLI (``ingest_flow.py``): its no-op path runs the
  ledger's checks of every history partition against every published month;
- those checks alone (``ledger.check_history``) and db/init's grants check, median of 5;
- three reads a training job makes: one user's features and label at one as_of, one
  user's whole history, a month's features joined to the next month's labels (median
  of 5, a fresh connection's plans cached after the first);
- the lookup a backfill or a ``--replace`` of month 1 makes (publish.sql
  ``not_listed_later``: which of its users no later month lists), as an anti-join of
  month 1's labels with every later month's, median of 3.

It prints the table and the ratios of the last measured month to the second, and keeps
the figures in bench/results/many_months_<users>_<months>.json. It writes no document:
docs/performance.md quotes what a run printed.
Needs the bench requirements (see bench/run_bench.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "services" / "prefect"))

from run_bench import (  # noqa: E402
    OUT,
    RESULTS,
    WORKERS,
    Server,
    base_env,
    latest_run,
    machine,
)

FIRST_MONTH = dt.date(2022, 2, 28)


def month_end(first: dt.date, offset: int) -> dt.date:
    """The last day of the month ``offset`` months after ``first``'s."""
    months = first.year * 12 + first.month - 1 + offset + 1
    return dt.date(months // 12, months % 12 + 1, 1) - dt.timedelta(days=1)


def generated_months(users: int, months: int) -> list[Path]:
    """The generator's month folders, cached in bench/out/ (deterministic: seed 42)."""
    root = OUT / f"many_{users}_{months}"
    done = root / ".complete"
    if not done.is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "streamflow.seeds",
                "--users",
                str(users),
                "--months",
                str(months),
                "--seed",
                "42",
                "--out",
                str(root),
            ],
            check=True,
            cwd=REPO / "services" / "prefect",
            stdout=subprocess.DEVNULL,
        )
        done.write_text("")
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("month_"))


def median_ms(fn: Callable[[], object], times: int = 5) -> float:
    took = []
    for _ in range(times):
        start = time.perf_counter()
        fn()
        took.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(took), 2)


def timed_process(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
    return wall, done.stdout


def measure(url: str, as_of: dt.date, first: dt.date, user_id: str) -> dict[str, float]:
    """The catalogue checks and a training job's reads, on the database as it is."""
    import psycopg
    from streamflow.bootstrap import grants_not_db_init
    from streamflow.ledger import check_history
    from streamflow.registry import SNAPSHOT_TABLES

    earlier = month_end(as_of, -1) if as_of > first else as_of
    with psycopg.connect(url, autocommit=True) as conn:
        point = (
            "SELECT u.*, l.churn_label FROM usage_agg_30d_snapshots AS u "
            "JOIN labels_snapshots AS l USING (user_id, as_of) "
            "WHERE u.user_id = %(user)s AND u.as_of = %(as_of)s"
        )
        history = "SELECT count(*) FROM usage_agg_30d_snapshots WHERE user_id = %(user)s"
        training = (
            "SELECT count(*), avg(u.watch_hours_30d), avg(l.churn_label::int) "
            "FROM usage_agg_30d_snapshots AS u JOIN labels_snapshots AS l "
            "ON l.user_id = u.user_id AND l.as_of = %(label_as_of)s "
            "WHERE u.as_of = %(as_of)s"
        )
        # publish.sql's not_listed_later, with month 1's history standing in for its
        # staged files: a backfill of month 1 runs it over every later month.
        backfill = (
            "SELECT count(*) FROM labels_snapshots AS s WHERE s.as_of = %(first)s "
            "AND NOT EXISTS (SELECT 1 FROM labels_snapshots AS later "
            "WHERE later.as_of > %(first)s AND later.user_id = s.user_id)"
        )
        params = {"user": user_id, "as_of": earlier, "label_as_of": as_of, "first": first}
        rows = conn.execute(history, params).fetchone()
        return {
            "history_check_ms": median_ms(lambda: check_history(conn, SNAPSHOT_TABLES)),
            "grants_check_ms": median_ms(lambda: grants_not_db_init(conn)),
            "read_point_ms": median_ms(lambda: conn.execute(point, params).fetchall()),
            "read_user_history_ms": median_ms(lambda: conn.execute(history, params).fetchall()),
            "read_training_ms": median_ms(lambda: conn.execute(training, params).fetchall()),
            "backfill_lookup_ms": median_ms(
                lambda: conn.execute(backfill, params).fetchall(), times=3
            ),
            "user_history_rows": rows[0] if rows else 0,
        }


def ledger_timings(url: str, as_of: dt.date) -> dict[str, float]:
    """The step timings of the run just made, which must be as_of's and have published."""
    run = latest_run(url)
    if run.get("as_of") != as_of or run.get("status") != "succeeded":
        raise SystemExit(f"as_of {as_of}: the last run in ingest_runs did not publish it: {run}")
    return run["timings"]


def first_user(month: Path) -> str:
    with (month / "users.csv").open(encoding="utf-8") as f:
        f.readline()
        return f.readline().split(",", 1)[0]


def run(users: int, months: int, every: int, statements: Path | None) -> dict:
    folders = generated_months(users, months)
    # Every statement with its duration, session and application, for bench/pg_profile.py.
    logged = {"log_min_duration_statement": "0", "log_line_prefix": "'%m [%p] %a '"}
    server = Server.start(OUT / "pg_many_months", logged if statements else {})
    try:
        url = server.fresh_database("many_months")
        env = {**base_env(), "DATABASE_URL": url}
        flow = REPO / "services" / "prefect" / "ingest_flow.py"
        user_id = first_user(folders[0])
        rows = []
        for i, folder in enumerate(folders):
            as_of = month_end(FIRST_MONTH, i)
            cmd = [sys.executable, str(WORKERS), "core", url, str(folder), as_of.isoformat()]
            wall, _ = timed_process(cmd, env)
            row: dict = {"month": i + 1, "as_of": as_of.isoformat(), "wall_s": round(wall, 3)}
            row.update({f"step_{k}": v for k, v in ledger_timings(url, as_of).items()})
            if i == 0 or i == 1 or (i + 1) % every == 0 or i == len(folders) - 1:
                rerun, out = timed_process(
                    [
                        sys.executable,
                        str(flow),
                        "--seed-dir",
                        str(folder),
                        "--as-of",
                        as_of.isoformat(),
                    ],
                    env,
                )
                if "nothing to do" not in out and "unchanged" not in out:
                    raise SystemExit(f"as_of {as_of}: the rerun was not a no-op:\n{out}")
                row["rerun_s"] = round(rerun, 3)
                row.update(measure(url, as_of, FIRST_MONTH, user_id))
            rows.append(row)
            print(_line(row), flush=True)
        import psycopg

        with psycopg.connect(url) as conn:
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        # The control: months 1 and 2 again, into a new empty database on the same server,
        # now. A drift of the machine over the run shows here as well; what the months
        # themselves cost does not.
        control = []
        fresh = server.fresh_database("many_months_control")
        for i, folder in enumerate(folders[:2]):
            as_of = month_end(FIRST_MONTH, i)
            cmd = [sys.executable, str(WORKERS), "core", fresh, str(folder), as_of.isoformat()]
            wall, _ = timed_process(cmd, {**env, "DATABASE_URL": fresh})
            step = ledger_timings(fresh, as_of)
            control.append(
                {
                    "month": i + 1,
                    "wall_s": round(wall, 3),
                    **{f"step_{k}": v for k, v in step.items()},
                }
            )
        return {
            "users": users,
            "months": months,
            "machine": machine(),
            "server": server.describe(),
            "database_bytes": size,
            "control": control,
            "rows": rows,
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "load_after": os.getloadavg()[0],
        }
    finally:
        server.stop(save_log=statements)


COLUMNS = (
    ("month", "month", "{}"),
    ("as_of", "as_of", "{}"),
    ("wall_s", "run s", "{:.2f}"),
    ("step_upsert_csv", "stage s", "{:.2f}"),
    ("step_validate_with_ge", "validate s", "{:.2f}"),
    ("step_snapshot_month", "publish s", "{:.2f}"),
    ("rerun_s", "rerun s", "{:.2f}"),
    ("history_check_ms", "history check ms", "{:.2f}"),
    ("grants_check_ms", "grants check ms", "{:.2f}"),
    ("read_point_ms", "point read ms", "{:.2f}"),
    ("read_user_history_ms", "user history ms", "{:.2f}"),
    ("read_training_ms", "training read ms", "{:.2f}"),
    ("backfill_lookup_ms", "backfill lookup ms", "{:.1f}"),
)


def _line(row: dict) -> str:
    return " | ".join(
        fmt.format(row[key]) if row.get(key) is not None else "–" for key, _, fmt in COLUMNS
    )


def render(result: dict) -> str:
    measured = [r for r in result["rows"] if "rerun_s" in r]
    lines = [
        f"{result['months']} months of {result['users']:,} users, one database, "
        f"{result['when']} (load {result['load_after']:.2f} after), "
        f"{result['machine'].get('cpu', '?')}, PostgreSQL {result['server']['server_version']}, "
        f"database {result['database_bytes'] / 2**20:.0f} MiB at the end",
        "",
        "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + _line(r) + " |" for r in measured]
    second, last = measured[1], measured[-1]
    lines.append("")
    for c in result.get("control", []):
        lines.append(
            f"- control, after the last month: month {c['month']} into a new empty database "
            f"{c['wall_s']:.2f} s (validate {c.get('step_validate_with_ge', 0):.2f} s)"
        )
    for key, title, _ in COLUMNS[2:]:
        if second.get(key) and last.get(key) is not None:
            lines.append(
                f"- {title}: month {last['month']} / month 2 = {last[key] / second[key]:.2f}×"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=7043)
    parser.add_argument("--months", type=int, default=58)
    parser.add_argument("--every", type=int, default=1, help="measure after every Nth month")
    parser.add_argument(
        "--log-statements",
        type=Path,
        metavar="FILE",
        help="log every statement of the server (it slows the runs) and keep the log in FILE",
    )
    args = parser.parse_args(argv)
    if args.months < 2:
        parser.error("--months must be at least 2")
    last = month_end(FIRST_MONTH, args.months - 1)
    if last > dt.date.today():
        parser.error(f"--months {args.months} ends at {last}, in the future (refused by the flow)")
    result = run(args.users, args.months, max(1, args.every), args.log_statements)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"many_months_{args.users}_{args.months}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print()
    print(render(result))
    print(f"\nfigures kept in {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
