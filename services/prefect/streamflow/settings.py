"""One place for configuration: environment (and ``.env`` when present) -> Settings."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

PACKAGE_DIR = Path(__file__).resolve().parent


def _app_dir() -> Path:
    # In the repo the package sits in services/prefect/; in the image, in /app beside db/.
    for candidate in (*PACKAGE_DIR.parents[2:3], PACKAGE_DIR.parent):
        if (candidate / "db" / "init").is_dir():
            return candidate
    return PACKAGE_DIR.parent


APP_DIR = _app_dir()
DB_DIR = APP_DIR / "db"  # db/init and db/sql

# What a run publishes, and which checks it may skip: the inputs of a run, which a
# test, a benchmark or the report's figures must not take from a developer's shell.
RUN_VARIABLES = (
    "SEED_DIR",
    "AS_OF",
    "REPLACE",
    "ALLOW_GAP",
    "ALLOW_DROP",
    "MAX_USERS_DROP_PERCENT",
)

_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"", "0", "false", "no", "n", "off"}


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    """None means: start (or reuse) the embedded PostgreSQL in ``embedded_pgdata``."""
    embedded_pgdata: Path
    gx_docs_dir: Path
    lock_wait_seconds: float
    max_users_drop_percent: float
    """How many percent fewer users than the month published before it a month may list,
    and how many percent of that month's users it may leave out (0-100)."""


def load_dotenv_if_present() -> None:
    """Read ``.env`` from the working directory or the repo root; real env wins."""
    try:
        from dotenv import load_dotenv
    except ImportError:  # the flow works without python-dotenv, just without .env
        return
    for candidate in (Path.cwd() / ".env", APP_DIR / ".env"):
        if candidate.is_file():
            load_dotenv(candidate, override=False)
            return


def database_url_from_env(env: os._Environ[str] | dict[str, str] = os.environ) -> str | None:
    """libpq's connection string: ``DATABASE_URL`` first, then the ``POSTGRES_*`` names
    of ``.env``; None if neither. White space around a value is dropped (' ' is unset),
    except in POSTGRES_PASSWORD, taken as written."""
    url = env.get("DATABASE_URL", "").strip()
    if url:
        return _checked_conninfo(url)
    host = env.get("POSTGRES_HOST", "").strip()
    if not host:
        return None
    # Imported here, as in _checked_conninfo: the runner's healthcheck (served.py)
    # reads this module every few seconds, and needs no psycopg.
    from psycopg.conninfo import make_conninfo

    # key=value pairs, each value quoted by libpq's rules: a socket folder, an IPv6
    # address or a password holding @ or / is taken as written. Pasted into a URL, they
    # changed which server or database was meant, and a host libpq could not parse had
    # its URL, password and all, quoted in the error.
    return make_conninfo(
        host=host,
        port=_port(env),
        user=env.get("POSTGRES_USER", "").strip() or "postgres",
        password=env.get("POSTGRES_PASSWORD") or None,  # as written: spaces may be its own
        dbname=env.get("POSTGRES_DB", "").strip() or "postgres",
    )


def _port(env: os._Environ[str] | dict[str, str]) -> str:
    raw = env.get("POSTGRES_PORT", "").strip() or "5432"
    if not (raw.isascii() and raw.isdigit() and 0 < int(raw) < 65536):
        raise InputError(f"POSTGRES_PORT {raw!r} is not a port number (1-65535, e.g. 5432)")
    return raw


def _checked_conninfo(url: str) -> str:
    """DATABASE_URL, once libpq can parse it: found out before the run starts, and
    never echoed (libpq's parse error quotes the string, password and all, into the
    run's logs)."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(url)
    except (ProgrammingError, ValueError):  # ValueError: bytes that are no text
        raise InputError(
            "DATABASE_URL is not a PostgreSQL connection string; expected "
            "postgresql://user:password@host:port/dbname (a % in the password written "
            "%25, an @ %40) or key=value pairs (host=... dbname=...); its value is not "
            "shown, as it may hold a password"
        ) from None
    return url


def flag(name: str, env: os._Environ[str] | dict[str, str] = os.environ) -> bool:
    """A yes/no variable; anything else is refused rather than read as "no" (for REPLACE,
    a misspelt yes would otherwise end in a refusal that says to set it)."""
    raw = env.get(name, "")
    value = raw.strip().lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise InputError(f"{name} {raw!r} is neither yes nor no (1/true/yes/y/on or 0/false/no/n/off)")


def _seconds(env: os._Environ[str] | dict[str, str], name: str, default: str) -> float:
    raw = env.get(name) or default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise InputError(f"{name} {raw!r} is not a number of seconds (e.g. {name}={default})")
    return value


def _percent(env: os._Environ[str] | dict[str, str], name: str, default: str) -> float:
    raw = env.get(name, "").strip() or default
    try:
        value = float(raw.removesuffix("%"))
    except ValueError:
        value = -1.0
    if not 0 <= value <= 100:  # also refuses nan
        raise InputError(
            f"{name} {raw!r} is not a percentage from 0 to 100 (e.g. {name}={default})"
        )
    return value


def month_from_env(
    env: os._Environ[str] | dict[str, str] = os.environ,
) -> tuple[str | None, str | None]:
    """SEED_DIR and AS_OF (None when unset or empty): the month a run ingests when no
    flag names it."""
    return env.get("SEED_DIR") or None, env.get("AS_OF") or None


def prefect_api_url(env: os._Environ[str] | dict[str, str] = os.environ) -> str | None:
    """PREFECT_API_URL, Prefect's own setting (Prefect reads it too): the server runs go
    to; None when unset, and the CLI then starts a temporary one for its run."""
    return env.get("PREFECT_API_URL") or None


def prefect_api_auth(env: os._Environ[str] | dict[str, str] = os.environ) -> str | None:
    """PREFECT_API_AUTH_STRING ("user:password"), which a server started with
    PREFECT_SERVER_API_AUTH_STRING expects from its clients."""
    return env.get("PREFECT_API_AUTH_STRING") or None


# Prefect's own settings that .env.example documents for the CLI: Prefect reads them at
# import, and a bad one ended the run in a 50-line pydantic traceback.
_PREFECT_WHOLE_SECONDS = ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",)


def check_prefect_settings() -> None:
    """InputError for a documented Prefect setting Prefect would refuse at import; for
    the flow's CLI, before it imports Prefect, whatever the command (serve included)."""
    load_dotenv_if_present()
    for name in _PREFECT_WHOLE_SECONDS:
        raw = os.environ.get(name, "").strip()
        if raw and not (raw.isascii() and raw.isdigit()):
            raise InputError(f"{name} {raw!r} is not a whole number of seconds (e.g. {name}=120)")


def load_settings() -> Settings:
    """The run's configuration; an unusable value raises InputError naming the variable."""
    load_dotenv_if_present()
    env = os.environ
    return Settings(
        database_url=database_url_from_env(env),
        # An empty value (``GX_DOCS_DIR=`` in .env) means the default, not the cwd.
        embedded_pgdata=Path(env.get("STREAMFLOW_PGDATA") or APP_DIR / ".pgdata").resolve(),
        gx_docs_dir=Path(env.get("GX_DOCS_DIR") or APP_DIR / "var" / "gx_docs").resolve(),
        lock_wait_seconds=_seconds(env, "LOCK_WAIT_SECONDS", "600"),
        max_users_drop_percent=_percent(env, "MAX_USERS_DROP_PERCENT", "50"),
    )
