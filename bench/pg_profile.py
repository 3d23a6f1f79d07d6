"""Where PostgreSQL's time goes, from its log (the pgserver build has no pg_stat_statements).

    python bench/run_bench.py --users 1000000 --skip a,b,c,d,o \\
        --pg-conf log_min_duration_statement=0 --ref HEAD
    python bench/pg_profile.py bench/out/logs/users_1000000/postgres.log [--top 25]

Groups the ``duration: … ms  statement|execute …`` lines by statement shape
(whitespace collapsed, literals replaced by ?) and prints count and total seconds,
largest first. The bench copies its server's log there when it stops.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

_ENTRY = re.compile(r"\b(?:LOG|LOG:)\s+duration: ([\d.]+) ms\s+(?:statement|execute [^:]*): (.*)")
_LITERAL = re.compile(r"'(?:[^']|'')*'|\b\d+(?:\.\d+)?\b")


def shape(statement: str, width: int) -> str:
    text = " ".join(statement.split())
    text = _LITERAL.sub("?", text)
    return text if len(text) <= width else text[: width - 1] + "…"


def entries(lines: list[str]) -> list[tuple[float, str]]:
    out: list[tuple[float, str]] = []
    current: list[str] | None = None
    ms = 0.0
    for line in lines:
        if line.startswith(("\t", " ")) and current is not None:
            if not line.strip().startswith("--"):  # the queries' own comment lines
                current.append(line.strip())
            continue
        if current is not None:
            out.append((ms, " ".join(current)))
            current = None
        m = _ENTRY.search(line)
        if m:
            first = m.group(2)
            ms, current = float(m.group(1)), [] if first.lstrip().startswith("--") else [first]
    if current is not None:
        out.append((ms, " ".join(current)))
    return out


# --kinds: what each statement is in the pipeline (first match wins).
_LIVE = "users|subscriptions|usage_agg_30d|payments_agg_90d|support_agg_90d|labels"
KINDS = (
    ("stage: COPY into staging.*", r"^COPY \S*staging"),
    (
        "validate: GX uniqueness of user_id (window count + examples, before 1a0b353)",
        r"OVER \(PARTITION BY user_id\)",
    ),
    (
        "validate: GX uniqueness of user_id (count DISTINCT, since 1a0b353)",
        r"count\(DISTINCT user_id\)",
    ),
    ("validate: GX counts of unexpected values", r"UnexpectedCountSubquery|^SELECT sum\(CASE"),
    # Before the NaN rule: the spelling check's word list holds 'NaN'.
    ("validate: user_id spelling (since key_spelling)", r"user_id ~ E?'\[\\+x01"),
    # Before the NaN rule: above_ceiling's upper end is the same float bound.
    ("validate: figures above their ceiling (since above_ceiling)", r"> \d+ AND \S+ <= 1\."),
    ("validate: NaN/Infinity/beyond-float rows", r"'NaN'|e308"),
    ("validate: padded user_id (3e89e02 to 033d379)", r"ascii\(right\(\w*\.?user_id"),
    ("validate: orphan rows (anti-join)", r"unexpected_row_count|^SELECT o\.user_id FROM"),
    ("validate: GX other", r"AS unexpected_values|anon_|substituted_batch_subquery"),
    ("publish: live INSERT", r"^INSERT INTO \"(" + _LIVE + r")\""),
    ("publish: live UPDATE of changed rows (before the MERGE)", r"^UPDATE \"(" + _LIVE + r")\""),
    ("publish: live MERGE (month 2 on)", r"^MERGE INTO \"(" + _LIVE + r")\""),
    ("publish: live row counts around the MERGE", r"^SELECT count\(\*\) FROM \"(" + _LIVE + r")\""),  # noqa: S608
    ("publish: primary key rebuilt after a first load", r"restore_live_key"),
    (
        "publish: history INSERT into the month partition",
        r"^INSERT INTO (?:\"staging\"\.)?\"\w+_snapshots_\d+\"",
    ),
    ("publish: month partition's key and as_of check (in staging)", r"index_month_partition"),
    ("publish: attach partition", r"attach_month_partition"),
    ("publish: set-based foreign key check (before c2c0a50)", r"array_agg\(s\.user_id"),
    ("commit", r"^COMMIT"),
    ("bench: create/drop database, counts", r"DATABASE|^SELECT count\(\*\) FROM \"public\""),
)


def kind(statement: str) -> str:
    for label, pattern in KINDS:
        if re.search(pattern, statement):
            return label
    return "other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("log", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--width", type=int, default=110)
    parser.add_argument("--kinds", action="store_true", help="group by pipeline step instead")
    args = parser.parse_args(argv)
    found = entries(args.log.read_text(errors="replace").splitlines())
    groups: dict[str, list[float]] = defaultdict(list)
    for ms, statement in found:
        # Kinds match the statement's own text: shape() turns literals such as 'NaN' into ?.
        text = " ".join(statement.split())
        groups[kind(text) if args.kinds else shape(statement, args.width)].append(ms)
    total = sum(ms for ms, _ in found) / 1000
    print(f"{len(found)} logged statements, {total:.2f} s in total")
    print(f"{'total s':>9} {'count':>6} {'max s':>7}  statement")
    ranked = sorted(groups.items(), key=lambda kv: -sum(kv[1]))
    for text, times in ranked[: args.top]:
        print(f"{sum(times) / 1000:9.3f} {len(times):6d} {max(times) / 1000:7.3f}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
