"""GX processes forked from one warm interpreter, for the test suite only.

Every flow run starts ``python -m streamflow.validation``, which spends ~4 s of CPU
importing GX before it reads its first order. The suite runs ~80 flows in-process on
a 2-core machine: five minutes of CPU importing the same modules again. Here one
template process imports GX once. The flow's command (``validation.child_command``)
becomes a small client that hands its stdin, stdout and stderr to the template,
which forks a worker running the same ``_child_main`` on them, with the client's
arguments, environment and working directory. The client exits with the worker's
exit code; a client that is killed (``SuitesProcess.close``) takes its worker with it.

Flow CLIs run as subprocesses, and tests that use the ``real_gx_process`` fixture,
still start the real ``python -m streamflow.validation``.

Run as a script: ``serve SOCKET`` (the template) or ``client SOCKET ARGS...``. The
client runs with ``python -S``: only the standard library is imported at the top.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import NoReturn

FLOW_DIR = Path(__file__).resolve().parents[1] / "services" / "prefect"
_READY = "ready"
_LENGTH = 8  # bytes of the request's length, sent with the three descriptors


class Template:
    """The warm interpreter, started on first use; ``command()`` is the client's.

    It starts with the environment it is created with, not that of the test that
    happens to run the first flow (workers take their client's, but GX reads some of
    its settings at import time). It stops when its stdin closes: with ``stop()``, or
    when the process that started it dies without a teardown.
    """

    def __init__(self, env: dict[str, str]) -> None:
        self._env = dict(env)
        self._dir: str | None = None
        self._proc: subprocess.Popen[str] | None = None

    @property
    def socket_path(self) -> str:
        assert self._dir is not None
        return os.path.join(self._dir, "gx.sock")

    def command(self) -> list[str]:
        if self._proc is not None and self._proc.poll() is not None:
            self.stop()  # it died (its log says why): the next flow gets a new one
        if self._proc is None:
            self._start()
        return [sys.executable, "-S", __file__, "client", self.socket_path]

    def _start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="sf-gx-")  # a short path: AF_UNIX allows ~100
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "serve", self.socket_path],
            env=self._env,
            cwd=FLOW_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(os.path.join(self._dir, "template.log"), "w"),
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if line != _READY:
            log = Path(self._dir, "template.log").read_text()[-2000:]
            raise RuntimeError(f"the GX template did not start: {line!r} {log}")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        if self._proc is not None:
            with suppress(OSError):
                self._proc.stdin.close()  # type: ignore[union-attr]
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


# ------------------------------------------------------------------------ template


def _serve(socket_path: str) -> None:
    sys.path.insert(0, str(FLOW_DIR))
    from streamflow import expectations, validation

    expectations.import_gx()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(64)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, ("listener", None))
    sel.register(0, selectors.EVENT_READ, ("parent", None))
    print(_READY, flush=True)
    # The loop is this process's only Python thread, so a fork copies no lock of ours
    # held by another (OpenBLAS's idle pool, started by GX's numpy, quiesces on fork).
    while True:
        for key, _ in sel.select():
            kind, worker = key.data
            if kind == "parent":  # stdin closed: stop() or the test process died
                for other in list(sel.get_map().values()):
                    if other.data[0] == "exited" and not other.data[1]["reaped"]:
                        with suppress(OSError):
                            os.kill(other.data[1]["pid"], signal.SIGKILL)
                            os.waitpid(other.data[1]["pid"], 0)
                return
            if kind == "listener":
                conn, _ = listener.accept()
                try:
                    _start_worker(conn, listener, sel, validation._child_main)
                except Exception as exc:  # e.g. a client killed before its request
                    print(f"gx template: request dropped: {exc!r}", file=sys.stderr, flush=True)
                    conn.close()
            elif kind == "exited":  # the worker's pidfd is readable: it ended
                _, status = os.waitpid(worker["pid"], 0)
                worker["reaped"] = True
                sel.unregister(worker["pidfd"])
                os.close(worker["pidfd"])
                if worker["conn"] is not None:
                    code = os.waitstatus_to_exitcode(status)
                    with suppress(OSError):
                        worker["conn"].sendall(str(code if code >= 0 else 128 - code).encode())
                    _drop_client(sel, worker)
            elif worker["conn"] is not None:  # the client sends nothing more: it ended
                _drop_client(sel, worker)
                if not worker["reaped"]:
                    os.kill(worker["pid"], signal.SIGKILL)


def _drop_client(sel: selectors.BaseSelector, worker: dict) -> None:
    sel.unregister(worker["conn"])
    worker["conn"].close()
    worker["conn"] = None


def _start_worker(
    conn: socket.socket,
    listener: socket.socket,
    sel: selectors.BaseSelector,
    child_main: Callable[[list[str]], int],
) -> None:
    header, fds, _, _ = socket.recv_fds(conn, _LENGTH, 3)
    try:
        size = int.from_bytes(header, "big")
        body = b""
        while len(header) == _LENGTH and len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                break
            body += chunk
        if len(header) != _LENGTH or len(fds) != 3 or len(body) != size:
            raise ValueError(f"incomplete request: {len(header)} {len(fds)} {len(body)}/{size}")
        request = json.loads(body)
        pid = os.fork()
        if pid == 0:
            for key in list(sel.get_map().values()):
                if key.data[0] == "exited":
                    os.close(key.data[1]["pidfd"])
                elif key.data[0] == "client":
                    key.fileobj.close()
            sel.close()
            listener.close()
            conn.close()
            _run_worker(fds, request, child_main)
    finally:
        for fd in fds:
            os.close(fd)
    worker = {"pid": pid, "pidfd": os.pidfd_open(pid), "conn": conn, "reaped": False}
    sel.register(worker["pidfd"], selectors.EVENT_READ, ("exited", worker))
    sel.register(conn, selectors.EVENT_READ, ("client", worker))


def _run_worker(fds: list[int], request: dict, child_main: Callable[[list[str]], int]) -> NoReturn:
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        code = child_main(request["argv"])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with suppress(OSError):
                stream.flush()
        os._exit(code)


# -------------------------------------------------------------------------- client


def _client(socket_path: str, argv: list[str]) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
    except OSError as exc:
        print(f"gx forkserver: no template at {socket_path}: {exc}", file=sys.stderr)
        return 1
    body = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    socket.send_fds(sock, [len(body).to_bytes(_LENGTH, "big")], [0, 1, 2])
    sock.sendall(body)
    reply = b""
    while chunk := sock.recv(16):
        reply += chunk
    if not reply:
        print("gx forkserver: the template went away", file=sys.stderr)
        return 1
    return int(reply)


if __name__ == "__main__":
    role, path, *rest = sys.argv[1:]
    if role == "serve":
        _serve(path)
    else:
        sys.exit(_client(path, rest))
