"""The run's inputs, checked before any database work: the month folder, as_of, and
the Data Docs folder GX will write to.

Messages name the flow's parameters, seed_dir and as_of: the same words whether they
came from SEED_DIR and AS_OF, from --seed-dir and --as-of, or from a deployment run's
parameters in the UI (they said AS_OF to a person who had typed --as-of).
"""

from __future__ import annotations

import argparse
import calendar
import os
import re
from datetime import date, timedelta
from pathlib import Path

from .errors import InputError
from .registry import EARLIEST_DATE, TABLES
from .settings import Settings, flag, load_dotenv_if_present, month_from_env

_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def parse_as_of(value: str, today: date | None = None) -> date:
    try:
        # fromisoformat alone also takes 20240131 and week dates (2024-W05-3)
        if not _ISO_DATE.fullmatch(value.strip()):
            raise ValueError(value)
        as_of = date.fromisoformat(value.strip())
    except (ValueError, AttributeError):
        raise InputError(
            f"as_of {value!r} is not a valid date; expected YYYY-MM-DD, e.g. 2024-01-31"
        ) from None
    today = today or date.today()
    # A month is known once it has happened. A mistyped future as_of (2204 for 2024) would
    # become the latest month, and every real month after it a backfill that never
    # reaches the live tables. One day of slack: this machine's date may still be
    # yesterday where the month has already ended (a zone ahead of its clock).
    if as_of > today + timedelta(days=1):
        raise InputError(
            f"as_of {as_of} is after today ({today}); a month's files describe what was "
            "known on its as_of, so it cannot be in the future"
        )
    if as_of < EARLIEST_DATE:  # no signup date could be on or before it
        raise InputError(f"as_of {as_of} is before {EARLIEST_DATE}; expected a recent month end")
    # A month's files describe what was known at its end; a mid-month as_of (a day
    # typed for another) would be a second snapshot of that month.
    if as_of != (end := month_end(as_of)):
        raise InputError(
            f"as_of {as_of} is not the last day of its month; a month is published as of "
            f"its end ({end})"
        )
    return as_of


def text_path(seed_dir: str) -> str:
    """seed_dir (SEED_DIR, --seed-dir), refused if its bytes are no UTF-8 text (a name
    in another encoding, which the filesystem keeps): Prefect sends a run's parameters
    as JSON text, and the run ended in "unexpected UnicodeEncodeError: ... surrogates not
    allowed"."""
    try:
        seed_dir.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(
            f"seed_dir {seed_dir!r}: the folder's path is not UTF-8 text (a name written "
            "in another encoding); rename it"
        ) from None
    return seed_dir


def month_files(seed_dir: Path) -> dict[str, Path]:
    text_path(str(seed_dir))
    if not seed_dir.is_dir():
        # A relative path is the runner's working folder's: a deployment's is the image's
        # WORKDIR (/app), not where the months are mounted. Nor is ~ anyone's home there.
        where = "" if seed_dir.is_absolute() else f" (from the working folder {os.getcwd()})"
        if not seed_dir.exists():
            what = "does not exist"
        elif seed_dir.is_file():  # e.g. the month's users.csv given for its folder
            what = "is a file; expected the month's folder, which holds the six files"
        else:
            what = "is not a directory"
        raise InputError(f"seed_dir {str(seed_dir)!r} {what}{where}")
    files = expected_files(seed_dir)
    for path in files.values():
        if path.exists() and not path.is_file():  # a folder, a device: "missing" would mislead
            raise InputError(f"{seed_dir}: {path.name} is not a regular file")
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise InputError(
            f"{seed_dir}: missing file {', '.join(missing)} "
            f"(a month folder holds {', '.join(t.file_name for t in TABLES)})"
        )
    return files


def docs_dir_ready(docs_dir: Path) -> Path:
    """GX_DOCS_DIR, created if need be: checked before the run, not found out by GX later."""
    if docs_dir.exists() and not docs_dir.is_dir():
        raise InputError(f"GX_DOCS_DIR {str(docs_dir)!r} is a file; expected a folder")
    try:
        docs_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(docs_dir, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise InputError(
            f"GX_DOCS_DIR {str(docs_dir)!r} cannot be written: {exc.strerror or exc}"
        ) from None
    return docs_dir


def check_run(seed_dir: str, as_of: str, settings: Settings) -> tuple[date, dict[str, Path]]:
    """A run's as_of and month files, once everything it needs from outside is there."""
    as_of_date = parse_as_of(as_of)
    if not seed_dir.strip():  # Path("") is the working folder: its files are no month's
        raise InputError(
            f"seed_dir {seed_dir!r} is empty; expected the month's folder, "
            "e.g. /data/seeds/month_000"
        )
    files = month_files(Path(seed_dir))
    docs_dir_ready(settings.gx_docs_dir)
    return as_of_date, files


def cli_parser(description: str | None, *, add_help: bool = True) -> argparse.ArgumentParser:
    """``ingest_flow.py [run|serve] [--seed-dir D] [--as-of YYYY-MM-DD] [--replace]
    [--allow-gap] [--allow-drop]``.

    ``add_help=False`` for the CLI's early looks at its arguments (``complete_run``).
    The defaults come from the environment, ``.env`` included (.env.example lists them).
    """
    load_dotenv_if_present()
    seed_dir, as_of = month_from_env()
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=add_help,
        # --seed for --seed-dir would slip past serve's refusal of a run's flags, and a
        # flag added later would change what an abbreviation means.
        allow_abbrev=False,
    )
    parser.add_argument("command", nargs="?", choices=["run", "serve"], default="run")
    parser.add_argument("--seed-dir", default=seed_dir, help="month folder (env SEED_DIR)")
    parser.add_argument(
        "--as-of",
        default=as_of,
        help="a month's last day, YYYY-MM-DD (env AS_OF)",
    )
    # Not read from REPLACE here: serve and --help never use it, and a bad value must
    # not stop them (flags_wanted reads it for a run).
    parser.add_argument(
        "--replace",
        action="store_true",
        default=None,
        help="replace an as_of already published from other files, or publish files "
        "already published under another as_of (env REPLACE=1)",
    )
    parser.add_argument(
        "--allow-gap",
        action="store_true",
        default=None,
        help="publish a month more than one month after the latest published one (env ALLOW_GAP=1)",
    )
    parser.add_argument(
        "--allow-drop",
        action="store_true",
        default=None,
        help="publish a month that lists more than MAX_USERS_DROP_PERCENT (default 50) "
        "percent fewer users than the month published before it, or leaves out more than "
        "that share of its users (env ALLOW_DROP=1)",
    )
    return parser


# A run's yes/no flags: the flow's parameter (--allow-gap for allow_gap), and the
# variable read when the flag is not given.
RUN_FLAGS = {"replace": "REPLACE", "allow_gap": "ALLOW_GAP", "allow_drop": "ALLOW_DROP"}


def flags_wanted(args: argparse.Namespace) -> dict[str, bool]:
    """Each of RUN_FLAGS: given on the command line, else its variable (InputError if that
    is neither yes nor no)."""
    return {name: bool(getattr(args, name)) or flag(env) for name, env in RUN_FLAGS.items()}


def complete_run(argv: list[str]) -> argparse.Namespace | None:
    """The arguments of a complete ``run``, for the CLI's looks before the flow starts.

    None for ``serve``, a command without its seed dir or as_of, a request for help,
    or an argument it does not know (``--replce``): the full parser answers those, with
    the module's description or its usage error.
    """
    args, unknown = cli_parser(None, add_help=False).parse_known_args(argv)
    if unknown or args.command != "run" or not args.seed_dir or not args.as_of:
        return None
    if any(a in ("-h", "--help") for a in argv):
        return None
    vars(args).update(flags_wanted(args))
    return args


def expected_files(seed_dir: Path) -> dict[str, Path]:
    return {spec.name: seed_dir / spec.file_name for spec in TABLES}


def month_end(day: date) -> date:
    return day.replace(day=calendar.monthrange(day.year, day.month)[1])


def next_month_end(day: date) -> date:
    """The last day of the month after ``day``'s."""
    return month_end(month_end(day) + timedelta(days=1))


def months_between(earlier: date, later: date) -> int:
    return (later.year - earlier.year) * 12 + later.month - earlier.month
