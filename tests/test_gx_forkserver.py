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
from month_files import child_processes
from streamflow import validation

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


def _bad_option(template: gx_forkserver.Template) -> subprocess.CompletedProcess[str]:
    """A worker that exits at once: argparse's usage error, code 2."""
    return subprocess.run(
        [*template.command(), "--no-such-option"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_workers_exit_code_and_stderr_reach_the_caller(gx_template):
    proc = _bad_option(gx_template)

    assert proc.returncode == 2
    assert "unrecognized arguments: --no-such-option" in proc.stderr


def test_a_killed_client_takes_its_worker_with_it(gx_template, db_url):
    suites = validation.SuitesProcess(db_url, None)
    deadline = time.monotonic() + 30
    while not child_processes(gx_template.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child_processes(gx_template.pid), "no worker was forked"

    # The client dies while the worker's stdin is still open (the worker would end
    # on its EOF): only the template can stop the worker.
    suites._proc.kill()
    suites._proc.wait()

    deadline = time.monotonic() + 10
    while child_processes(gx_template.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert child_processes(gx_template.pid) == {}
    finally:
        suites.close()


def test_a_client_gone_before_its_request_leaves_the_template_serving(gx_template):
    gx_template.command()  # started
    pid = gx_template.pid
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(gx_template.socket_path)  # and closed without a request

    assert _bad_option(gx_template).returncode == 2
    assert gx_template.pid == pid


def test_the_template_and_its_workers_end_with_the_process_that_started_it():
    """Its stdin is the only thing left open by a test process killed without teardown."""
    template = gx_forkserver.Template(dict(os.environ))
    client = subprocess.Popen(
        template.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while not child_processes(template.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        (worker,) = list(child_processes(template.pid))  # waiting for its first order

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
