"""The plugin protocols: what a source, a transform, an aggregation and a sink promise.

A plugin is a class.  The engine builds it from its validated options with
:meth:`Plugin.from_options`, enters it with ``async with`` before the first row and
leaves it after the last.  Plugins never see the Landscape: everything they report
goes back as return values (or through the :class:`RowContext` they are handed).

Rows are plain ``dict``s.  A transform returns a **new** dict, or the very same dict
object when it changes nothing (the engine then reuses the row's hash); it never
mutates the row it was given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
    from types import TracebackType

    from pydantic import BaseModel

__all__ = [
    "MAX_RECORD_BYTES",
    "Aggregation",
    "Artifact",
    "BatchContext",
    "CallList",
    "CallLog",
    "Determinism",
    "Discard",
    "ExternalCall",
    "ExternalJobAggregation",
    "JobFailed",
    "MemberResult",
    "Plugin",
    "PluginSetup",
    "RecordedAnswer",
    "ReplayMiss",
    "Reservation",
    "Row",
    "RowContext",
    "Sink",
    "SinkItem",
    "SinkRejection",
    "SinkWriteError",
    "Source",
    "SourcePosition",
    "SourceRecord",
    "StopRun",
    "Transform",
    "TransformResult",
    "resolve_path",
]

Row = dict[str, Any]

MAX_RECORD_BYTES = 16 * 1024 * 1024
"""The default ``source.max_record_bytes``: the largest record a source parses (16 MiB)."""


class Determinism(StrEnum):
    """Whether a plugin gives the same output for the same input."""

    DETERMINISTIC = "deterministic"
    NONDETERMINISTIC = "nondeterministic"
    EXTERNAL = "external_call"
    IO_READ = "io_read"
    IO_WRITE = "io_write"


@dataclass(frozen=True, slots=True)
class PluginSetup:
    """What a plugin may know about where it runs, given once at construction."""

    node_name: str
    base_dir: Path = field(default_factory=Path.cwd)
    #: Shared resources of the pipeline by name (LLM endpoints), built by the engine.
    endpoints: Mapping[str, object] = field(default_factory=dict)
    #: For a source: the largest record it parses (``source.max_record_bytes``).  A
    #: longer record is yielded malformed without being parsed, its raw content cut to
    #: this many bytes, with its full size and SHA-256.
    max_record_bytes: int = MAX_RECORD_BYTES

    def resolve(self, path: str | Path) -> Path:
        """``path`` relative to the pipeline file's directory (absolute paths unchanged)."""
        return resolve_path(path, self.base_dir)


def resolve_path(path: str | Path, base_dir: Path) -> Path:
    """``path`` with ``~`` expanded, relative to ``base_dir`` unless it is absolute."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else base_dir / candidate


@dataclass(frozen=True, slots=True)
class ExternalCall:
    """One attempt at an external call, as a plugin reports it for the audit trail.

    ``request`` and ``response`` are JSON-serialisable and carry no secrets (headers are
    not part of them); the engine stores them content-addressed.  ``status`` is
    ``success`` or ``error``; a failed attempt that is retried is reported too.
    """

    call_type: str
    provider: str | None
    model: str | None
    attempt: int
    status: str
    request: Any
    response: Any
    latency_ms: float
    http_status: int | None = None
    error: Mapping[str, Any] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost: float | None = None
    #: Which call of this row's visit it is (a plugin may make several).
    call_index: int = 0
    #: The hashes ``request`` and ``response`` are stored under already, when the call
    #: was answered from the record (see :class:`RecordedAnswer`): nothing to store.
    request_hash: str | None = None
    response_hash: str | None = None


@dataclass(frozen=True, slots=True)
class RecordedAnswer:
    """An answer on record for a request identical to one about to be made.

    ``status`` is what the call is recorded as instead of making it: ``reused`` (a
    resumed run's own answer, already paid for) or ``replayed`` (an earlier run's).
    """

    status: str
    response: Any
    #: The hashes the request and the answer are on record under (a call recorded
    #: with them need not store or hash them again).
    request_hash: str | None = None
    response_hash: str | None = None


class ReplayMiss(Exception):
    """A replayed run met a request the recorded run never made: no answer is on record,
    and a replay never calls out.  It is the row's error (``replay_miss``)."""

    def __init__(self, request_hash: str, run_id: str) -> None:
        super().__init__(f"replay_miss: run {run_id} recorded no answer for request {request_hash}")
        self.request_hash = request_hash
        self.run_id = run_id

    @property
    def error(self) -> dict[str, Any]:
        """What the refused call records as its error."""
        return {"type": "ReplayMiss", "message": str(self), "replay_miss": True}


class StopRun(Exception):
    """The run must stop gracefully, and the row (or batch) being processed be left
    unfinished for a resume to process: raised by a plugin, or by what it calls (a call
    the budget cannot cover, an endpoint down for too long).

    It is not the row's error: the engine records the row's node state ``cancelled``,
    leaves the row where it was, stops reading the source with ``reason`` recorded as
    the run's stop reason, and the run ends ``interrupted``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Reservation:
    """A hold on part of the run's budget for one call attempt about to be sent.

    Released once (:meth:`release`, or leaving a ``with`` block) when the attempt is
    over — right after its record, so that the recorded actual usage replaces the
    estimate without a moment when both or neither count.
    """

    __slots__ = ("_release",)

    def __init__(self, release: Callable[[], None] | None = None) -> None:
        self._release = release

    def release(self) -> None:
        """Give the reserved amounts back (the second and later calls do nothing)."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class CallLog(Protocol):
    """Where a plugin reports its external calls (the engine records them)."""

    def record(self, call: ExternalCall) -> None: ...

    async def reserve(self, tokens: int, cost: float) -> Reservation:
        """Reserve the estimated ``tokens`` and ``cost`` of one attempt about to be sent
        (the prompt's estimate plus the longest answer asked for) against the run's
        budget, until the reservation is released; may wait for other attempts' usage
        to settle.

        Raises :class:`StopRun` when the budget cannot cover the reservation: the
        attempt must then not be sent, and the row is left for a resume.
        """
        ...

    def recorded_answer(self, request: Any) -> RecordedAnswer | None:
        """The answer on record for ``request``, if the call need not be made.

        Raises :class:`ReplayMiss` when the run replays an earlier one that has no
        answer for ``request`` (the call must then not be made at all).
        """
        ...


@dataclass(slots=True)
class CallList:
    """A :class:`CallLog` that keeps the calls in a list (plugins used outside a run)."""

    calls: list[ExternalCall] = field(default_factory=list)

    def record(self, call: ExternalCall) -> None:
        self.calls.append(call)

    async def reserve(self, tokens: int, cost: float) -> Reservation:
        """Nothing to reserve: outside a run there is no budget."""
        return Reservation()

    def recorded_answer(self, request: Any) -> RecordedAnswer | None:
        return None


# The engine makes several frozen value objects per row (a RowContext per node, a
# SourceRecord, a SinkItem).  dataclass's own frozen __init__ looks up
# object.__setattr__ through a global for every field; the hand-written ones below bind
# it once, which halves the cost of making one (about 0.5 us each).
_set = object.__setattr__


@dataclass(frozen=True, slots=True, init=False)
class RowContext:
    """Identity of one row's visit to one node; a fresh one per call.

    ``calls`` is where the plugin reports every external call attempt it makes.
    """

    run_id: str
    node_name: str
    token_id: str
    row_index: int
    state_id: str
    calls: CallLog = field(default_factory=CallList)

    def __init__(
        self,
        run_id: str,
        node_name: str,
        token_id: str,
        row_index: int,
        state_id: str,
        calls: CallLog | None = None,
    ) -> None:
        _set(self, "run_id", run_id)
        _set(self, "node_name", node_name)
        _set(self, "token_id", token_id)
        _set(self, "row_index", row_index)
        _set(self, "state_id", state_id)
        _set(self, "calls", CallList() if calls is None else calls)


class Plugin:
    """Base of every plugin: identity, options and the async lifecycle.

    Subclasses set ``name`` (the YAML entry name), ``version`` and ``determinism`` and,
    when they take options, ``Options``: a pydantic model that validates them (an
    invalid option is a config error naming its key path, raised before anything runs).
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    determinism: ClassVar[Determinism] = Determinism.DETERMINISTIC
    Options: ClassVar[type[BaseModel] | None] = None

    def __init__(self, options: Any, setup: PluginSetup) -> None:
        self.options = options
        self.setup = setup

    @classmethod
    def from_options(cls, options: Mapping[str, Any], setup: PluginSetup) -> Self:
        """Validate ``options`` with ``Options`` and build the plugin.

        Raises :class:`pydantic.ValidationError` for invalid options.
        """
        validated: Any = (
            dict(options) if cls.Options is None else cls.Options.model_validate(dict(options))
        )
        return cls(validated, setup)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def audit_details(self) -> dict[str, Any]:
        """What the audit trail should know about this plugin beyond its options (e.g.
        the hash of a template read from a file); recorded with the node's config."""
        return {}

    async def open(self) -> None:
        """Acquire resources (files, connections); called once before any row."""

    async def aclose(self) -> None:
        """Release resources; called once after the last row, also on failure."""


@dataclass(frozen=True, slots=True, init=False)
class SourceRecord:
    """One record read by a source.

    ``row`` is the parsed record, or ``None`` when it could not be parsed, in which
    case ``error`` says why.  ``raw`` is what was read, JSON-serialisable (a line of
    text, a parsed object), stored as the row's source payload either way.
    """

    row: Row | None
    raw: Any
    error: str | None = None
    #: Where reading can pick up right after this record, for sources that can seek
    #: (see :meth:`Source.read`); ``None`` otherwise.
    position: SourcePosition | None = None

    def __init__(
        self,
        row: Row | None,
        raw: Any,
        error: str | None = None,
        position: SourcePosition | None = None,
    ) -> None:
        _set(self, "row", row)
        _set(self, "raw", raw)
        _set(self, "error", error)
        _set(self, "position", position)


class SourcePosition(Protocol):
    """A place in a source just after one record (a file offset, say)."""

    def to_json(self) -> dict[str, Any]:
        """The position as JSON (recorded in checkpoints, handed back to ``read``)."""
        ...


class Source(Plugin):
    """Reads records in order. Malformed records are yielded with an error, never raised."""

    determinism: ClassVar[Determinism] = Determinism.IO_READ

    def read(
        self, *, start_index: int = 0, resume_from: Mapping[str, Any] | None = None
    ) -> AsyncGenerator[SourceRecord, None]:
        """Yield the records from ``start_index`` (0-based) on, in source order.

        ``resume_from`` is the JSON of the position of record ``start_index - 1`` (from
        an earlier read of this source): reading then starts right there, without
        reading what comes before.  Only sources whose records carry positions get one.
        """
        raise NotImplementedError

    async def check_position(self, position: Mapping[str, Any]) -> str | None:
        """Why reading cannot resume from ``position`` — what came before it is no longer
        what was read — or ``None`` when it can."""
        return f"a {self.name} source cannot resume from a position"

    async def check_readable(self) -> str | None:
        """Why the source cannot be read now (a missing or unreadable file), or ``None``.

        Called before a run records anything or opens a sink (and by ``ledgerflow
        validate``), so that a missing input costs no output.
        """
        return None

    @property
    def one_shot(self) -> bool:
        """Whether the records can be read only once (a generator): resuming a run reads
        its source again, so a run of a one-shot source cannot be resumed."""
        return False


@dataclass(frozen=True, slots=True)
class Discard:
    """A transform's answer for a row it drops on purpose; ``reason`` is recorded."""

    reason: str


TransformResult = Row | Discard


class Transform(Plugin):
    """Turns one row into one row, or discards it.  An exception is that row's error."""

    async def process(self, row: Row, ctx: RowContext) -> TransformResult:
        raise NotImplementedError

    def batch_refusal(self) -> str | None:
        """Why a node may not hand this plugin, as configured, several rows at once —
        its ``batch_size`` above 1 is then a config error saying so — or ``None`` when
        it may.

        The default: a plugin may exactly when it overrides :meth:`process_batch` (the
        default one processes the rows one by one, so a batch would only delay them).
        """
        if type(self).process_batch is Transform.process_batch:
            name = self.name or type(self).__name__
            return f"the {name!r} transform processes rows one at a time, not in batches"
        return None

    async def process_batch(
        self, rows: Sequence[Row], contexts: Sequence[RowContext], calls: CallLog
    ) -> list[TransformResult | Exception]:
        """Process several rows together (a node's ``batch_size``): one result per row,
        in order, an exception standing for that row's error (a :class:`StopRun` for a
        row left to a resume).

        ``calls`` records a call made for all of them (each context's ``calls`` one made
        for that row alone).  The default processes the rows one by one.
        """
        results: list[TransformResult | Exception] = []
        for row, ctx in zip(rows, contexts, strict=True):
            try:
                results.append(await self.process(row, ctx))
            except Exception as exc:  # the row's error, handed back in its place
                results.append(exc)
        return results


@dataclass(frozen=True, slots=True)
class BatchContext:
    """Identity of one flush of an aggregation batch; a fresh one per attempt.

    ``group_key`` is the batch's ``group_by`` value (``grouped`` says whether the node
    groups at all: a key may be ``None``), ``trigger`` what fired (``count``,
    ``timeout``, ``condition``, ``end_of_source``, ``shutdown``) and ``output_mode``
    what the engine expects back.
    """

    run_id: str
    node_name: str
    batch_id: str
    attempt: int
    group_key: Any
    trigger: str
    output_mode: str
    state_id: str
    grouped: bool = False
    calls: CallLog = field(default_factory=CallList)
    #: The members' token ids, in member order (stable names for a job's requests).
    members: Sequence[str] = ()


class Aggregation(Plugin):
    """Turns a batch of rows into result rows when a trigger fires.

    :meth:`flush` is a coroutine and may call out.  What it must return depends on the
    node's ``output_mode``: any number of rows (``transform``), exactly one
    (``single``), or one per input row in input order (``passthrough``: the input rows,
    enriched).  An exception fails the batch: its rows take the node's error route.
    """

    async def flush(self, rows: Sequence[Row], ctx: BatchContext) -> list[Row]:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class MemberResult:
    """What an external job made of one member of a batch: its enriched row, or the
    error that member's request ended in (routed by the node's ``on_error``), and the
    calls made for that member alone (recorded on the member's node state)."""

    row: Row | None
    error: Exception | None = None
    calls: Sequence[ExternalCall] = ()


class JobFailed(Exception):
    """An external job ended without answers (``expired``, ``cancelled``, ``failed``,
    or waited for longer than allowed): the batch attempt fails as a whole."""

    def __init__(self, job_id: str, status: str, message: str) -> None:
        super().__init__(f"job {job_id} {status}: {message}")
        self.job_id = job_id
        self.status = status


class ExternalJobAggregation(Aggregation):
    """An aggregation whose flush is a job run by an external service for hours (a
    provider's batch API), so that "still running" is a recorded status, not a coroutine
    kept waiting.

    The engine calls :meth:`submit` for a flush.  Answers already on record (a replay's)
    may come back at once as results; otherwise the plugin starts the job and returns its
    id, the engine records the flush ``pending`` with that id, then awaits :meth:`wait`
    alongside the node's other work — up to :attr:`max_pending_jobs` jobs at once.  After a
    crash or stop, a resume calls :meth:`wait` with the recorded id, and for a flush the
    record shows started but without a job id, asks :meth:`find` first: a job is never
    submitted twice.  Results are one :class:`MemberResult` per member, in member order;
    in ``transform`` mode the outputs are the rows of the members that succeeded.
    """

    #: Jobs of one node that may be pending at once (a flush beyond waits for a slot).
    max_pending_jobs: int = 16

    async def submit(self, rows: Sequence[Row], ctx: BatchContext) -> str | list[MemberResult]:
        """Start the job for ``rows``: its id, or the results when no job is needed."""
        raise NotImplementedError

    async def find(self, batch_id: str, since: float, ctx: BatchContext) -> str | None:
        """The id of a job started for batch ``batch_id`` at or after ``since`` (epoch
        seconds) whose id never reached the record — the run stopped between the
        provider accepting it and the record of it — or ``None``.

        A resume asks before starting that batch's next attempt, so that such a job is
        waited for, not paid for twice.  The default finds none (a plugin whose service
        cannot be searched may then start a job twice in that narrow window).
        """
        return None

    async def wait(self, job_id: str, rows: Sequence[Row], ctx: BatchContext) -> list[MemberResult]:
        """The results of job ``job_id`` once it ends; :class:`JobFailed` when it ended
        without them."""
        raise NotImplementedError

    async def flush(self, rows: Sequence[Row], ctx: BatchContext) -> list[Row]:
        """Submit and wait in one go (outside the engine); a member's error is raised."""
        results = await self.submit(rows, ctx)
        if not isinstance(results, list):
            results = await self.wait(results, rows, ctx)
        for result in results:
            if result.error is not None:
                raise result.error
        return [result.row for result in results if result.row is not None]


@dataclass(frozen=True, slots=True, init=False)
class SinkItem:
    """One token's row as handed to a sink."""

    token_id: str
    row_index: int
    row: Row

    def __init__(self, token_id: str, row_index: int, row: Row) -> None:
        _set(self, "token_id", token_id)
        _set(self, "row_index", row_index)
        _set(self, "row", row)


@dataclass(frozen=True, slots=True)
class SinkRejection:
    """A row a sink refused to write (e.g. a field it has no column for), and why."""

    token_id: str
    error: str


class SinkWriteError(Exception):
    """A write that failed and left nothing behind: the sink is as it was before it.

    Raised by :meth:`Sink.write` when the batch can be tried again — a file cut back to
    its size before the write, a transaction rolled back.  A sink with an
    ``on_write_failure`` sink or ``discard`` then gets each row of the batch alone, so
    that one unwritable row costs only itself.  Any other exception means the sink's
    state is unknown and fails the run.
    """


@dataclass(frozen=True, slots=True)
class Artifact:
    """What a sink produced, for the Landscape's ``artifacts`` table."""

    uri: str
    content_hash: str
    size_bytes: int
    rows_written: int


class Sink(Plugin):
    """Writes rows in batches.  A batch is durable when :meth:`write` returns."""

    determinism: ClassVar[Determinism] = Determinism.IO_WRITE

    async def write(self, items: Sequence[SinkItem]) -> Sequence[SinkRejection]:
        """Write ``items`` durably (flushed and fsynced, or committed) before returning.

        Rows the sink cannot represent are left out and returned as rejections; every
        other item is durable on return.  :class:`SinkWriteError` means the write failed
        and left nothing behind (the batch may be tried again, row by row); any other
        exception means nothing of the batch can be relied on.
        """
        raise NotImplementedError

    def artifact(self) -> Artifact | None:
        """What has been written so far (called after the last write)."""
        return None

    def position(self) -> Any:
        """Where the sink stands after its last :meth:`write` (JSON), or ``None``.

        The engine records it with the outcomes of each write, in the same commit, so a
        resumed run can hand the sink back the position its recorded outcomes cover.
        """
        return None

    async def resume(self, position: Any) -> None:
        """Open the sink to continue a run from ``position`` (``None``: nothing written).

        Called instead of :meth:`open` when a run resumes.  The default opens normally,
        which is right for sinks whose writes are idempotent (keyed by token id); a sink
        that appends must drop what was written after ``position``.
        """
        await self.open()
