"""What the CLI starts before it imports Prefect: its API server and the GX process.

A run from the command line with no ``PREFECT_API_URL`` gets a temporary Prefect
API server, as Prefect itself would start one. Left to Prefect, that costs the
month ~7 s before its first COPY and ~2 s after its commit, one after the other:

- the CLI imports ``prefect.server`` (2.7 s of CPU) only to spawn the server, then
  waits while the server imports it again and starts (3.5-4 s);
- the flow's heartbeat thread sleeps in 1 s steps and is joined at the end; a
  heartbeat tells a server that a run crashed, and this server dies with the run;
- the interpreter then spends ~0.9 s tearing Prefect's modules down.

So the CLI spawns the same server (same ``uvicorn`` factory and flags as Prefect's
``SubprocessASGIServer``) as its first step, without importing it, and starts the GX
process too; both start up while the CLI imports Prefect. At the end it drains
Prefect's log and event queues into the server, stops it, and exits without the
teardown. With ``PREFECT_API_URL`` set (the Docker stack, a profile), none of the
server part applies; the GX process is still started early.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext, suppress
from typing import TYPE_CHECKING, NoReturn

from . import validation
from .embedded import resolve_database_url
from .errors import IngestError
from .inputs import complete_run
from .interrupts import STOPPED, StopSaid, stopped_by_signal
from .settings import load_settings, prefect_api_url

if TYPE_CHECKING:  # imported by the CLI only after the server is spawned
    from prefect.settings.models.server.ephemeral import ServerEphemeralSettings

_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception): ")

# The server is on 127.0.0.1: never ask a proxy from http_proxy for it.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# Prefect gives its temporary server 20 s to start by default. A first start in an empty
# PREFECT_HOME also creates and migrates its SQLite database: 21.5-22.9 s on the
# project's 2-core machine, where the README's first run failed. Unless Prefect's
# setting is given (environment, .env or profile), the CLI's own server gets this long.
FIRST_START_SECONDS = 120


def startup_timeout(ephemeral: ServerEphemeralSettings) -> float:
    """Seconds to wait for the server, from Prefect's ``server.ephemeral`` settings."""
    if "startup_timeout_seconds" in ephemeral.model_fields_set:
        return ephemeral.startup_timeout_seconds
    return max(ephemeral.startup_timeout_seconds, FIRST_START_SECONDS)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dies_with(parent: int) -> Callable[[], None]:
    """For the child, after fork: SIGTERM when the parent process ends (Linux's
    PR_SET_PDEATHSIG; the server is started from the main thread, which lives as long
    as the process)."""

    # Resolved here, in the parent: a dlopen in the forked child could wait for a lock
    # held by another thread of the parent at the fork.
    libc = ctypes.CDLL(None, use_errno=True)

    def arm() -> None:
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent ended before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


# The pipeline's database credentials (.env.example's, libpq's, the GX process's URL):
# the API server keeps its history in SQLite and needs none of them, and a process that
# does not hold a secret cannot show it (in /proc, a crash report, a debug log).
_CREDENTIALS = (
    "DATABASE_URL",
    "POSTGRES_PASSWORD",
    "INGEST_DB_PASSWORD",
    "PREFECT_DB_PASSWORD",
    "PGPASSWORD",
    validation.URL_ENV,
)


def server_environment() -> dict[str, str]:
    """This process's environment without the pipeline's database credentials."""
    return {k: v for k, v in os.environ.items() if k not in _CREDENTIALS}


class TemporaryApiServer:
    """Prefect's temporary API server (SQLite in ``PREFECT_HOME``), UI off."""

    def __init__(self) -> None:
        self._log = tempfile.TemporaryFile()  # read if it fails to start
        self._spawn()

    def _spawn(self) -> None:
        self.port = _free_port()
        env = dict(
            server_environment(),
            PREFECT_UI_ENABLED="0",
            PREFECT__SERVER_EPHEMERAL="1",
            PREFECT__SERVER_FINAL="1",
        )
        self._proc = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn",
                "--factory", "prefect.server.api.server:create_app",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "error", "--lifespan", "on",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            # Out of the terminal's process group: Ctrl-C interrupts the CLI, which
            # then stops the server; a server killed by it instead left the CLI
            # retrying a dead API for 80-166 s. And it dies with the CLI, however the
            # CLI ends (SIGTERM, SIGKILL): it used to outlive it, 190 MB each.
            start_new_session=True,
            preexec_fn=_dies_with(os.getpid()) if sys.platform == "linux" else None,
        )  # fmt: skip

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait_ready(self, timeout: float) -> str:
        """Block until ``/health`` answers; returns the API URL."""
        deadline = time.monotonic() + timeout
        respawned = False
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                if respawned:  # a second failure is not a port race
                    break
                respawned = True  # another process took the port in between
                self._spawn()
                continue
            try:
                with _LOCAL.open(self.api_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self.api_url
            except OSError:
                pass
            time.sleep(0.05)
        self._terminate()
        self._log.seek(0)
        lines = self._log.read().decode(errors="replace").strip().splitlines()
        self.stop()
        # uvicorn ends with "Application startup failed"; the cause is the exception above.
        errors = [ln for ln in lines if _EXCEPTION_LINE.match(ln)]
        why = (errors or lines or [f"no answer within {timeout:.0f} s"])[-1]
        raise IngestError(
            f"the temporary Prefect API server did not start: {why} "
            "(set PREFECT_API_URL to use a running server, or raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
        )

    def stop(self) -> None:
        self._terminate()
        self._log.close()

    def _terminate(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


# A server that takes the connection and never answers (a stuck proxy, a paused
# container): Prefect's client retried for ~7 minutes without a word. A refused
# connection or an HTTP error is left to Prefect, whose message names the address.
API_ANSWER_SECONDS = 15


def check_api_answers(api_url: str) -> None:
    """Raise IngestError if PREFECT_API_URL's server does not answer in time."""
    try:
        # The user's own API URL, as Prefect's client would call it.
        urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=API_ANSWER_SECONDS).close()
    except urllib.error.HTTPError:
        return  # it answered
    except OSError as exc:  # URLError wraps a timeout while connecting; a read raises it
        if isinstance(getattr(exc, "reason", exc), TimeoutError):
            raise IngestError(
                f"the Prefect API at {api_url} did not answer within {API_ANSWER_SECONDS} s "
                "(PREFECT_API_URL): is that server up and reachable from here?"
            ) from exc


def quiet_terminal() -> None:
    """Silence every logging handler that writes to a stream (the terminal), for the
    end of a run: the CLI has printed its last line ("ingest interrupted", "ingest
    failed: ...") and then ships the run's queued logs and events, and what Prefect
    logs meanwhile ("Still processing items: N items remaining...") would come below
    it. The line a person or a script's ``tail -1`` reads must stay last. The run's
    logs still reach the API (its handler is not a stream)."""
    for handler in terminal_handlers():
        handler.setLevel(logging.CRITICAL + 1)


def terminal_handlers() -> list[logging.Handler]:
    """Every logging handler of the process that writes to a stream, not a file."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    return [
        handler
        for logger in loggers
        for handler in logger.handlers
        if isinstance(handler, logging.StreamHandler)
        and not isinstance(handler, logging.FileHandler)
    ]


class Warmup:
    """Helpers of one CLI run, started before Prefect is imported."""

    def __init__(self, server: TemporaryApiServer | None, api_url: str | None = None) -> None:
        self.server = server
        self.api_url = api_url
        """PREFECT_API_URL, for a run: checked to answer before the run needs it."""

    def prefect_settings(self) -> AbstractContextManager[object]:
        """Point Prefect at the temporary server for the run (call after importing it)."""
        if self.server is None:
            if self.api_url:
                check_api_answers(self.api_url)
            return nullcontext()
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
            PREFECT_UI_URL,
            get_current_settings,
            temporary_settings,
        )

        current = get_current_settings()
        if current.api.url or not current.server.ephemeral.enabled:
            # A profile names a server, or forbids a temporary one: Prefect decides.
            self.server.stop()
            self.server = None
            return nullcontext()
        url = self.server.wait_ready(startup_timeout(current.server.ephemeral))
        return temporary_settings(
            updates={
                PREFECT_API_URL: url,
                # No "View at" link: the server has no UI and stops with the run.
                PREFECT_UI_URL: "",
                PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
            }
        )

    def run(self, main: Callable[[], int]) -> NoReturn:
        """``main()`` against the temporary server (if any), then ``exit`` with its code."""
        try:
            with self.prefect_settings():
                code = main()
        except IngestError as exc:  # the server did not start
            print(f"ingest failed: {exc}", file=sys.stderr)
            code = 1
        except SystemExit as exc:  # argparse, after printing its usage line
            code = exc.code if isinstance(exc.code, int) else 1
        except StopSaid as exc:
            line, code = exc.line()
            print(line, file=sys.stderr)
        except KeyboardInterrupt as exc:
            line, code = STOPPED.get(stopped_by_signal(exc), STOPPED[signal.SIGINT])
            print(line, file=sys.stderr)
        self.exit(code)

    def exit(self, code: int) -> NoReturn:
        """Ship the run's last logs and events, stop the server, exit with ``code``."""

        # A second Ctrl-C (or a timeout's second signal) broke this clean-up with a
        # traceback; it now ends the process at once, the last line already printed.
        def at_once(signum: int, frame: object) -> None:
            os._exit(code)

        signal.signal(signal.SIGINT, at_once)
        signal.signal(signal.SIGTERM, at_once)
        validation.SuitesProcess.discard_prestarted()
        quiet_terminal()
        # Prefect's API log handler writes its own failures to stderr unless this is off.
        logging.raiseExceptions = False
        atexit._run_exitfuncs()  # Prefect's queue drains and logging.shutdown
        if self.server is not None:
            self.server.stop()
        sys.stdout.flush()
        sys.stderr.flush()
        # Everything the run owns is flushed and closed: skip the module teardown.
        os._exit(code)


def warm_up(argv: list[str]) -> Warmup:
    """Start what a ``run`` will need; nothing for ``serve`` or an incomplete command."""
    if complete_run(argv) is None:  # help and usage errors need no API: no check either
        return Warmup(None)
    settings = load_settings()  # also reads .env, which may set PREFECT_API_URL
    api_url = prefect_api_url()
    server = None if api_url else TemporaryApiServer()
    with suppress(Exception):  # no database yet: the flow reports it, with context
        validation.SuitesProcess.prestart(resolve_database_url(settings), settings.gx_docs_dir)
    return Warmup(server, api_url)
