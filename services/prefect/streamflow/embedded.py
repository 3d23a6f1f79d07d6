"""The embedded default PostgreSQL, for runs outside Docker with no server configured.

Uses the ``pgserver`` wheel (real PostgreSQL binaries, no system install). The data
directory persists between runs so month_001 lands on top of month_000; the server
keeps running after the flow exits, like a local service, and is reused next time.

``python -m streamflow.embedded uri|psql [ARGS]|stop`` prints its connection URI, opens
the wheel's own psql on it, or stops it (the data stays; delete the folder to reset).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from urllib.parse import quote

from .errors import IngestError
from .settings import Settings, load_settings
from .streams import escape_unencodable

if TYPE_CHECKING:
    from pgserver import PostgresServer


def _pgserver() -> ModuleType:
    try:
        with warnings.catch_warnings():
            # pgserver asks platformdirs for a runtime dir at import; without a usable
            # XDG_RUNTIME_DIR (unset in containers and CI, another user's after su)
            # that warns on every run, and the fallback it names (/tmp/runtime-<uid>)
            # is what pgserver then uses.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
            import pgserver
    except ImportError as exc:
        raise IngestError(
            "no database configured (set DATABASE_URL or POSTGRES_HOST/...) and the embedded "
            "PostgreSQL is not installed: pip install -r requirements/embedded.txt"
        ) from exc
    return pgserver


def embedded_database_url(pgdata: Path) -> str:
    pgserver = _pgserver()
    if pgdata.exists() and not pgdata.is_dir():
        raise IngestError(f"STREAMFLOW_PGDATA {str(pgdata)!r} is a file; expected a folder")
    pgdata.mkdir(parents=True, exist_ok=True)
    if any(pgdata.iterdir()) and not (pgdata / "PG_VERSION").is_file():
        raise IngestError(
            f"STREAMFLOW_PGDATA {str(pgdata)!r} holds files but no PostgreSQL data; "
            "expected an empty or new folder, or one the embedded server created"
        )
    server = _server(pgserver, pgdata)
    info = server.get_postmaster_info()
    if info.socket_dir is None:  # a TCP server (not what pgserver starts on Linux)
        return server.get_uri()
    # The port the server took at its start (postmaster.pid's 4th line): a server started
    # before PGPORT was ignored, or by hand, may listen on another than _PORT.
    return socket_uri(info.socket_dir, info.port or _PORT)


def socket_uri(socket_dir: Path, port: int) -> str:
    """The server's URI, its socket folder percent-encoded: pgserver's own pastes the path
    in as it is, and libpq decodes a '%41' in it to another folder (a server started
    at such a path before they were run through a link). The port names the socket
    (.s.PGSQL.<port>): left out, each client took PGPORT's, not the server's."""
    folder = quote(str(socket_dir), safe="/")
    return f"postgresql://postgres@/postgres?host={folder}&port={port}"


# The embedded server's port, whatever PGPORT says: pgserver starts postgres without -p,
# so the socket was named after the PGPORT of the first run's shell (a later run with
# another said 'No such file or directory'), and a PGPORT that is no port stopped the
# server from starting. PGPORT is for a DATABASE_URL naming none; this server listens
# on its own socket folder only (no TCP), so the same port never clashes with another.
_PORT = 5432


@contextmanager
def _pgport(port: int) -> Iterator[None]:
    """PGPORT set to ``port`` for what starts meanwhile: pg_ctl, then postgres, inherit
    this process's environment, and pgserver builds their command line itself."""
    before = os.environ.get("PGPORT")
    os.environ["PGPORT"] = str(port)
    try:
        yield
    finally:
        if before is None:
            del os.environ["PGPORT"]
        else:
            os.environ["PGPORT"] = before


# pgserver hands its socket folder (the data folder) to pg_ctl -o '-k <folder>', which a
# shell reads: a space, '&' or '$' in a checkout's path broke the default server with an
# empty AssertionError. Any folder whose path is not plain ASCII letters, digits and
# ./+-_ (a '%', an accented letter too) is run through a plain-named link to it instead.
_PLAIN = re.compile(r"[\w./+-]+", re.ASCII)


def _server(pgserver: ModuleType, pgdata: Path) -> PostgresServer:
    """The running server of ``pgdata``, started if need be; IngestError if it cannot."""
    _forget_stale_pid_file(pgdata)
    # pgserver logs its server's whole log at ERROR, then raises bare: the one line
    # people need is built below instead.
    logging.getLogger("pgserver").setLevel(logging.CRITICAL)
    log = pgdata / "log"
    logged = log.stat().st_size if log.is_file() else 0  # pg_ctl appends: older news
    failed: Exception | None = None
    for _ in range(2):
        try:
            with _pgport(_PORT):
                return _start(pgserver, pgdata)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, AssertionError) as exc:
            failed = exc
            _forget_instance(pgdata)
            # pgserver gives pg_ctl 10 s; a loaded machine's first start can take longer,
            # and the postmaster goes on starting: asked again, pgserver finds it running.
            if not isinstance(exc, subprocess.TimeoutExpired):
                break
    said = _new_fatal(log, logged) or (
        f"no answer within {failed.timeout:.0f} s"
        if isinstance(failed, subprocess.TimeoutExpired)
        else type(failed).__name__
    )
    raise IngestError(
        f"the embedded PostgreSQL in {pgdata} did not start: {said} (its log: {log}; "
        "STREAMFLOW_PGDATA names another folder)"
    ) from failed


def _forget_instance(pgdata: Path) -> None:
    """pgserver keeps a server that failed to start, and hands it out again as it is."""
    from pgserver.postgres_server import PostgresServer

    for key in [k for k in PostgresServer._instances if k.resolve() == pgdata.resolve()]:
        del PostgresServer._instances[key]


def _new_fatal(log: Path, since: int) -> str | None:
    """The last FATAL line the server logged after byte ``since``, with its DETAIL."""
    try:
        with log.open("rb") as f:
            f.seek(since)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for i in range(len(lines) - 1, -1, -1):
        if "FATAL:" in lines[i]:
            said = lines[i].split("FATAL:", 1)[1].strip()
            if i + 1 < len(lines) and "DETAIL:" in lines[i + 1]:
                said += " (" + lines[i + 1].split("DETAIL:", 1)[1].strip() + ")"
            return said
    return None


def _forget_stale_pid_file(pgdata: Path) -> None:
    """Remove a postmaster.pid whose process is surely no server: a zombie, or a
    process that is not postgres at all.

    After a crash or a reboot the recorded pid can belong to another program by the
    time the server starts again (pids wrap): pgserver then takes the server for
    running and hands out its dead socket, and PostgreSQL itself refuses to start
    ("lock file already exists"). Any postgres process keeps the file, whatever its
    command line says (a server started by hand, through a link since removed): a
    wrong guess there would take a running server's lock file away. Linux only (/proc).
    """
    pid_file = pgdata / "postmaster.pid"
    try:
        recorded = pid_file.read_text()
        pid = int(recorded.split("\n", 1)[0])
        proc = Path("/proc") / str(pid)
        name = (proc / "comm").read_text().strip()
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return  # no file, no such process (pgserver starts a server), or no /proc
    if state == "Z" or name != "postgres":
        # Another run may have replaced the file meanwhile (its new server's): only the
        # file read above goes.
        with suppress(OSError):
            if pid_file.read_text() == recorded:
                pid_file.unlink()


def _start(pgserver: ModuleType, pgdata: Path) -> PostgresServer:
    if _PLAIN.fullmatch(str(pgdata)):
        return pgserver.get_server(pgdata, cleanup_mode=None)
    # get_server() resolves links, so the server is made from the link directly.
    from pgserver.postgres_server import PostgresServer

    link = _plain_link(pgdata)
    if os.geteuid() == 0:  # the server runs as pgserver's own user: let it reach the folder
        from pgserver.utils import ensure_prefix_permissions

        ensure_prefix_permissions(pgdata)
    return PostgresServer(link, cleanup_mode=None)


def _plain_link(pgdata: Path) -> Path:
    base = Path(tempfile.gettempdir())
    if not _PLAIN.fullmatch(str(base)):  # a TMPDIR with a space would bring it all back
        base = Path("/tmp")
    links = base / f"streamflow-pgdata-{os.getuid()}"
    links.mkdir(mode=0o755, exist_ok=True)
    if links.is_symlink() or links.stat().st_uid != os.getuid():
        raise IngestError(f"{links} is not this user's own folder; remove it and run again")
    for old in links.iterdir():  # links to folders deleted since (tests, reset checkouts)
        if old.is_symlink() and not old.exists():
            old.unlink(missing_ok=True)
    link = links / hashlib.sha256(str(pgdata).encode()).hexdigest()[:16]
    if not (link.is_symlink() and link.resolve() == pgdata.resolve()):
        # Made under another name and renamed over: two runs starting at once each see
        # a whole link, never a missing one.
        fresh = links / f".{link.name}.{os.getpid()}"
        fresh.unlink(missing_ok=True)
        fresh.symlink_to(pgdata, target_is_directory=True)
        os.replace(fresh, link)
    return link


def resolve_database_url(settings: Settings) -> str:
    """The configured server, or else the embedded one (started if needed)."""
    return settings.database_url or embedded_database_url(settings.embedded_pgdata)


def _bin(name: str) -> str:
    _pgserver()
    from pgserver._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / name)


def stop(pgdata: Path) -> bool:
    """Stop the server of ``pgdata`` if it runs; False if it was not running."""
    if not (pgdata / "PG_VERSION").is_file():
        return False
    # pg_ctl takes a live pid for a running server, and sends it SIGINT: a stale file
    # naming another program would have pg_ctl stop that program.
    _forget_stale_pid_file(pgdata)

    def pg_ctl(*args: str) -> subprocess.CompletedProcess[str]:
        # pg_ctl refuses to run as root; pgserver runs the server as its own user then.
        command = [_bin("pg_ctl"), "-D", str(pgdata), *args]
        if os.geteuid() != 0:
            return subprocess.run(command, capture_output=True, text=True, check=False)
        owner = pgdata.stat()
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            user=owner.st_uid,
            group=owner.st_gid,
            extra_groups=[],
            check=False,
        )

    if pg_ctl("status").returncode == 3:  # not running (a stale postmaster.pid included)
        return False
    proc = pg_ctl("-w", "-m", "fast", "stop")
    if proc.returncode != 0:
        raise IngestError(f"pg_ctl could not stop the server of {pgdata}: {proc.stderr.strip()}")
    return True


def main(argv: list[str] | None = None) -> int:
    escape_unencodable()  # its lines name STREAMFLOW_PGDATA, a folder people choose
    parser = argparse.ArgumentParser(
        prog="python -m streamflow.embedded",
        description="The embedded PostgreSQL of runs with no DATABASE_URL nor POSTGRES_HOST "
        "(data in STREAMFLOW_PGDATA, default .pgdata at the repository root).",
    )
    parser.add_argument("command", choices=["uri", "psql", "stop"])
    parser.add_argument("psql_args", nargs=argparse.REMAINDER, help="passed to psql")
    args = parser.parse_args(argv)
    if args.psql_args and args.command != "psql":
        parser.error(f"{args.command} takes no arguments (only psql passes them on)")
    try:
        settings = load_settings()
        pgdata = settings.embedded_pgdata
        if args.command == "stop":
            print(f"stopped {pgdata}" if stop(pgdata) else f"not running: {pgdata}")
            return 0
        if settings.database_url:
            # Counts read on the embedded server while runs write elsewhere would mislead.
            raise IngestError(
                "DATABASE_URL or POSTGRES_HOST is set, so runs use that server, "
                "not the embedded one: connect to it instead"
            )
        url = embedded_database_url(pgdata)
    except IngestError as exc:
        print(f"embedded: {exc}", file=sys.stderr)
        return 1
    if args.command == "uri":
        print(url)
        return 0
    # The server through libpq's variables, not a URI argument, which psql's own -d
    # (another database) would replace whole, socket folder included.
    from psycopg.conninfo import conninfo_to_dict

    env = dict(os.environ)
    for key, value in conninfo_to_dict(url).items():
        env[f"PG{key.upper().replace('DBNAME', 'DATABASE')}"] = str(value)
    # A child, not exec: pgserver's exit handler then forgets this process's handle.
    return subprocess.run([_bin("psql"), *args.psql_args], env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
