"""The command lines' own output: a character stdout or stderr cannot encode is written
as its escape, never a crash."""

from __future__ import annotations

import io
import sys


def escape_unencodable() -> None:
    """Make stdout and stderr write a character their encoding lacks as its escape
    (``é`` as ``\\xe9``, ``🙂`` as ``\\U0001f642``) instead of raising UnicodeEncodeError.

    Their lines quote what people chose: the month's folder, the Data Docs path, a run's
    error (with a value from the month's files). With an ASCII or Latin-1 stream
    (PYTHONIOENCODING, a C or non-UTF-8 locale), the CLI printed its month as published,
    then crashed with exit 1, and on every rerun's "nothing to do" too; verify crashed
    on its ledger. Python already escapes so on stderr, unless PYTHONIOENCODING names
    its own error handler; stdout it leaves strict. Each entry point calls this first.
    A stream that is no TextIOWrapper (a test's StringIO, None without a console) is
    left as it is; the streams are reconfigured in place, so the logging handlers that
    hold them escape too.
    """
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
