"""The lab report tells the truth: its figures, recomputed on a fresh ingestion of the real
lab files, are the ones reports/rapport_tp2.md quotes.

reports/figures.py writes every block of the report (``--update-report``) from its own
run of the CLI. Here the data-dependent blocks (``figures.DATA_FIGURES``: psql outputs,
the expectation suites, the seed files, the key figures) are recomputed with the same
functions, after month_000 and month_001 go through the flow's CLI entry point, and
compared with the report's marked blocks, character for character. The numbers the
prose quotes must be the ones PostgreSQL gives.
"""

from __future__ import annotations

import re
import shutil
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "reports"))
import figures

pytestmark = pytest.mark.skipif(
    shutil.which("psql") is None, reason="psql (PostgreSQL client) is not installed"
)

# Key figures the prose quotes (written "7 043" there): each must be in the report's text,
# outside the code blocks, with the value this fresh ingestion gives.
PROSE_KEYS = (
    "clients after month_000 (users)",
    "plan_stream_tv NULL after month_000",
    "usage_agg_30d_snapshots rows as_of 2024-01-31",
    "usage_agg_30d_snapshots rows as_of 2024-02-29",
    "churners as_of 2024-01-31 (labels_snapshots)",
    "churners as_of 2024-02-29 (labels_snapshots)",
    "usage_agg_30d rows updated by month_001 (ledger)",
    "payments_agg_90d rows updated by month_001 (ledger)",
    "support_agg_90d rows updated by month_001 (ledger)",
    "labels rows updated by month_001 (ledger)",
)


def prose(markdown: str) -> str:
    """The report without its fenced code blocks."""
    return re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)


def test_report_figures_equal_a_fresh_ingestion(run_flow, db_url, shared_seeds):
    report = figures.REPORT.read_text(encoding="utf-8")
    quoted = figures.report_figures(report)
    missing = [name for name in figures.DATA_FIGURES if name not in quoted]
    assert not missing, f"marked blocks missing from {figures.REPORT.name}: {missing}"

    fresh = {
        "seed_files": figures.fig_seed_files(shared_seeds),
        "expectations": figures.fig_expectations(),
        **figures.fig_publish_sql(),
    }
    fresh.update(figures.fig_schema(db_url))
    rc, _, err = run_flow(db_url, shared_seeds / "month_000", figures.JAN)
    assert rc == 0, err
    fresh.update(figures.fig_after_month_000(db_url))
    keys = figures.key_values_month_000(db_url)
    rc, out, err = run_flow(db_url, shared_seeds / "month_001", figures.FEB)
    assert rc == 0, err
    fresh.update(figures.fig_after_month_001(db_url))
    keys |= figures.key_values_month_001(db_url)
    fresh["key_figures"] = figures.fig_key_figures(keys)

    stale = [name for name in figures.DATA_FIGURES if quoted[name] != fresh[name]]
    for name in stale:  # show the first difference of each, for the person fixing it
        old, new = quoted[name].splitlines(), fresh[name].splitlines()
        first = next(
            (i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b),
            min(len(old), len(new)),
        )
        print(
            f"--- {name}, line {first + 1}\nreport: {old[first : first + 1]}\nfresh:  "
            f"{new[first : first + 1]}"
        )
    assert not stale, (
        f"stale figures in {figures.REPORT.name}: {stale}; "
        "regenerate with: python reports/figures.py --update-report"
    )

    # The CLI's summary of month_001 (per-table +inserted ~updated =unchanged) is quoted too.
    summary = re.search(r"\[users .*\]", out)
    assert summary and summary.group(0) in quoted["run_month_001"], out

    text = prose(report)
    for key in PROSE_KEYS:
        assert figures.french(keys[key]) in text, f"{key} = {keys[key]} is not in the prose"
    # The lab's own answers, as PostgreSQL gives them today.
    assert keys["clients after month_000 (users)"] == 7043
    assert keys["churners as_of 2024-01-31 (labels_snapshots)"] == 1869
    assert keys["churners as_of 2024-02-29 (labels_snapshots)"] == 1701
    assert keys["plan_stream_tv NULL after month_000"] == 1526
