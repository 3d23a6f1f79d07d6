"""The embedded default PostgreSQL, for runs outside Docker with no server configured.

Uses the ``pgserver`` wheel (real PostgreSQL binaries, no system install). The data
directory persists between runs so month_001 lands on top of month_000; the server
keeps running after the flow exits, like a local service, and is reused next time.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from .errors import IngestError
from .settings import Settings


def embedded_database_url(pgdata: Path) -> str:
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
    pgdata.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(pgdata, cleanup_mode=None)
    return server.get_uri()


def resolve_database_url(settings: Settings) -> str:
    """The configured server, or else the embedded one (started if needed)."""
    return settings.database_url or embedded_database_url(settings.embedded_pgdata)
