"""The suite's GX template (gx_forkserver.py) behaves like the process it stands for:
the worker's exit code and stderr reach the flow, and a killed client leaves nothing."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from streamflow import validation


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


def test_the_workers_exit_code_and_stderr_reach_the_caller(gx_template):
    proc = subprocess.run(
        [*gx_template.command(), "--no-such-option"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert proc.returncode == 2  # argparse's usage error, in the forked worker
    assert "unrecognized arguments: --no-such-option" in proc.stderr


def test_a_killed_client_takes_its_worker_with_it(gx_template, db_url):
    suites = validation.SuitesProcess(db_url, None)
    deadline = time.monotonic() + 30
    while not _children(gx_template.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _children(gx_template.pid), "no worker was forked"

    # The client dies while the worker's stdin is still open (the worker would end
    # on its EOF): only the template can stop the worker.
    suites._proc.kill()
    suites._proc.wait()

    deadline = time.monotonic() + 10
    while _children(gx_template.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert _children(gx_template.pid) == []
    finally:
        suites.close()
