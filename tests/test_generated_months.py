"""The generator's months go through the real pipeline with zero validation failures."""

from __future__ import annotations

from pathlib import Path

from conftest import DATA_SEEDS, scalar
from streamflow import seeds
from streamflow.registry import SNAPSHOT_TABLES


def _assert_clean_run(url: str, as_of: str) -> None:
    status, validation = (
        scalar(url, "SELECT status FROM ingest_runs WHERE as_of = %s", (as_of,)),
        scalar(url, "SELECT validation FROM ingest_runs WHERE as_of = %s", (as_of,)),
    )
    assert status == "succeeded"
    assert len(validation) == 6 and all(s["failed"] == 0 and s["passed"] > 0 for s in validation)


def test_committed_months_ingest_cleanly(run_flow, db_url):
    for month, as_of in (("month_000", "2024-01-31"), ("month_001", "2024-02-29")):
        rc, out, err = run_flow(db_url, DATA_SEEDS / month, as_of)
        assert rc == 0, err
        _assert_clean_run(db_url, as_of)
    users = scalar(db_url, "SELECT count(*) FROM users")
    assert users == 7043
    for table in SNAPSHOT_TABLES:
        n = scalar(db_url, f'SELECT count(DISTINCT as_of) FROM "{table}"')  # noqa: S608
        assert n == 2, table


def test_a_fresh_generation_with_another_seed_ingests_cleanly(run_flow, db_url, tmp_path: Path):
    months = seeds.generate(tmp_path, users=3000, months=3, seed=7)
    for month, as_of in zip(months, ("2024-01-31", "2024-02-29", "2024-03-31"), strict=True):
        rc, out, err = run_flow(db_url, month, as_of)
        assert rc == 0, err
        _assert_clean_run(db_url, as_of)
    assert scalar(db_url, "SELECT count(*) FROM labels_snapshots") == 9000
