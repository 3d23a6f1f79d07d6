"""The suite's GX template (gx_forkserver.py) behaves like the process it stands for:
the worker's exit code and stderr reach the flow, and a killed client leaves nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import gx_forkserver
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


def test_a_client_gone_before_its_request_leaves_the_template_serving(gx_template):
    gx_template.command()  # started
    pid = gx_template.pid
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(gx_template.socket_path)  # and closed without a request

    test_the_workers_exit_code_and_stderr_reach_the_caller(gx_template)
    assert gx_template.pid == pid


def test_the_template_and_its_workers_end_with_the_process_that_started_it():
    """Its stdin is the only thing left open by a test process killed without teardown."""
    template = gx_forkserver.Template(dict(os.environ))
    client = subprocess.Popen(
        template.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while not _children(template.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        (worker,) = _children(template.pid)  # waiting for its first order

        template._proc.stdin.close()  # what the kernel does when the test process dies

        assert template._proc.wait(timeout=10) == 0
        deadline = time.monotonic() + 10
        while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{worker}").exists()
    finally:
        client.kill()
        client.communicate()
        template.stop()
