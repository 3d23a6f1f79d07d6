"""Print the verification counts of the README and the report: ``python -m streamflow.verify``.

Connects like the flow does (DATABASE_URL, POSTGRES_*, or the embedded default).
"""

from __future__ import annotations

import sys

import psycopg

from .db import queries
from .embedded import resolve_database_url
from .settings import load_settings


def counts(url: str) -> list[tuple[str, list[tuple]]]:
    out = []
    with psycopg.connect(url) as conn:
        for name, text in queries("verify").items():
            cur = conn.execute(text)  # type: ignore[arg-type]
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


def main() -> int:
    settings = load_settings()
    url = resolve_database_url(settings)
    print(render(counts(url)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
