"""The ``ledgerflow`` command line.  ``docs/cli.md`` is generated from this parser.

What it prints never shows a secret: :func:`main` writes through streams that mask
every secret the command knows of (``engine/_redact.py``) and every URL password.  Nor
does it show the values of rows an error carries (SQL statement parameters, a value a
database driver quotes) unless ``run`` or ``resume`` is given ``--verbose``: row data
belongs in the Landscape, not in logs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import signal
import sys
import traceback
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio
from rich.console import Console
from rich.text import Text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

import plugins.llm as llm
from landscape import DEFAULT_URL, Landscape, LandscapeError, diff_runs
from landscape._lineage import LineageNotFound
from landscape._verify import RunNotFound

from ._errors import ConfigError, LedgerflowError, RunFailed
from ._pipeline import Pipeline, RunResult, new_run_id
from ._progress import LiveProgress
from ._redact import (
    MIN_SECRET_LENGTH,
    REDACTED,
    Secrets,
    mask_in_output,
    masked_output,
    redact_url,
    secrets_of,
    url_credentials,
    without_row_values,
)
from ._render import render_lineage, render_runs, render_verify
from ._render_diff import render_diff

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from rich.console import RenderableType

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_ROW_ERRORS",
    "EXIT_SIGINT",
    "build_parser",
    "main",
]

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 3
#: The run completed, but some rows failed or took an error route.
EXIT_ROW_ERRORS = 4
#: Ctrl-C before a run began (the shell's convention, 128 + SIGINT).
EXIT_SIGINT = 130


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also the source of ``docs/cli.md``)."""
    parser = argparse.ArgumentParser(
        prog="ledgerflow", description="Streaming, fully audited data pipelines."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (
        _add_run,
        _add_resume,
        _add_validate,
        _add_explain,
        _add_diff,
        _add_runs,
        _add_verify,
        _add_mock_llm,
    ):
        add_command(commands)
    return parser


Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _add_run(commands: Commands) -> None:
    run = commands.add_parser(
        "run",
        help="run a pipeline",
        description=(
            "Run a pipeline with a live progress display; prints the run id and outcome counts. "
            "Exit code 0 when the run completed with no row errors, 4 when it completed but "
            "rows failed or took an error route, 3 when it was interrupted, 1 when it failed, "
            "2 for an invalid pipeline file or a source that cannot be read. " + _SECRETS_NOTE
        ),
    )
    run.add_argument("pipeline", metavar="PIPELINE.yaml", help="the pipeline file")
    _landscape_option(run, "default: the pipeline's landscape.url, else " + DEFAULT_URL)
    run.add_argument("--no-progress", action="store_true", help="no live progress display")
    _verbose_option(run)
    run.add_argument(
        "--replay",
        metavar="RUN_ID",
        help=(
            "answer every external call from the calls recorded in run RUN_ID (matched by "
            "request hash; no network); a request it never made is the row's error "
            "(replay_miss)"
        ),
    )


def _add_resume(commands: Commands) -> None:
    resume = commands.add_parser(
        "resume",
        help="continue an interrupted or crashed run",
        description=(
            "Continue an interrupted or crashed run of PIPELINE.yaml where it stopped: the same "
            "run and tokens, finished rows skipped, sinks cut back to what the Landscape "
            "recorded, recorded LLM answers reused. Refused when the pipeline or the source "
            "changed, or when the run completed. Exit codes as for run. " + _SECRETS_NOTE
        ),
    )
    resume.add_argument("run_id", metavar="RUN_ID")
    resume.add_argument(
        "--pipeline", metavar="PIPELINE.yaml", required=True, help="the run's pipeline file"
    )
    _landscape_option(resume, "default: the pipeline's landscape.url, else " + DEFAULT_URL)
    resume.add_argument("--no-progress", action="store_true", help="no live progress display")
    _verbose_option(resume)


def _add_validate(commands: Commands) -> None:
    validate = commands.add_parser(
        "validate",
        help="check a pipeline file and print its graph",
        description=(
            "Check the configuration, the DAG and that the source can be read; print the "
            "graph. Exit code 2 and every problem with its key path when there is one."
        ),
    )
    validate.add_argument("pipeline", metavar="PIPELINE.yaml", help="the pipeline file")


def _add_explain(commands: Commands) -> None:
    explain = commands.add_parser(
        "explain",
        help="show the lineage of one row",
        description=(
            "Lineage tree of one row: the source row, every node state, routing decisions with "
            "their condition, calls, forks, the final outcome and sink."
        ),
    )
    explain.add_argument("run_id", metavar="RUN_ID")
    which = explain.add_mutually_exclusive_group(required=True)
    which.add_argument("--row-index", type=int, metavar="N", help="source row index (0-based)")
    which.add_argument("--row-id", metavar="ID", help="row id")
    which.add_argument("--token-id", metavar="ID", help="token id")
    explain.add_argument("--json", action="store_true", help="print JSON instead of a tree")
    _landscape_option(explain)


def _add_diff(commands: Commands) -> None:
    diff = commands.add_parser(
        "diff",
        help="compare two runs row by row",
        description=(
            "Compare two runs of the same source, rows matched by row index: counts of "
            "identical and differing rows, rows only in one run and rows whose source data "
            "differs; for each differing row its outcomes and sinks in each run, the fields "
            "of its final rows that differ and the first node where its lineages diverge, "
            "with what each run decided there (a gate's condition and value, an LLM's "
            "answer). Exit code 0 whether or not the runs differ, 1 for an unknown run."
        ),
    )
    diff.add_argument("run_a", metavar="RUN_A", help="the run compared against")
    diff.add_argument("run_b", metavar="RUN_B", help="the run compared")
    diff.add_argument(
        "--limit",
        type=int,
        default=50,
        metavar="N",
        help="differing rows analysed and shown (default 50; 0 for all); counts are complete",
    )
    diff.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _landscape_option(diff)


def _add_runs(commands: Commands) -> None:
    runs = commands.add_parser(
        "runs", help="list runs", description="List runs with status and counts."
    )
    _landscape_option(runs)


def _add_verify(commands: Commands) -> None:
    verify = commands.add_parser(
        "verify",
        help="check a run's audit invariants",
        description=(
            "Check the audit invariants of a run, and that each file sink's file is still what "
            "the run wrote (size and SHA-256); exit code 1 and each violation printed if any."
        ),
    )
    verify.add_argument("run_id", metavar="RUN_ID")
    verify.add_argument(
        "--deep",
        action="store_true",
        help="also hash every payload the run names again and compare it with its hash",
    )
    _landscape_option(verify)


def _add_mock_llm(commands: Commands) -> None:
    mock = commands.add_parser(
        "mock-llm",
        help="serve an OpenAI-compatible test endpoint",
        description=(
            "Serve an OpenAI-compatible mock LLM on 127.0.0.1 (chat completions with text, "
            "json and json_schema answers derived from the prompt and the seed; embeddings; "
            "batch jobs through /v1/files and /v1/batches; GET /stats) with injectable "
            "latency and errors. Prints its base URL; runs until interrupted."
        ),
    )
    mock.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    mock.add_argument("--latency-ms", type=float, default=0.0, help="latency of every answer")
    mock.add_argument(
        "--error-rate", type=float, default=0.0, help="share of requests answered 429/500/503"
    )
    mock.add_argument("--seed", type=int, default=0, help="seed of answers and faults")
    mock.add_argument(
        "--batch-delay-seconds",
        type=float,
        default=0.0,
        help="how long a batch job takes from creation to completion (default 0)",
    )


_SECRETS_NOTE = (
    "Secrets (API keys, passwords in URLs, proxy credentials, PGPASSWORD) are printed "
    "as ***: a URL's password wherever a URL is printed, and a secret of "
    f"{MIN_SECRET_LENGTH} characters or more wherever it occurs (a shorter one would mask "
    "ordinary text). The values of rows an error carries are printed only with --verbose."
)


def _landscape_option(parser: argparse.ArgumentParser, default_help: str = DEFAULT_URL) -> None:
    parser.add_argument(
        "--landscape",
        metavar="URL",
        help=(
            f"Landscape database URL ({default_help}); printed with its password as ***. "
            "A password written *** is read from PGPASSWORD, so a command printed with a "
            "masked password (the resume command) runs as printed with PGPASSWORD set"
        ),
    )


def _verbose_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help=(
            "print errors in full: the row values they carry (SQL statement parameters, a "
            "value a database driver quotes) and the traceback of an unexpected error; "
            "secrets stay masked"
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ledgerflow`` console script; returns the exit code.

    Everything printed while it runs has its secrets masked, whatever prints it (rich,
    ``print``, a traceback): see :func:`~engine._redact.masked_output`."""
    with masked_output():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    """Parse ``argv``, run the command and print how it ended; the exit code."""
    args = build_parser().parse_args(argv)
    verbose: bool = getattr(args, "verbose", False)
    out = Console()
    # Messages on stderr are never wrapped: logs and scripts grep them whole.
    err = Console(stderr=True, soft_wrap=True)
    try:
        args.landscape = _landscape_url(getattr(args, "landscape", None))
    except ValueError as exc:
        _report(err, "error", str(exc))
        return EXIT_CONFIG
    mask_in_output(Secrets(url_credentials(args.landscape)))
    handler = _COMMANDS[args.command]
    try:
        try:
            return anyio.run(handler, args, out, err)
        except BaseExceptionGroup as group:
            single = _single(group)
            # Its own cause is kept: what is printed of it looks behind it.
            raise single from single.__cause__
    except ConfigError as exc:
        err.print(_described(exc, verbose=verbose), markup=False, highlight=False)
        return EXIT_CONFIG
    except RunFailed as exc:
        _report(err, "failed", _described(exc, verbose=verbose))
        return EXIT_FAILED
    except (LedgerflowError, LandscapeError, LookupError) as exc:
        _report(err, "error", _described(exc, verbose=verbose))
        return EXIT_FAILED
    except KeyboardInterrupt:  # before the run listened for signals: nothing was recorded
        err.print("interrupted before the run began", highlight=False)
        return EXIT_SIGINT
    except Exception as exc:  # a bug: its traceback, as any error printed here
        text = "".join(traceback.format_exception(exc))
        text = without_row_values(text, exc, verbose=verbose)
        err.print(text.rstrip(), markup=False, highlight=False)
        return EXIT_FAILED


def _report(err: Console, label: str, message: str) -> None:
    """``label: message``, the label in bold red, the message as it is (no markup)."""
    err.print(Text.assemble((label, "bold red"), ": ", message), highlight=False)


def _landscape_url(given: str | None) -> str | None:
    """The ``--landscape`` URL to use: ``given``, its password taken from ``PGPASSWORD``
    when it is written masked (``***``, as ledgerflow prints it).  Raises
    :class:`ValueError` when it is masked and ``PGPASSWORD`` is not set."""
    if given is None:
        return None
    try:
        url = make_url(given)
    except ArgumentError:
        return given  # opening the Landscape says what is wrong with it
    if url.password != REDACTED:
        return given
    password = os.environ.get("PGPASSWORD")
    if not password:
        raise ValueError(
            "--landscape: the URL's password is masked (***): set PGPASSWORD to the password"
        )
    return url.set(password=password).render_as_string(hide_password=False)


def _has_password(url: str) -> bool:
    """Whether the database URL ``url`` carries a password."""
    try:
        return make_url(url).password is not None
    except ArgumentError:
        return False


def _described(exc: BaseException, *, verbose: bool) -> str:
    """``str(exc)`` as printed: row values hidden unless ``verbose`` (see
    :func:`~engine._redact.without_row_values`)."""
    return without_row_values(str(exc), exc, verbose=verbose)


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside nested single-member groups, else the group itself."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _run(args: argparse.Namespace, out: Console, err: Console) -> int:
    pipeline = _load(args.pipeline, args.landscape)
    return await _drive(pipeline, None, args, out, err, replay=args.replay)


async def _resume(args: argparse.Namespace, out: Console, err: Console) -> int:
    pipeline = _load(args.pipeline, args.landscape)
    return await _drive(pipeline, args.run_id, args, out, err)


def _load(path: str, landscape_url: str | None = None) -> Pipeline:
    """The pipeline of ``path``; every secret it names is masked in what is printed
    from now on."""
    pipeline = Pipeline.from_yaml(path, landscape_url=landscape_url)
    base_dir = pipeline.graph.base_dir
    mask_in_output(secrets_of(pipeline.settings, base_dir, landscape_url=landscape_url))
    return pipeline


async def _drive(
    pipeline: Pipeline,
    resume_id: str | None,
    args: argparse.Namespace,
    out: Console,
    err: Console,
    *,
    replay: str | None = None,
) -> int:
    """Run (or resume, or replay) with progress, stopping on signals; print how it ended.

    The run id is printed on stderr first: a process killed outright prints nothing
    more, and the id is what ``resume`` needs.
    """
    show_progress = not args.no_progress and out.is_terminal
    drain = pipeline.settings.runtime.drain_timeout_seconds
    run_id = resume_id or new_run_id()
    err.print(
        f"{'resuming' if resume_id else 'starting'} run {run_id} (pid {os.getpid()})",
        highlight=False,
    )
    _freeze_startup_heap()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signals, pipeline, drain, err)
        with LiveProgress(out) if show_progress else nullcontext() as live:
            on_progress = None if live is None else live.update
            if resume_id is None:
                result = await pipeline.run(run_id=run_id, replay=replay, on_progress=on_progress)
            else:
                result = await pipeline.resume(resume_id, on_progress=on_progress)
        tg.cancel_scope.cancel()
    _print_result(out, result)
    if result.status == "interrupted":
        for line in _resume_hint(result.run_id, args):
            out.print(line, highlight=False, markup=False, soft_wrap=True)
        return EXIT_INTERRUPTED
    if result.row_errors:
        out.print(
            f"rows with errors: {result.row_errors} (failed, sent to an error sink, "
            "or diverted by a sink that could not write them)",
            highlight=False,
        )
        return EXIT_ROW_ERRORS
    return 0


def _resume_hint(run_id: str, args: argparse.Namespace) -> list[str]:
    """The lines that say how to resume the run: the command, with a Landscape password
    given on the command line masked, then how to supply that password."""
    command = ["ledgerflow", "resume", run_id, "--pipeline", args.pipeline]
    if not args.landscape:
        return [f"resume with: {shlex.join(command)}"]
    command += ["--landscape", redact_url(args.landscape)]
    lines = [f"resume with: {shlex.join(command)}"]
    if _has_password(args.landscape):
        lines.append(
            f"  (the Landscape password is printed as {REDACTED}: run the command with "
            "PGPASSWORD set to it, and the *** is read from there)"
        )
    return lines


def _freeze_startup_heap() -> None:
    """Keep what start-up built (modules, the parsed pipeline) out of every later
    garbage collection: a run allocates and frees objects per row, and each full
    collection would otherwise scan the whole start-up heap again (about half the
    collector's time on a long run).  The CLI owns its process; an application that
    embeds the engine makes this choice for itself."""
    gc.collect()
    gc.freeze()


async def _stop_on_signals(pipeline: Pipeline, drain: float, err: Console) -> None:
    """First SIGINT/SIGTERM: stop gracefully.  Second: cancel what still runs.  Later
    ones change nothing: the receiver stays open until the run has ended, so no signal
    falls back to Python's default handler while the shutdown records are written."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        received = 0
        async for signum in signals:
            name = signal.Signals(signum).name
            if not pipeline.running:  # not started yet, or already over
                continue
            received += 1
            if received == 1:
                err.print(
                    f"{name}: stopping — finishing in-flight rows (up to {drain:g} s); "
                    "signal again to cancel them",
                    highlight=False,
                )
                pipeline.stop()
            elif received == 2:
                err.print(f"{name}: cancelling in-flight work", highlight=False)
                pipeline.stop(force=True)
            else:
                err.print(
                    f"{name}: already cancelling; the run ends once its records are committed",
                    highlight=False,
                )


def _print_result(out: Console, result: RunResult) -> None:
    out.print(f"run_id: {result.run_id}", highlight=False)
    out.print(f"status: {result.status}", highlight=False)
    if result.stop_reason is not None:
        out.print(f"stopped: {result.stop_reason}", highlight=False, markup=False)
    out.print(f"rows: {result.rows_processed} in {result.duration_s:.2f} s", highlight=False)
    for outcome, count in sorted(result.outcomes.items()):
        out.print(f"  {outcome}: {count}", highlight=False)
    if result.calls.calls:
        out.print(result.calls.describe(), highlight=False)


async def _validate(args: argparse.Namespace, out: Console, err: Console) -> int:
    pipeline = _load(args.pipeline)
    await pipeline.check_inputs()
    out.print(f"{args.pipeline}: valid, {len(pipeline.graph.nodes)} nodes", highlight=False)
    for line in pipeline.graph.describe():
        out.print(f"  {line}", highlight=False, markup=False)
    return 0


async def _explain(args: argparse.Namespace, out: Console, err: Console) -> int:
    async with Landscape.connect(args.landscape or DEFAULT_URL, create=False) as landscape:
        try:
            lineage = await landscape.explain(
                args.run_id, row_index=args.row_index, row_id=args.row_id, token_id=args.token_id
            )
        except LineageNotFound as exc:
            _report(err, "not found", str(exc))
            return EXIT_FAILED
    _show(out, lineage.to_dict() if args.json else render_lineage(lineage))
    return 0


async def _diff(args: argparse.Namespace, out: Console, err: Console) -> int:
    if args.limit < 0:
        err.print("[bold red]error[/]: --limit must be 0 or more", highlight=False)
        return EXIT_FAILED
    async with Landscape.connect(args.landscape or DEFAULT_URL, create=False) as landscape:
        try:
            diff = await diff_runs(landscape, args.run_a, args.run_b, limit=args.limit or None)
        except RunNotFound as exc:
            _report(err, "not found", str(exc))
            return EXIT_FAILED
    _show(out, diff.to_dict() if args.json else render_diff(diff))
    return 0


def _show(out: Console, result: dict[str, Any] | RenderableType) -> None:
    """Print ``result``: a dict as JSON (for ``--json``), anything else drawn by rich."""
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
    else:
        out.print(result)


async def _runs(args: argparse.Namespace, out: Console, err: Console) -> int:
    async with Landscape.connect(args.landscape or DEFAULT_URL, create=False) as landscape:
        out.print(render_runs(await landscape.list_runs()))
    return 0


async def _verify(args: argparse.Namespace, out: Console, err: Console) -> int:
    async with Landscape.connect(args.landscape or DEFAULT_URL, create=False) as landscape:
        try:
            report = await landscape.verify(args.run_id, deep=args.deep)
        except RunNotFound as exc:
            _report(err, "not found", str(exc))
            return EXIT_FAILED
    out.print(render_verify(report))
    return 0 if report.ok else EXIT_FAILED


async def _mock_llm(args: argparse.Namespace, out: Console, err: Console) -> int:
    # plugins.llm loads the mock server (and aiohttp) on first use of its names.
    settings = llm.settings_from_options(
        latency_ms=args.latency_ms,
        error_rate=args.error_rate,
        seed=args.seed,
        batch_delay_seconds=args.batch_delay_seconds,
    )
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            await tg.start(llm.serve, settings, "127.0.0.1", args.port)
            async for _ in signals:
                tg.cancel_scope.cancel()
                break
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace, Console, Console], Awaitable[int]]] = {
    "run": _run,
    "resume": _resume,
    "validate": _validate,
    "explain": _explain,
    "diff": _diff,
    "runs": _runs,
    "verify": _verify,
    "mock-llm": _mock_llm,
}


if __name__ == "__main__":
    sys.exit(main())
