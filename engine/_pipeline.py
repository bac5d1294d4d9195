"""``Pipeline``: load a pipeline, run it, stop it."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import anyio

from landscape import (
    CallSummary,
    Landscape,
    LandscapeError,
    LandscapeNotFound,
    OwnershipLost,
    RunExists,
    RunOwned,
    RunStatus,
)

from ._clock import Clock, SystemClock
from ._config import PipelineSettings, load_settings, read_yaml
from ._errors import (
    AuditError,
    ConfigError,
    PipelineStateError,
    PluginError,
    ResumeError,
    RunFailed,
)
from ._graph import Graph, NodeKind, compile_graph
from ._nodes import (
    AggregationNode,
    CoalesceNode,
    GateNode,
    NodeTask,
    SinkNode,
    SourceNode,
    TransformNode,
)
from ._redact import secrets_of
from ._replay import load_replay
from ._resume import ResumePlan, check_resumable
from ._run_context import NodeStatistics, RunContext
from ._streams import Inbox, Outbox
from ._version import ENGINE_VERSION

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectSendStream

    from landscape import Fence, Recorder
    from plugins import Plugin, Source
    from plugins.llm import HttpClientChoice

    from ._calls import AnswerBook
    from ._tokens import Token

__all__ = ["Pipeline", "RunResult", "RunStatistics"]

_NODE_TASKS: Mapping[NodeKind, type[NodeTask]] = {
    NodeKind.SOURCE: SourceNode,
    NodeKind.TRANSFORM: TransformNode,
    NodeKind.GATE: GateNode,
    NodeKind.COALESCE: CoalesceNode,
    NodeKind.AGGREGATION: AggregationNode,
    NodeKind.SINK: SinkNode,
}


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a run ended."""

    run_id: str
    status: str
    rows_processed: int
    outcomes: dict[str, int]
    duration_s: float
    landscape_url: str
    #: What the run's external calls added up to.
    calls: CallSummary = field(default_factory=CallSummary)
    #: Why the run stopped early when it did so by itself (a budget, an endpoint outage,
    #: too many failed rows, a plugin's ``StopRun``), else ``None``.
    stop_reason: str | None = None
    #: Rows whose processing failed: ended ``failed`` or sent down an ``on_error`` route
    #: (in every session of the run; invalid source records are quarantined, not counted).
    row_errors: int = 0


@dataclass(frozen=True, slots=True)
class RunStatistics:
    """A snapshot of a running pipeline, for progress displays."""

    run_id: str
    elapsed_s: float
    rows_read: int
    outcomes: Mapping[str, int]
    nodes: list[NodeStatistics] = field(default_factory=list)
    audit_backlog: int = 0
    #: The run's external calls so far.
    calls: CallSummary = field(default_factory=CallSummary)

    @property
    def rows_per_second(self) -> float:
        return self.rows_read / self.elapsed_s if self.elapsed_s > 0 else 0.0


ProgressCallback = Callable[[RunStatistics], None]


def new_run_id() -> str:
    """A run id that sorts by start time: ``20261126T184512-a3f9c2``."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class _Start:
    """How a run starts: afresh, resuming a run (its id is the run's), or replaying one."""

    resume: bool = False
    replay: str | None = None


class Pipeline:
    """A validated pipeline, ready to run (several times, one run at a time).

    Construction compiles the graph: an invalid configuration raises
    :class:`~engine.ConfigError` before anything runs.  ``clock`` is where coalesce and
    aggregation timeouts get their time (the event loop's clock; tests pass a
    :class:`~engine.ManualClock`).  ``http_clients`` maps endpoint names to an
    :class:`httpx.AsyncClient` or an httpx transport of the caller's (a corporate proxy,
    mTLS, a custom CA, ``httpx.MockTransport``); ledgerflow never closes them.
    """

    def __init__(
        self,
        settings: PipelineSettings,
        *,
        base_dir: Path | str = ".",
        landscape_url: str | None = None,
        clock: Clock | None = None,
        pipeline_file: Path | None = None,
        http_clients: Mapping[str, HttpClientChoice] | None = None,
    ) -> None:
        self.settings = settings
        #: The file the pipeline was loaded from (``None``: built from a dict).
        self.pipeline_file = pipeline_file
        self.graph: Graph = compile_graph(
            settings, Path(base_dir).resolve(), http_clients=http_clients
        )
        self.landscape_url = landscape_url or settings.landscape.url
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._run: RunContext | None = None
        self._running = False
        self._stop_early = False
        self._force_stop = False
        self._started = 0.0
        #: How the last run ended (also when the caller's cancellation ended it).
        self.last_result: RunResult | None = None

    @classmethod
    def from_yaml(
        cls,
        path: str | Path,
        *,
        landscape_url: str | None = None,
        clock: Clock | None = None,
        http_clients: Mapping[str, HttpClientChoice] | None = None,
    ) -> Self:
        """Load a pipeline file; relative paths in it are relative to the file."""
        path = Path(path).resolve()
        settings = load_settings(read_yaml(path))
        return cls(
            settings,
            base_dir=path.parent,
            landscape_url=landscape_url,
            clock=clock,
            pipeline_file=path,
            http_clients=http_clients,
        )

    @classmethod
    def from_dict(
        cls,
        config: Mapping[str, Any],
        *,
        base_dir: Path | str = ".",
        landscape_url: str | None = None,
        clock: Clock | None = None,
        http_clients: Mapping[str, HttpClientChoice] | None = None,
    ) -> Self:
        """Build from a mapping shaped like the YAML; ``plugin`` may be a class or an instance."""
        settings = load_settings(dict(config))
        return cls(
            settings,
            base_dir=base_dir,
            landscape_url=landscape_url,
            clock=clock,
            http_clients=http_clients,
        )

    # -- running -------------------------------------------------------------------------

    async def run(
        self,
        *,
        run_id: str | None = None,
        replay: str | None = None,
        on_progress: ProgressCallback | None = None,
        progress_interval: float = 0.5,
    ) -> RunResult:
        """Run the pipeline to the end of its source and return how it went.

        ``run_id`` names the new run (default: one made of the start time and a random
        part); a run of that id on record already is refused before anything runs.
        With ``replay`` (a run id), every external call is answered from that run's
        recorded answers, matched by request hash, and nothing goes over the network:
        a request it never made is the row's error (``replay_miss``).  Raises
        :class:`~engine.ReplayError` before anything runs when there is no such run.

        Raises :class:`~engine.RunFailed` (after recording the run ``failed``) when a node
        fails outside a row — rows' own errors never do — and :class:`~engine.AuditError`
        when the Landscape cannot be written.  :meth:`stop` ends the run early as
        ``interrupted``.  Cancelling the caller's scope (or its task) stops the run the
        same way — in-flight rows get ``drain_timeout_seconds`` to finish, a checkpoint
        is written — and then the cancellation goes on to the caller
        (:attr:`last_result` says how the run ended).
        """
        start = _Start(replay=replay)
        return await self._guarded(run_id or new_run_id(), start, on_progress, progress_interval)

    async def resume(
        self,
        run_id: str,
        *,
        on_progress: ProgressCallback | None = None,
        progress_interval: float = 0.5,
    ) -> RunResult:
        """Continue the interrupted or crashed run ``run_id`` of this pipeline to its end.

        Rows that finished are skipped, every unfinished token goes on from its last
        completed node state, file sinks are cut back to what their recorded outcomes
        cover, and LLM answers already received are reused rather than asked again.
        Raises :class:`~engine.ResumeError` before anything runs when the run is
        completed, or when the pipeline or the source changed since the run began;
        otherwise behaves as :meth:`run`.
        """
        return await self._guarded(run_id, _Start(resume=True), on_progress, progress_interval)

    @property
    def running(self) -> bool:
        """Whether a run (or resume) of this pipeline is under way."""
        return self._running

    def stop(self, *, force: bool = False) -> None:
        """Ask the running pipeline to stop reading its source and finish what it holds.

        In-flight rows get ``runtime.drain_timeout_seconds`` to finish; then, or at once
        with ``force``, what still runs is cancelled (its node states are closed
        ``cancelled`` and a resume re-does that work).
        """
        if not self._running:
            raise PipelineStateError("the pipeline is not running")
        self._stop_early = True
        self._force_stop = self._force_stop or force
        if self._run is not None:
            self._run.request_stop(None, force=force)

    async def _guarded(
        self,
        run_id: str,
        start: _Start,
        on_progress: ProgressCallback | None,
        progress_interval: float,
    ) -> RunResult:
        """Run in a task shielded from the caller's cancellation, which instead becomes a
        graceful stop; the cancellation goes on to the caller once the run has ended."""
        if self._running:
            raise PipelineStateError("this pipeline is already running")
        self._running = True
        self._stop_early = self._force_stop = False
        self.last_result = None
        finished = anyio.Event()
        failure: list[Exception] = []

        async def execute() -> None:
            try:
                with anyio.CancelScope(shield=True):
                    self.last_result = await self._execute(
                        run_id, start, on_progress, progress_interval
                    )
            except Exception as exc:  # handed to the caller as is, not in a group
                failure.append(exc)
            finally:
                self._running = False
                finished.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(execute)
            try:
                await finished.wait()
            except anyio.get_cancelled_exc_class():
                if self._running:
                    self.stop()
                with anyio.CancelScope(shield=True):
                    await finished.wait()
                raise
        if failure:
            raise failure[0]
        assert self.last_result is not None
        return self.last_result

    async def _execute(
        self,
        run_id: str,
        start: _Start,
        on_progress: ProgressCallback | None,
        progress_interval: float,
    ) -> RunResult:
        self._started = time.monotonic()
        if not start.resume:
            await self.check_inputs()  # before anything is recorded or any sink opened
        try:
            # A resume reads a run on record: it never creates a Landscape.
            async with Landscape.connect(self.landscape_url, create=not start.resume) as landscape:
                status = await self._execute_owned(
                    landscape, run_id, start, on_progress, progress_interval
                )
                row_errors = await landscape.row_errors(run_id)
        except LandscapeNotFound as exc:
            raise ResumeError(f"cannot resume run {run_id}: {exc}") from exc
        except RunExists as exc:
            raise PipelineStateError(str(exc)) from exc
        except RunOwned as exc:
            raise ResumeError(
                f"cannot resume run {run_id}: it is being executed by {exc.holder.describe()}; "
                "stop that process (Ctrl-C, or SIGTERM to its pid) or wait for it to end, "
                "then resume"
            ) from exc
        except OwnershipLost as exc:
            raise _run_taken_over(run_id) from exc
        except LandscapeError as exc:
            raise AuditError(str(exc)) from exc
        except BaseExceptionGroup as group:
            audit_failures = group.subgroup(LandscapeError)
            if audit_failures is None:
                raise
            if audit_failures.subgroup(OwnershipLost) is not None:
                raise _run_taken_over(run_id) from group
            raise AuditError(f"run {run_id}: {_describe(audit_failures)}") from group
        finally:
            run, self._run = self._run, None
        assert run is not None
        return RunResult(
            run_id=run_id,
            status=status.value,
            rows_processed=run.rows_read,
            outcomes=dict(run.outcomes),
            duration_s=time.monotonic() - self._started,
            landscape_url=self.landscape_url,
            calls=run.calls.snapshot(),
            stop_reason=run.stop_reason,
            row_errors=row_errors,
        )

    async def _execute_owned(
        self,
        landscape: Landscape,
        run_id: str,
        start: _Start,
        on_progress: ProgressCallback | None,
        progress_interval: float,
    ) -> RunStatus:
        """Take the run — record it new, or take it over from its last owner — and run
        it as its one owner."""
        replay = None if start.replay is None else await load_replay(landscape, start.replay)
        if start.resume:
            await check_resumable(self.graph, landscape, run_id, self.pipeline_file)
        runtime = self.settings.runtime
        async with landscape.own_run(
            run_id,
            new=not start.resume,
            lease_seconds=runtime.lease_seconds,
            heartbeat_seconds=runtime.heartbeat_seconds,
        ) as fence:
            plan = None
            if start.resume:
                plan = await ResumePlan.load(self.graph, landscape, run_id)
            try:
                return await self._run_recorded(
                    landscape, fence, plan, replay, on_progress, progress_interval
                )
            finally:
                if plan is not None:
                    with anyio.CancelScope(shield=True):
                        await plan.aclose()

    async def check_inputs(self) -> None:
        """Raise :class:`~engine.ConfigError` (key path ``source.options``) when the
        source cannot be read now.  A run checks this before it records anything or
        opens a sink, so a missing input never costs an output; so does ``validate``."""
        source: Source = self.graph.source.plugin  # type: ignore[assignment]
        problem = await source.check_readable()
        if problem is not None:
            raise ConfigError.at(f"{self.graph.source.node_id}.options", problem)

    def statistics(self) -> RunStatistics | None:
        """A snapshot of the current run, or ``None`` when not running."""
        run = self._run
        if run is None:
            return None
        return RunStatistics(
            run_id=run.run_id,
            elapsed_s=time.monotonic() - self._started,
            rows_read=run.rows_read,
            outcomes=dict(run.outcomes),
            nodes=run.statistics(),
            audit_backlog=run.recorder.statistics().pending_records,
            calls=run.calls.snapshot(),
        )

    async def _run_recorded(
        self,
        landscape: Landscape,
        fence: Fence,
        resume: ResumePlan | None,
        replay: AnswerBook | None,
        on_progress: ProgressCallback | None,
        progress_interval: float,
    ) -> RunStatus:
        interval = self.settings.runtime.commit_interval_ms / 1000.0
        failure: BaseException | None = None
        status = RunStatus.FAILED
        run_id = fence.run_id
        async with landscape.open_writer(commit_interval=interval, fence=fence) as writer:
            hidden = secrets_of(
                self.settings, self.graph.base_dir, landscape_url=self.landscape_url
            )
            recorder = landscape.recorder(writer, run_id, scrub=hidden.scrub_error)
            run = self._run = RunContext(run_id, self.graph, recorder, self.clock)
            if resume is not None:
                resume.prepare(run)
            if replay is not None:
                run.answers = replay
            if self._stop_early:
                run.request_stop(None, force=self._force_stop)
            async with anyio.create_task_group() as tg:
                await tg.start(writer.run)
                try:
                    if resume is None:
                        self._record_graph(recorder, None if replay is None else replay.replay_of)
                    else:
                        recorder.resume_run()
                    await self._run_nodes(run, resume, on_progress, progress_interval)
                    stopped = run.stop_requested.is_set()
                    status = RunStatus.INTERRUPTED if stopped else RunStatus.COMPLETED
                except anyio.get_cancelled_exc_class():
                    status = RunStatus.INTERRUPTED
                    raise
                except Exception as exc:
                    failure = exc
                finally:
                    with anyio.CancelScope(shield=True):
                        run.checkpoints.write(status.value)
                        recorder.finish_run(
                            status,
                            rows_processed=run.rows_read,
                            outcomes=run.outcomes,
                            error=_describe(failure) if failure is not None else run.stop_reason,
                        )
                        recorder.release_run(fence)
                        await writer.aclose()
        if failure is not None:
            raise RunFailed(run_id, _describe(failure)) from _unwrap(failure)
        return status

    def _record_graph(self, recorder: Recorder, replayed_from: str | None) -> None:
        graph = self.graph
        recorder.begin_run(
            config_hash=graph.config_hash,
            settings={
                "name": self.settings.name,
                "nodes": {n: s.config() for n, s in graph.nodes.items()},
            },
            engine_version=ENGINE_VERSION,
            pipeline_name=self.settings.name,
            replayed_from=replayed_from,
            pipeline_file=None if self.pipeline_file is None else str(self.pipeline_file),
        )
        for node_id, spec in graph.nodes.items():
            plugin = spec.plugin
            recorder.node(
                node_id=node_id,
                node_type=spec.kind.value,
                plugin_name=spec.plugin_name,
                plugin_version=None if plugin is None else plugin.version,
                determinism=None if plugin is None else plugin.determinism.value,
                config=spec.config(),
            )
        for spec, route in graph.routes():
            if route.target is not None and route.edge_id is not None:
                recorder.edge(
                    edge_id=route.edge_id,
                    from_node=spec.node_id,
                    to_node=route.target,
                    label=route.label,
                    mode=route.mode.value,
                )

    async def _run_nodes(
        self,
        run: RunContext,
        resume: ResumePlan | None,
        on_progress: ProgressCallback | None,
        progress_interval: float,
    ) -> None:
        # Opening sinks creates or cuts their files: only as the run's confirmed owner.
        await run.recorder.ensure_lease()
        async with AsyncExitStack() as plugins:
            for spec in self.graph.nodes.values():
                if spec.plugin is not None:
                    try:
                        if resume is not None and spec.kind is NodeKind.SINK:
                            await resume.resume_sink(spec.node_id, spec.plugin)  # type: ignore[arg-type]
                        else:
                            await spec.plugin.open()
                    except Exception as exc:
                        raise PluginError(f"node '{spec.node_id}' failed to open: {exc}") from exc
                    plugins.push_async_callback(_close_shielded, spec.plugin)
            tasks, reentry = self._wire(run)
            if resume is None:
                reentry.close()
                run.restored.set()
            async with anyio.create_task_group() as outer:
                if on_progress is not None:
                    outer.start_soon(self._report_progress, on_progress, progress_interval)
                outer.start_soon(run.checkpoints.run)
                outer.start_soon(self._enforce_drain, run, tasks)
                async with anyio.create_task_group() as nodes:
                    for task in tasks:
                        nodes.start_soon(task.run_task, name=f"node:{task.node_id}")
                    if resume is not None:
                        nodes.start_soon(resume.reenter, run, reentry)
                outer.cancel_scope.cancel()
        if on_progress is not None:
            final = self.statistics()
            if final is not None:
                on_progress(final)

    async def _enforce_drain(self, run: RunContext, tasks: list[NodeTask]) -> None:
        """Once a stop is requested, give the nodes the drain timeout (unless forced),
        then cancel what still works.  Sinks are cancelled last: they first write what
        reached them (their inputs end as the nodes before them stop), and get another
        drain timeout for it."""
        timeout = self.settings.runtime.drain_timeout_seconds
        await run.stop_requested.wait()
        with anyio.move_on_after(timeout):
            await run.force_requested.wait()
        for task in tasks:
            if task.spec.kind is not NodeKind.SINK:
                task.cancel()
        await anyio.sleep(timeout)
        for task in tasks:
            task.cancel()

    def _wire(self, run: RunContext) -> tuple[list[NodeTask], Outbox]:
        """One bounded stream per consuming node; each producer gets a clone of its send end.

        Also returns an outbox to every consuming node, through which a resume sends
        restored tokens (close it at once otherwise).
        """
        buffer = self.settings.runtime.max_buffer_size
        time_slice = self.settings.runtime.time_slice_ms / 1000
        senders: dict[str, MemoryObjectSendStream[Token]] = {}
        inboxes: dict[str, Inbox] = {}
        for node_id, spec in self.graph.nodes.items():
            if spec.kind is not NodeKind.SOURCE:
                send, receive = anyio.create_memory_object_stream["Token"](buffer)
                senders[node_id], inboxes[node_id] = send, Inbox(receive)
                run.stats[node_id].inbox = inboxes[node_id]
        tasks = []
        for node_id, spec in self.graph.nodes.items():
            targets = set(self.graph.consumers_of(node_id))
            outbox = Outbox(
                {target: senders[target].clone() for target in targets}, time_slice=time_slice
            )
            tasks.append(_NODE_TASKS[spec.kind](spec, run, inboxes.get(node_id), outbox))
        reentry = Outbox(
            {target: send.clone() for target, send in senders.items()}, time_slice=time_slice
        )
        for send in senders.values():
            send.close()
        return tasks, reentry

    async def _report_progress(self, on_progress: ProgressCallback, interval: float) -> None:
        while True:
            await anyio.sleep(interval)
            snapshot = self.statistics()
            if snapshot is not None:
                on_progress(snapshot)


async def _close_shielded(plugin: Plugin) -> None:
    """Release a plugin's resources even while the run is being cancelled."""
    with anyio.CancelScope(shield=True):
        await plugin.aclose()


def _run_taken_over(run_id: str) -> AuditError:
    return AuditError(
        f"run {run_id}: another process took the run over after this process's lease "
        "expired (its heartbeat had stopped); this process stopped and wrote nothing more"
    )


def _unwrap(exc: BaseException) -> BaseException:
    """The single root cause inside nested exception groups, if there is one."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    exc = _unwrap(exc)
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"
