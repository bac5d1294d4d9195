"""The pipeline file, as pydantic models (the YAML contract, ``docs/configuration.md``).

Loading validates shape and types only; graph checks (dangling connections, cycles,
unfed nodes, expressions) are :mod:`engine._graph`'s.  Every model forbids unknown keys,
so a typo is an error that names its key path.  ``docs/configuration.md`` is generated
from these models (``python -m engine._docs``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from plugins.llm import EndpointSettings
from plugins.protocols import MAX_RECORD_BYTES

from ._errors import ConfigError, ConfigIssue

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "AggregationSettings",
    "BudgetSettings",
    "CoalesceSettings",
    "GateSettings",
    "LandscapeSettings",
    "PipelineSettings",
    "RuntimeSettings",
    "SchemaSettings",
    "SinkSettings",
    "SourceSettings",
    "TransformSettings",
    "TriggerSettings",
    "format_location",
    "issues_from_validation",
    "load_settings",
]

FieldType = Literal["int", "float", "str", "bool", "date", "datetime"]
PluginRef = Any  # an entry name, "module:Class", a Plugin class, or (from Python) an instance


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class LandscapeSettings(_Model):
    """Where the audit trail is written."""

    url: str = Field(
        "sqlite+aiosqlite:///runs/audit.db",
        description="SQLAlchemy async URL of the Landscape (SQLite file or PostgreSQL).",
    )


class RuntimeSettings(_Model):
    """Engine tuning; the defaults suit most pipelines."""

    max_buffer_size: int = Field(
        64, ge=1, description="Capacity of every connection between nodes (rows)."
    )
    commit_interval_ms: int = Field(
        50, ge=1, description="Longest time an audit record waits for its group commit."
    )
    time_slice_ms: float = Field(
        0.25,
        ge=0,
        description="Longest stretch of work after which a node lets the event loop's "
        "other tasks run (at its next send), so that a service embedding the engine keeps "
        "answering while a run goes on. Smaller answers sooner and costs throughput; 0 "
        "lets nodes run until their buffers fill (most throughput, least responsive).",
    )
    drain_timeout_seconds: float = Field(
        30.0,
        ge=0,
        description="After a stop, how long in-flight rows may take to finish before what "
        "still runs is cancelled (and re-done by resume).",
    )
    checkpoint_every_rows: int = Field(
        1000, ge=1, description="Write a checkpoint each time this many more rows were read."
    )
    checkpoint_interval_seconds: float = Field(
        10.0, gt=0, description="Write a checkpoint at least this often while rows are read."
    )
    stop_aggregations: Literal["flush", "hold"] = Field(
        "flush",
        description="What a stop does with the rows aggregations hold: flush them as "
        "partial batches (trigger shutdown), or hold them in the checkpoint so that resume "
        "goes on filling the same batches (outputs then equal an uninterrupted run's).",
    )
    heartbeat_seconds: float = Field(
        2.0,
        gt=0,
        description="How often the run's owner confirms its lease when it has nothing to "
        "commit (every commit confirms it too).",
    )
    lease_seconds: float = Field(
        10.0,
        gt=0,
        description="How long after its last heartbeat a run's owner counts as gone on "
        "another machine, so that a resume may take the run over (on the same machine a "
        "resume sees at once that the owner's process ended).  At least three heartbeats.",
    )

    max_failed_rows: int | None = Field(
        None,
        ge=0,
        description="Stop the run gracefully (interrupted, resumable) once more rows than "
        "this have failed in it: ended failed, or sent to an on_error sink by a node (the "
        "source's invalid records are not counted), as the exit code 4 counts them; "
        "counted from the start of the run or resume.",
    )
    max_failed_ratio: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Stop the run gracefully once more than this share of the rows "
        "finished so far (ended, or sent to an error sink) have failed, counted as for "
        "max_failed_rows; checked only once failed_ratio_min_rows rows have finished.",
    )
    failed_ratio_min_rows: int = Field(
        20, ge=1, description="Rows that must have finished before max_failed_ratio applies."
    )

    @model_validator(mode="after")
    def _lease_outlasts_heartbeats(self) -> RuntimeSettings:
        if self.lease_seconds < 3 * self.heartbeat_seconds:
            raise ValueError(
                f"lease_seconds ({self.lease_seconds:g}) must be at least three "
                f"heartbeat_seconds ({self.heartbeat_seconds:g})"
            )
        return self


class BudgetSettings(_Model):
    """Limits on what a run's external calls may cost.  Each LLM call reserves its
    estimate (prompt estimate plus the request's ``max_tokens``, priced by the
    endpoint's ``prices``) before it is sent, and none is sent whose reservation would
    cross a limit: the run then stops gracefully (as ``Pipeline.stop()`` does), the
    budget recorded as the reason it stopped, the rows not sent left for a resume
    (which may run with a raised budget).  Spend passes a limit only by what calls used
    beyond their estimates."""

    max_cost: float | None = Field(None, gt=0, description="Total cost of all calls.")
    max_tokens: int | None = Field(None, ge=1, description="Prompt plus completion tokens.")


class SchemaSettings(_Model):
    """Typing and validation of source rows."""

    mode: Literal["strict", "dynamic"] = Field(
        description="strict: exactly the listed fields; dynamic: any fields, listed ones coerced."
    )
    fields: dict[str, FieldType] = Field(
        default_factory=dict,
        description="Field name -> int | float | str | bool | date | datetime.",
    )


class SourceSettings(_Model):
    """The one source of the pipeline."""

    name: str = Field("source", description="Node name of the source.")
    plugin: PluginRef = Field(description="csv | jsonl | json | memory | 'module:Class'.")
    options: dict[str, Any] = Field(default_factory=dict, description="Plugin options.")
    row_schema: SchemaSettings | None = Field(
        None, alias="schema", description="Validate and coerce rows; invalid rows are quarantined."
    )
    on_validation_failure: str | None = Field(
        None,
        description="A sink for malformed rows, or 'discard'. Unset: quarantined in the "
        "Landscape only.",
    )
    on_success: str = Field(description="Connection or sink that valid rows go to.")
    max_record_bytes: int = Field(
        MAX_RECORD_BYTES,
        ge=1,
        description="The longest record the source parses (bytes of input). A longer one "
        "is quarantined unparsed, stored cut to this many bytes with its full size and "
        "SHA-256; csv and jsonl read past it in pieces, never holding it whole.",
    )

    model_config = ConfigDict(populate_by_name=True)


class TransformSettings(_Model):
    """A row-by-row transform."""

    name: str = Field(description="Unique node name.")
    plugin: PluginRef = Field(description="field_map | compute | filter | passthrough | ...")
    input: str = Field(description="Connection this node reads.")
    on_success: str = Field(description="Connection or sink for results.")
    on_error: str | None = Field(
        None, description="Sink for rows that fail here; unset: they end 'failed'."
    )
    concurrency: int = Field(1, ge=1, description="Rows processed at once.")
    ordered: bool = Field(True, description="Release results in arrival order.")
    batch_size: int = Field(
        1,
        ge=1,
        description="Rows handed to the plugin together (llm, embedding: one request for "
        "all); above 1 only for plugins that batch.",
    )
    batch_wait_ms: int = Field(50, ge=0, description="Longest a partial batch waits for more rows.")
    max_pending: int | None = Field(
        None,
        ge=1,
        description="Rows in flight plus waiting to be released (default 4 x concurrency).",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Plugin options.")

    @model_validator(mode="after")
    def _pending_covers_concurrency(self) -> TransformSettings:
        if self.max_pending is not None and self.max_pending < self.concurrency:
            raise ValueError("max_pending must be at least concurrency")
        return self

    @property
    def window(self) -> int:
        """Effective ``max_pending``."""
        return self.max_pending if self.max_pending is not None else 4 * self.concurrency


class GateSettings(_Model):
    """Routes each row by a condition, or forks it into branches."""

    name: str = Field(description="Unique node name.")
    input: str = Field(description="Connection this node reads.")
    condition: str | None = Field(None, description="Expression over `row`.")
    routes: dict[str, str] | None = Field(
        None,
        description="Condition value ('true', 'false', or str(value)) -> connection, sink "
        "or 'discard'.",
    )
    fork_to: dict[str, str] | None = Field(
        None, description="Branch name -> connection: every row goes to every branch."
    )
    on_error: str | None = Field(
        None, description="Sink for rows whose condition fails; unset: 'failed'."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> GateSettings:
        if self.fork_to is not None:
            if self.condition is not None or self.routes is not None:
                raise ValueError("a gate has either fork_to or condition/routes, not both")
            if not self.fork_to:
                raise ValueError("fork_to needs at least one branch")
        elif self.condition is None or not self.routes:
            raise ValueError("a gate needs condition and routes, or fork_to")
        return self


JoinPolicy = Literal["require_all", "quorum", "best_effort", "first"]
MergeStrategy = Literal["union", "nested", "select"]
OutputMode = Literal["transform", "single", "passthrough"]


class CoalesceSettings(_Model):
    """Joins the branch tokens of each forked row back into one token."""

    name: str = Field(description="Unique node name.")
    branches: dict[str, str] = Field(
        min_length=2,
        description="Branch name (as the fork gate names it) -> connection it arrives on.",
    )
    policy: JoinPolicy = Field(
        "require_all",
        description="require_all: every branch; quorum: `quorum` branches; best_effort: what "
        "arrived by the timeout or end of input; first: the first arrival.",
    )
    quorum: int | None = Field(None, ge=1, description="Branches needed with policy quorum.")
    merge: MergeStrategy = Field(
        "union",
        description="union: all fields (differing values conflict); nested: {branch: row}; "
        "select: the row of `select_branch`.",
    )
    prefer: str | None = Field(
        None, description="With merge union: the branch whose value wins a conflict."
    )
    select_branch: str | None = Field(None, description="With merge select: the branch taken.")
    timeout_seconds: float | None = Field(
        None, gt=0, description="Longest a join waits after its first branch arrived."
    )
    on_success: str = Field(description="Connection or sink for joined rows.")
    on_error: str | None = Field(
        None, description="Sink for the tokens of failed joins; unset: they end 'failed'."
    )


class TriggerSettings(_Model):
    """When an aggregation flushes a batch; the first trigger to fire wins.

    End of input always flushes what is left.
    """

    count: int | None = Field(None, ge=1, description="Flush when the batch has this many rows.")
    timeout_seconds: float | None = Field(
        None, gt=0, description="Flush this long after the batch's first row."
    )
    condition: str | None = Field(
        None,
        description="Expression over `row` (the newest), `batch_count` and "
        "`batch_age_seconds`; flush when true.",
    )


class AggregationSettings(_Model):
    """Collects rows into batches (per group) and flushes each through its plugin."""

    name: str = Field(description="Unique node name.")
    plugin: PluginRef = Field(description="batch_stats | collect | 'module:Class'.")
    input: str = Field(description="Connection this node reads.")
    on_success: str = Field(description="Connection or sink for the flushed rows.")
    on_error: str | None = Field(
        None, description="Sink for the rows of a failed batch; unset: they end 'failed'."
    )
    trigger: TriggerSettings = Field(
        default_factory=TriggerSettings, description="When a batch flushes."
    )
    group_by: str | None = Field(
        None, description="A field name or expression over `row`: one batch per value."
    )
    output_mode: OutputMode = Field(
        "transform",
        description="transform: N rows in, M new rows out; single: N in, 1 out; "
        "passthrough: the N rows go on, enriched.",
    )
    retries: int = Field(
        0, ge=0, description="Times a failed flush is retried, each as a new batch attempt."
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Plugin options.")


class SinkSettings(_Model):
    """Where rows are written."""

    name: str = Field(description="Unique sink name; also the connection it reads.")
    plugin: PluginRef = Field(description="csv | jsonl | database | 'module:Class'.")
    options: dict[str, Any] = Field(default_factory=dict, description="Plugin options.")
    batch_size: int = Field(500, ge=1, description="Rows per durable write.")
    flush_interval_ms: int = Field(
        200, ge=0, description="Longest a partial batch waits for more rows."
    )
    on_write_failure: str = Field(
        "fail",
        description=(
            "What happens to a row this sink cannot write (a value it cannot encode, a "
            "name collision, a refused write): `fail` ends it `failed`; `discard` ends it "
            "`diverted` here; a sink name sends it there (with `_error` and "
            "`_error_node` fields added), where it ends `diverted`. Its error is "
            "recorded either way and the run goes on."
        ),
    )


class PipelineSettings(_Model):
    """A whole pipeline file."""

    name: str | None = Field(None, description="Pipeline name shown in `ledgerflow runs`.")
    landscape: LandscapeSettings = Field(
        default_factory=LandscapeSettings, description="The audit store."
    )
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings, description="Engine tuning.")
    endpoints: dict[str, EndpointSettings] = Field(
        default_factory=dict, description="LLM endpoints by name, shared by the nodes using them."
    )
    budget: BudgetSettings | None = Field(None, description="Limits on external calls.")
    source: SourceSettings = Field(description="Where rows come from.")
    transforms: list[TransformSettings] = Field(
        default_factory=list, description="Row-by-row transforms."
    )
    gates: list[GateSettings] = Field(default_factory=list, description="Routing and forks.")
    coalesce: list[CoalesceSettings] = Field(
        default_factory=list, description="Joins of forked branches."
    )
    aggregations: list[AggregationSettings] = Field(
        default_factory=list, description="Batching of rows, per group."
    )
    sinks: list[SinkSettings] = Field(min_length=1, description="Where rows are written.")


def format_location(loc: tuple[int | str, ...], prefix: str = "") -> str:
    """``('transforms', 1, 'input')`` -> ``transforms[1].input``."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def issues_from_validation(error: ValidationError, prefix: str = "") -> list[ConfigIssue]:
    """One :class:`ConfigIssue` per pydantic error, located by key path."""
    issues = []
    for item in error.errors():
        loc = tuple(part for part in item["loc"] if not _is_union_tag(part))
        issues.append(ConfigIssue(format_location(loc, prefix), _message(item)))
    return issues


def _is_union_tag(part: int | str) -> bool:
    return isinstance(part, str) and (part.startswith("function-") or "[" in part)


def _message(item: Any) -> str:
    message = str(item["msg"])
    if item["type"] == "extra_forbidden":
        return "unknown key"
    return message.removeprefix("Value error, ")


def load_settings(data: Any) -> PipelineSettings:
    """Validate a parsed pipeline document; raises :class:`ConfigError` naming key paths."""
    if not isinstance(data, dict):
        raise ConfigError.at("", "a pipeline file must be a mapping of sections")
    try:
        return PipelineSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(issues_from_validation(exc)) from None


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; unreadable or malformed files raise :class:`ConfigError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError.at("", f"cannot read {path}: {exc.strerror}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError.at("", f"{path} is not valid YAML: {exc}") from exc
