"""The command line of ingest_flow.py: what happens before Prefect is imported, the
arguments, and the one line (and exit code) a person gets at the end.

Nothing here imports Prefect at module level: an unchanged month is answered, and
GX and the API server started, before the flow module pays for that import.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import TYPE_CHECKING, cast

from .errors import IngestError, InputError, first_line
from .interrupts import STOPPED, PublishedThenInterrupted, StoppedUnpublished, Terminated
from .settings import check_prefect_settings, prefect_api_url
from .streams import escape_unencodable

if TYPE_CHECKING:
    from uuid import UUID

    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment

    from .warmup import Warmup

_RUN_FLAGS = ("--seed-dir", "--as-of", "--replace", "--allow-gap", "--allow-drop")


def closed_deployment(flow: Flow, name: str) -> RunnerDeployment:
    """The flow's deployment, whose parameters the Prefect server checks before it
    creates a run: their names too, not only their types.

    Prefect's schema lets other names through. A run sent with one (``replce``, from
    the API or the UI's JSON editor) was created, then ended Crashed before the flow
    started, with no log line: the reason was only on the runner's console. Closed,
    the server refuses it and names it, as Prefect's CLI already does.
    """
    from prefect.utilities.callables import ParameterSchema

    class Closed(ParameterSchema):
        additionalProperties: bool = False  # JSON Schema's own spelling

    # Called outside an event loop, to_deployment returns the deployment, not a coroutine.
    deployment = cast("RunnerDeployment", flow.to_deployment(name=name))
    schema = deployment._parameter_openapi_schema  # what Prefect made of the signature
    # Given, not left to its default: Prefect sends the fields that were set only.
    deployment._parameter_openapi_schema = Closed(
        **schema.model_dump(exclude_unset=True), additionalProperties=False
    )
    return deployment


def serve_closed(flow: Flow, name: str) -> None:
    """``flow.serve(name=name)`` with the deployment's parameter schema closed.

    Built as Flow.serve builds it (prefect/flows.py, Runner.add_flow): the runner starts
    each run from this flow object, in a child process. ``prefect.serve(deployment)``
    would start them by importing the entrypoint again (``python -m prefect.engine``),
    another path than the one measured and tested.
    """
    import asyncio

    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    runner = Runner(name=name, pause_on_shutdown=True)
    deployment_id = cast("UUID", runner.add_deployment(closed_deployment(flow, name)))
    runner._deployment_registry.register_flow(deployment_id, flow)  # as add_flow does
    print(
        f"Your flow {flow.name!r} is being served and polling for scheduled runs; "
        f"to trigger a run: prefect deployment run '{flow.name}/{name}' "
        "--param seed_dir=... --param as_of=YYYY-MM-DD",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt, TerminationSignal):  # the runner's stop
        asyncio.run(runner.start())


def before_prefect(argv: list[str]) -> Warmup:
    """What the CLI does before it imports Prefect and the flow's modules: exit at once
    on bad Prefect settings or an unchanged month, else start the API server and the
    GX process, which start up while this process imports Prefect (warmup.py says what
    that saves)."""
    escape_unencodable()  # before the first line: the no-op one names the month's folder

    def stopped_while_starting(signum: int, frame: object) -> None:
        # Ctrl-C or SIGTERM while Prefect and the flow's modules import: one line, not
        # an import traceback. Nothing has started that needs stopping: the API server
        # dies with this process, the GX process when its stdin closes.
        line, code = STOPPED[signal.Signals(signum)]
        print(line, file=sys.stderr)
        os._exit(code)

    for stop in STOPPED:
        signal.signal(stop, stopped_while_starting)

    try:
        check_prefect_settings()
    except InputError as exc:
        print(f"ingest failed: {exc}", file=sys.stderr)
        sys.exit(1)
    _exit_if_unchanged(argv)
    from .warmup import warm_up

    return warm_up(argv)


def _exit_if_unchanged(argv: list[str]) -> None:
    """Print the no-op line and exit 0, or the input error and exit 1, or return.

    A month folder, file or as_of that is plainly wrong (or a setting) is reported here,
    in one line, rather than after Prefect has started. Everything else (a new month, a
    replacement, a refusal, a database that cannot be reached) goes to the flow, which
    decides again under its own lock and reports as usual.
    """
    # Imported here, once before_prefect's signal handlers are in place: a Ctrl-C
    # during these imports is then one line too.
    import psycopg

    from .diagnosis import explain_failure
    from .inputs import check_run, complete_run
    from .rerun import unchanged_month
    from .settings import load_settings

    try:
        args = complete_run(argv)  # reads REPLACE, which may be neither yes nor no
        if args is None:
            return
        if args.replace:  # never a no-op: its inputs are checked now, not after Prefect
            check_run(args.seed_dir, args.as_of, load_settings())
            return
        summary = unchanged_month(args.seed_dir, args.as_of)
    except InputError as exc:  # no run to start: the folder, a file, as_of or a setting
        print(f"ingest failed: {exc}", file=sys.stderr)
        sys.exit(1)
    except psycopg.errors.ConnectionTimeout as exc:  # the flow would wait as long again
        print(f"ingest failed: {explain_failure(exc)}", file=sys.stderr)
        sys.exit(1)
    except Exception:  # a refusal, no database: the flow reports it, and retries
        return
    if summary is not None:
        print(summary.one_line())
        sys.exit(0)


def _without_the_api(exc: Exception) -> tuple[int, str | None, str] | None:
    """The run's own outcome when Prefect's API stopped answering during it: (exit code,
    stdout line, stderr line), or None for another error.

    Prefect's client retries for minutes, then the flow call raises its ConnectError in
    place of the run's outcome, though the ledger has it: a published month read as
    'unexpected ConnectError' (exit 1), a failed one lost its reason.
    """
    import httpx

    from .runs import LAST_RUN

    if not isinstance(exc, httpx.TransportError):
        return None
    api = prefect_api_url() or "the CLI's temporary server"
    lost = (
        f"Prefect's API ({api}) stopped answering during the run ({first_line(exc)}): "
        "the run's state in the Prefect UI is not its outcome, ingest_runs has it"
    )
    summary = LAST_RUN[0] if LAST_RUN else None
    if summary is not None and summary.status in ("succeeded", "noop"):
        return 0, summary.one_line(), f"warning: {lost}"
    if summary is not None and summary.status == "failed" and summary.error:
        return 1, None, f"ingest failed: {summary.error} ({lost})"
    return 1, None, f"ingest failed: {lost}"


def main(flow: Flow[..., dict], doc: str | None, argv: list[str] | None = None) -> int:
    """Serve ``flow``, or run it once for the month the arguments (or SEED_DIR and AS_OF)
    name; the exit code: 0 published or unchanged, 1 failed, 2 a usage error."""
    from prefect.exceptions import TerminationSignal

    from .inputs import cli_parser, flags_wanted, text_path
    from .runs import LAST_RUN, in_words
    from .served import DEPLOYMENT_NAME

    # Also here, for ingest_flow.main() called without before_prefect: --help prints the
    # module's diagram (box-drawing characters), the last line names the month's folder.
    escape_unencodable()
    parser = cli_parser(doc)
    args = parser.parse_args(argv)
    if args.command == "serve":
        given = [
            a for a in (sys.argv[1:] if argv is None else argv) if a.split("=")[0] in _RUN_FLAGS
        ]
        if given:  # they would be ignored without a word: each run brings its own
            parser.error(
                f"serve takes no {', '.join(given)}: a deployment run gets seed_dir, as_of, "
                "replace, allow_gap and allow_drop as its parameters"
            )
        serve_closed(flow, DEPLOYMENT_NAME)
        return 0
    missing = [
        f"{env} (or {flag})"
        for env, flag, value in (
            ("SEED_DIR", "--seed-dir", args.seed_dir),
            ("AS_OF", "--as-of", args.as_of),
        )
        if not value
    ]
    if missing:  # a usage error, like argparse's own: exit code 2
        print(f"ingest failed: set {' and '.join(missing)}", file=sys.stderr)
        return 2
    LAST_RUN.clear()  # the flow names its run there: no earlier run's (in-process tests)
    try:
        result = flow(
            seed_dir=text_path(args.seed_dir),
            as_of=args.as_of,
            **flags_wanted(args),
        )
    except IngestError as exc:
        if LAST_RUN and LAST_RUN[0].data_docs:  # a refused month's, its failures shown
            print(f"GX Data Docs: {LAST_RUN[0].data_docs}")
        print(f"ingest failed: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, TerminationSignal) as exc:
        raise _stopped(exc) from None
    except Exception as exc:  # still one line for people; the traceback is in the run logs
        if (lost := _without_the_api(exc)) is not None:
            code, out, err = lost
            if out:
                print(out)
            print(err, file=sys.stderr)
            return code
        if isinstance(exc, RuntimeError) and str(exc).startswith("Failed to reach API"):
            # Prefect's words name the address, not where it came from, nor that an HTTP
            # error (a URL without /api) reads the same.
            print(
                f"ingest failed: {exc} (PREFECT_API_URL, or the CLI's temporary server): is "
                "that server up, and does the URL end in /api?",
                file=sys.stderr,
            )
            return 1
        print(f"ingest failed: {in_words(exc)}", file=sys.stderr)
        return 1
    try:
        print(result["line"])
        if result.get("data_docs"):
            print(f"GX Data Docs: {result['data_docs']}")
    except KeyboardInterrupt as exc:
        raise _stopped(exc) from None
    return 0


def _stopped(exc: BaseException) -> BaseException:
    """What a stop during or after the run raises to Warmup.run. After the flow's own
    handling of a stop ended (emptying staging, the lock's release, Prefect's end of the
    run, printing its line), a published month (runs.LAST_RUN) is said to be in, and a
    run recorded failed to have published nothing; Prefect's SIGTERM is stopped as on
    Ctrl-C."""
    from prefect.exceptions import TerminationSignal

    from .runs import LAST_RUN

    if isinstance(exc, PublishedThenInterrupted):
        return exc
    if LAST_RUN and LAST_RUN[0].status == "succeeded":
        return PublishedThenInterrupted(exc, docs_built=None)
    # Failed, and its publisher never returned from a COMMIT (one whose connection
    # dropped may still have landed: the ledger's row says, whatever the line does).
    if LAST_RUN and LAST_RUN[0].stopped_outcome:
        return StoppedUnpublished(exc, LAST_RUN[0].stopped_outcome)
    return Terminated() if isinstance(exc, TerminationSignal) else exc
