"""A month's files by their bytes: each file's sha256, the month's, and the stat rule
that recognises a file already hashed without reading it again.

The ledger records these fingerprints; the rerun rules compare them.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import unreadable


@dataclass(frozen=True)
class FileFingerprint:
    table: str
    file: str
    sha256: str
    bytes: int
    stat: dict | None = None
    """Where the file was and when it last changed, as seen while it was hashed."""

    def as_json(self) -> dict:
        entry = {"file": self.file, "sha256": self.sha256, "bytes": self.bytes}
        return entry | ({"stat": self.stat} if self.stat else {})


def _stat(path: Path, st: os.stat_result) -> dict:
    return {
        "path": str(path.resolve()),
        "device": st.st_dev,
        "inode": st.st_ino,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


def fingerprint_file(table: str, path: Path) -> FileFingerprint:
    hashed_at = time.time_ns()
    before = path.stat()
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:  # the first read of the month: name the file here
        raise unreadable(path, exc) from exc
    after = path.stat()
    stat = _stat(path, after) if _stat(path, before) == _stat(path, after) else None
    if stat is not None:
        stat["hashed_at_ns"] = hashed_at
    return FileFingerprint(table, path.name, digest.hexdigest(), size, stat)


def is_hashed_file(hashed: dict, st: os.stat_result) -> bool:
    """Whether an open file (its fstat) is the very file ``hashed`` describes, unwritten.

    ``hashed`` is a ``FileFingerprint.as_json()``; a file that changed while it was
    being hashed has no stat there, and is never the hashed file.
    """
    seen = hashed.get("stat")
    if not seen:
        return False
    return st.st_size == hashed["bytes"] and (
        (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        == (seen["device"], seen["inode"], seen["mtime_ns"], seen["ctime_ns"])
    )


# A file still at the same place, with the size and times recorded when it was hashed,
# holds the same bytes: every write moves a file's ctime, which no tool can set back
# (git's index relies on the same). Two writes within one tick of the filesystem's
# clock can share a ctime, so only files last changed well before they were hashed
# are trusted (git's "racily clean" rule); the others are hashed again.
RACY_MARGIN_NS = 2_000_000_000


def fingerprint_by_stat(recorded: dict, files: dict[str, Path]) -> list[FileFingerprint] | None:
    """The recorded fingerprints if no file changed since, by its stat; else None."""
    prints = []
    for table, path in files.items():
        entry = recorded.get(table) or {}
        seen = entry.get("stat")
        if not seen or entry.get("file") != path.name:
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        now = _stat(path, st) | {"hashed_at_ns": seen.get("hashed_at_ns")}
        if now != seen or st.st_size != entry["bytes"]:
            return None
        if seen["ctime_ns"] > seen["hashed_at_ns"] - RACY_MARGIN_NS:
            return None
        prints.append(FileFingerprint(table, entry["file"], entry["sha256"], entry["bytes"], seen))
    return prints


def month_fingerprint(files: list[FileFingerprint]) -> str:
    """One hash for the month: order-independent of how files were listed."""
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.table):
        digest.update(f"{f.table}:{f.sha256}\n".encode())
    return digest.hexdigest()


def fingerprint_month(
    recorded: dict | None,
    files: dict[str, Path],
    timings: dict[str, float],
    *,
    remember: bool = False,
) -> tuple[list[FileFingerprint], str]:
    """Each file's fingerprint, and the month's.

    Files untouched since they were ``recorded`` (the ledger's entry for the month,
    ``ledger.published_files``), or since this process hashed them with ``remember``,
    are known by their stat; the others are hashed. The time taken goes into
    ``timings`` as ``stat_check`` or ``fingerprint``, whichever answered.
    """
    start = time.perf_counter()
    step = "stat_check"
    prints = None
    for seen in (recorded, _hashed_here.get(_month_key(files))):
        if prints is None and seen:
            prints = fingerprint_by_stat(seen, files)
    if prints is None:
        prints = [fingerprint_file(table, path) for table, path in files.items()]
        if remember:
            _hashed_here[_month_key(files)] = {p.table: p.as_json() for p in prints}
        step = "fingerprint"
    timings[step] = round(time.perf_counter() - start, 3)
    return prints, month_fingerprint(prints)


# Months this process hashed with ``remember``: the CLI fingerprints a month to look
# for a no-op before it starts the flow, which fingerprints it again under its lock;
# the same stat rule spares it a second read of the files (2 s or more at 10M users).
_hashed_here: dict[tuple[str, ...], dict] = {}


def _month_key(files: dict[str, Path]) -> tuple[str, ...]:
    return tuple(sorted(str(p.resolve()) for p in files.values()))
