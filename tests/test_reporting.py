"""The run's Markdown artifact keeps text from outside as code: a folder's name or an
error quoting a file's cell, with backticks in it, must not end the code and be rendered
by Prefect's UI (an image fetched from anywhere, a link)."""

from __future__ import annotations

import mistune
from streamflow.reporting import RunSummary

INJECTED = "```\n![pwn](http://attacker.example/p.png) [click](http://attacker.example)\n```"


def rendered(**fields: object) -> str:
    """The artifact of a February run with these fields, as the UI would render it."""
    summary = RunSummary(as_of="2024-02-29", mode="publish", **fields)  # type: ignore[arg-type]
    return mistune.create_markdown(plugins=["table"])(summary.markdown())


def test_an_error_quoting_backticks_stays_in_its_code_block():
    html = rendered(
        seed_dir="data/seeds/month_001",
        status="failed",
        error=f"validation failed: labels.csv, column user_id: 1 row(s), e.g. {INJECTED}",
        timings={"upsert_csv": 0.1},
    )
    assert "<img" not in html and "<a " not in html
    assert "![pwn](http://attacker.example/p.png)" in html  # shown, as text
    assert "<h2>Timings (s)</h2>" in html  # the block closed where it should


def test_a_folder_name_with_backticks_and_a_pipe_stays_one_code_cell():
    html = rendered(
        seed_dir="/data/`x`![pwn](http://attacker.example/p.png)|b\nc", status="succeeded"
    )
    assert "<img" not in html
    cell = html.split("<td>month folder</td>", 1)[1].split("</td>", 1)[0]
    assert cell.strip().startswith("<td><code>") and "![pwn]" in cell and "\\n" in cell
    assert html.count("<tr>") == 7  # the header row and six: no row split by the pipe


def test_users_has_no_snapshot_count_in_the_table_artifact():
    """users has no history table: its "snapshot rows written" was 0, as if none were."""
    from streamflow.publishing import TableStats

    summary = RunSummary(seed_dir="m", as_of="2024-02-29", mode="publish", status="succeeded")
    summary.tables = [
        TableStats("users", read=3, inserted=3),
        TableStats("labels", read=3, inserted=3, snapshot_table="labels_snapshots",
                   snapshot_inserted=3),
    ]  # fmt: skip
    rows = {r["table"]: r for r in summary.table_rows()}
    assert rows["users"]["snapshot rows written"] == "-"
    assert rows["labels"]["snapshot rows written"] == 3
