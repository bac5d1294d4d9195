"""What the engine records, and in what order (the policy half of the audit trail).

:class:`Recorder` turns engine events into Landscape rows and hands them to the
:class:`~landscape._writer.GroupCommitWriter`; it never talks SQL itself.  All methods
that record are synchronous and never block: the engine bounds the queue by awaiting
:meth:`Recorder.wait_writable` before admitting a source row.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import secrets
import time
from typing import TYPE_CHECKING, Any

import orjson

from . import _schema as t
from ._canonical import canonical_json, payload_forms, sha256_hex
from ._outcomes import BatchStatus, NodeStateStatus, Outcome, RunStatus

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from contextlib import AbstractContextManager

    from ._leases import Fence
    from ._writer import GroupCommitWriter, WriterStatistics

__all__ = ["Recorder"]


#: The column order the fast-path tuples below are built in; checked against the schema
#: at import so that a schema change cannot silently shift values into wrong columns.
_TUPLE_LAYOUTS = {
    t.rows: (
        "row_id",
        "run_id",
        "source_node_id",
        "row_index",
        "source_data_hash",
        "source_data_ref",
    ),
    t.tokens: ("token_id", "run_id", "row_id", "branch_name", "created_at"),
    t.token_parents: ("token_id", "parent_token_id", "ordinal", "run_id"),
    t.node_states: (
        "state_id",
        "run_id",
        "token_id",
        "node_id",
        "attempt",
        "status",
        "input_hash",
        "output_hash",
        "started_at",
        "completed_at",
        "duration_ms",
        "error_json",
        "context_json",
        "step_index",
        "external_job_id",
    ),
    t.calls: (
        "call_id",
        "run_id",
        "state_id",
        "call_index",
        "call_type",
        "provider",
        "model",
        "status",
        "attempt",
        "http_status",
        "request_hash",
        "request_ref",
        "response_hash",
        "response_ref",
        "error_json",
        "latency_ms",
        "prompt_tokens",
        "completion_tokens",
        "cost",
        "created_at",
        "token_id",
        "node_id",
    ),
    t.routing_events: ("event_id", "run_id", "state_id", "edge_id", "route_label", "reason_json"),
    t.token_outcomes: (
        "outcome_id",
        "run_id",
        "token_id",
        "outcome",
        "is_terminal",
        "sink_name",
        "batch_id",
        "context_json",
        "recorded_at",
    ),
}
for _table, _layout in _TUPLE_LAYOUTS.items():
    if tuple(column.name for column in _table.columns) != _layout:
        raise RuntimeError(f"recorder tuple layout of {_table.name} is out of date")


_JSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def _json(value: Any) -> str | None:
    """Contexts and errors as JSON text (values JSON cannot hold are written as ``str``)."""
    if value is None:
        return None
    try:
        return orjson.dumps(value, default=str, option=_JSON_OPTIONS).decode("utf-8")
    except orjson.JSONEncodeError:
        # e.g. an error message quoting a lone surrogate: escaped JSON still records it
        return json.dumps(value, default=str)


def _unchanged(value: Any) -> Any:
    return value


class Recorder:
    """Records one run's events into the Landscape through a group-commit writer."""

    def __init__(
        self,
        writer: GroupCommitWriter,
        run_id: str,
        *,
        scrub: Callable[[Any], Any] | None = None,
    ) -> None:
        self._writer = writer
        self.run_id = run_id
        #: Masks secrets in what errors, reasons and outcome contexts say (identity
        #: when the run has none to hide): they may quote a key or a URL password.
        self._scrub: Callable[[Any], Any] = scrub or _unchanged
        self._session = f"-{secrets.token_hex(5)}-"
        # Decimal from 10**9: a session's ids keep one width for nine billion of them (so
        # they sort in creation order), and str() of an int is the cheapest formatting.
        self._next_number = itertools.count(10**9).__next__

    # -- identities ------------------------------------------------------------------

    def new_id(self, kind: str) -> str:
        """A new identifier, unique across runs and sessions (``kind`` is a short prefix).

        The counter is fixed-width so a session's ids sort in creation order: index
        inserts then land at the end of their B-tree instead of at random pages.
        """
        return f"{kind}{self._session}{self._next_number()}"

    # -- run and graph ---------------------------------------------------------------

    def begin_run(
        self,
        *,
        config_hash: str,
        settings: Mapping[str, Any],
        engine_version: str,
        pipeline_name: str | None,
        replayed_from: str | None = None,
        pipeline_file: str | None = None,
    ) -> None:
        self._writer.insert(
            t.runs,
            {
                "run_id": self.run_id,
                "status": RunStatus.RUNNING.value,
                "started_at": time.time(),
                "completed_at": None,
                "config_hash": config_hash,
                "settings_json": canonical_json(settings),
                "engine_version": engine_version,
                "pipeline_name": pipeline_name,
                "rows_processed": None,
                "outcomes_json": None,
                "error": None,
                "replayed_from": replayed_from,
                "pipeline_file": pipeline_file,
            },
        )

    def scrub(self, value: Any) -> Any:
        """``value`` with the run's secrets masked (what errors are recorded as)."""
        return self._scrub(value)

    def finish_run(
        self,
        status: RunStatus,
        *,
        rows_processed: int,
        outcomes: Mapping[str, int],
        error: str | None = None,
    ) -> None:
        self._writer.update(
            t.runs,
            {"run_id": self.run_id},
            {
                "status": status.value,
                "completed_at": time.time(),
                "rows_processed": rows_processed,
                "outcomes_json": _json(dict(outcomes)),
                "error": None if error is None else self._scrub(error),
            },
        )

    def release_run(self, fence: Fence) -> None:
        """Give up the run's lease (the last record of an execution): the run has no
        live owner from this commit on, and a resume may take it at once."""
        self._writer.update(t.run_leases, fence.release_key(), {"released_at": time.time()})

    def resume_run(self) -> None:
        """Mark the run ``running`` again: a resume continues it."""
        self._writer.update(
            t.runs,
            {"run_id": self.run_id},
            {"status": RunStatus.RUNNING.value, "completed_at": None, "error": None},
        )

    def node(
        self,
        *,
        node_id: str,
        node_type: str,
        plugin_name: str | None,
        plugin_version: str | None,
        determinism: str | None,
        config: Mapping[str, Any],
    ) -> None:
        config_text = canonical_json(config)
        self._writer.insert(
            t.nodes,
            {
                "run_id": self.run_id,
                "node_id": node_id,
                "name": node_id,
                "node_type": node_type,
                "plugin_name": plugin_name,
                "plugin_version": plugin_version,
                "determinism": determinism,
                "config_hash": sha256_hex(config_text),
                "config_json": config_text,
            },
        )

    def edge(self, *, edge_id: str, from_node: str, to_node: str, label: str, mode: str) -> None:
        self._writer.insert(
            t.edges,
            {
                "run_id": self.run_id,
                "edge_id": edge_id,
                "from_node_id": from_node,
                "to_node_id": to_node,
                "label": label,
                "mode": mode,
            },
        )

    # -- payloads, rows and tokens ---------------------------------------------------

    def store(self, value: Any) -> str:
        """Store ``value`` content-addressed; return its hash (SHA-256 of canonical JSON).

        What is stored reads back as ``value`` did (a ``2.0`` stays a float), which is
        what a resumed run continues from.  Raises :class:`CanonicalizationError` when
        ``value`` has no canonical JSON form.
        """
        canonical, stored = payload_forms(value)
        content_hash = hashlib.sha256(canonical).hexdigest()
        self._writer.payload(content_hash, stored.decode("utf-8"))
        return content_hash

    def source_row(
        self, *, row_id: str, row_index: int, source_node_id: str, data_hash: str
    ) -> None:
        self._writer.insert_row(
            t.rows, (row_id, self.run_id, source_node_id, row_index, data_hash, data_hash)
        )

    def token(
        self,
        *,
        token_id: str,
        row_id: str,
        branch_name: str | None = None,
        parents: Sequence[str] = (),
    ) -> None:
        self._writer.insert_row(t.tokens, (token_id, self.run_id, row_id, branch_name, time.time()))
        for ordinal, parent in enumerate(parents):
            self._writer.insert_row(t.token_parents, (token_id, parent, ordinal, self.run_id))

    def validation_error(
        self, *, node_id: str, row_index: int, error: str, row_data_ref: str | None
    ) -> None:
        self._writer.insert(
            t.validation_errors,
            {
                "error_id": self.new_id("v"),
                "run_id": self.run_id,
                "node_id": node_id,
                "row_index": row_index,
                "error": self._scrub(error),
                "row_data_ref": row_data_ref,
            },
        )

    # -- processing --------------------------------------------------------------------

    def node_state(
        self,
        *,
        state_id: str,
        token_id: str,
        node_id: str,
        status: NodeStateStatus,
        input_hash: str | None,
        output_hash: str | None,
        started_at: float,
        completed_at: float | None,
        step_index: int | None = None,
        attempt: int = 1,
        error: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        """Record one visit of a token to a node, written once it has a final status."""
        duration_ms = None if completed_at is None else (completed_at - started_at) * 1000.0
        self._writer.insert_row(
            t.node_states,
            (
                state_id,
                self.run_id,
                token_id,
                node_id,
                attempt,
                status._value_,  # the plain str: marshal refuses str subclasses
                input_hash,
                output_hash,
                started_at,
                completed_at,
                duration_ms,
                None if error is None else _json(self._scrub(error)),
                None if context is None else _json(context),
                step_index,
                None,  # external_job_id: set by mark_pending
            ),
        )

    def close_state(
        self,
        state_id: str,
        *,
        status: NodeStateStatus,
        started_at: float,
        completed_at: float,
        output_hash: str | None = None,
        error: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        """Close a state recorded ``open`` (a flush before its plugin ran) with its result."""
        values: dict[str, Any] = {
            "status": status._value_,
            "completed_at": completed_at,
            "duration_ms": (completed_at - started_at) * 1000.0,
            "output_hash": output_hash,
            "error_json": None if error is None else _json(error),
        }
        if context is not None:
            values["context_json"] = _json(context)
        self._writer.update(t.node_states, {"state_id": state_id}, values)

    def mark_pending(self, state_id: str, *, external_job_id: str) -> None:
        """An ``open`` state now waits for an external job (it stays ``pending`` until
        the job ends, across stops and crashes)."""
        self._writer.update(
            t.node_states,
            {"state_id": state_id},
            {"status": NodeStateStatus.PENDING.value, "external_job_id": external_job_id},
        )

    def token_parent(self, *, token_id: str, parent_token_id: str, ordinal: int) -> None:
        """Add a parent to a token made earlier (a straggler coalesced into a join)."""
        self._writer.insert_row(t.token_parents, (token_id, parent_token_id, ordinal, self.run_id))

    # -- batches -----------------------------------------------------------------------

    def batch(
        self,
        *,
        batch_id: str,
        node_id: str,
        attempt: int,
        status: BatchStatus,
        group_key: str | None,
    ) -> None:
        """Open a batch of an aggregation node (``draft`` on its first member)."""
        self._writer.insert(
            t.batches,
            {
                "batch_id": batch_id,
                "run_id": self.run_id,
                "aggregation_node_id": node_id,
                "attempt": attempt,
                "status": status.value,
                "group_key": group_key,
                "created_at": time.time(),
            },
        )

    def batch_member(self, *, batch_id: str, token_id: str, ordinal: int) -> None:
        self._writer.insert_row(t.batch_members, (batch_id, token_id, ordinal, self.run_id))

    def update_batch(
        self,
        batch_id: str,
        *,
        status: BatchStatus,
        trigger_reason: str | None = None,
        aggregation_state_id: str | None = None,
        external_job_id: str | None = None,
    ) -> None:
        """Move a batch on: ``executing`` (with its flush state), ``pending`` (with its
        external job), ``completed``, ``failed``."""
        values: dict[str, Any] = {"status": status.value}
        if external_job_id is not None:
            values["external_job_id"] = external_job_id
        if trigger_reason is not None:
            values["trigger_reason"] = trigger_reason
        if aggregation_state_id is not None:
            values["aggregation_state_id"] = aggregation_state_id
        if status in (BatchStatus.COMPLETED, BatchStatus.FAILED):
            values["completed_at"] = time.time()
        self._writer.update(t.batches, {"batch_id": batch_id}, values)

    def routing_event(
        self, *, state_id: str, edge_id: str, route_label: str, reason: Mapping[str, Any] | None
    ) -> None:
        self._writer.insert_row(
            t.routing_events,
            (
                self.new_id("e"),
                self.run_id,
                state_id,
                edge_id,
                route_label,
                None if reason is None else _json(self._scrub(reason)),
            ),
        )

    def call(
        self,
        *,
        state_id: str,
        token_id: str,
        node_id: str,
        call_index: int,
        call_type: str,
        provider: str | None,
        model: str | None,
        status: str,
        attempt: int,
        http_status: int | None,
        request_hash: str | None,
        response_hash: str | None,
        latency_ms: float | None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        cost: float | None = None,
        error: Mapping[str, Any] | None = None,
        call_id: str | None = None,
    ) -> None:
        """Record one external call attempt of the state ``state_id`` (of ``token_id`` at
        ``node_id``); its payloads are stored (:meth:`store`) under ``request_hash`` /
        ``response_hash``."""
        self._writer.insert_row(
            t.calls,
            (
                call_id or self.new_id("c"),
                self.run_id,
                state_id,
                call_index,
                call_type,
                provider,
                model,
                status,
                attempt,
                http_status,
                request_hash,
                request_hash,
                response_hash,
                response_hash,
                None if error is None else _json(error),
                latency_ms,
                prompt_tokens,
                completion_tokens,
                cost,
                time.time(),
                token_id,
                node_id,
            ),
        )

    def outcome(
        self,
        *,
        token_id: str,
        outcome: Outcome,
        sink_name: str | None = None,
        batch_id: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        self._writer.insert_row(
            t.token_outcomes,
            (
                self.new_id("o"),
                self.run_id,
                token_id,
                outcome._value_,
                outcome is not Outcome.BUFFERED,
                sink_name,
                batch_id,
                None if context is None else _json(self._scrub(context)),
                time.time(),
            ),
        )

    def artifact(
        self, *, sink_node_id: str, uri: str, content_hash: str, size_bytes: int, rows_written: int
    ) -> None:
        self._writer.insert(
            t.artifacts,
            {
                "artifact_id": self.new_id("a"),
                "run_id": self.run_id,
                "sink_node_id": sink_node_id,
                "uri": uri,
                "content_hash": content_hash,
                "size_bytes": size_bytes,
                "rows_written": rows_written,
                "created_at": time.time(),
            },
        )

    def sink_position(self, *, sink_node_id: str, write_seq: int, position: Any) -> None:
        """Where a sink stood after a write (record it with that write's outcomes)."""
        self._writer.insert(
            t.sink_positions,
            {
                "run_id": self.run_id,
                "sink_node_id": sink_node_id,
                "write_seq": write_seq,
                "position_json": _json(position),
                "recorded_at": time.time(),
            },
        )

    def checkpoint(self, *, watermark_row_index: int, state: Mapping[str, Any]) -> None:
        self._writer.insert(
            t.checkpoints,
            {
                "checkpoint_id": self.new_id("k"),
                "run_id": self.run_id,
                "created_at": time.time(),
                "watermark_row_index": watermark_row_index,
                "state_json": canonical_json(state),
            },
        )

    # -- flow control ------------------------------------------------------------------

    async def wait_writable(self) -> None:
        """Return once the writer's queue has room (at once, without yielding, if it has)."""
        await self._writer.wait_writable()

    async def flush(self) -> None:
        """Return once every record made so far is committed."""
        await self._writer.flush()

    def together(self) -> AbstractContextManager[None]:
        """A block whose records are committed in one transaction, though it may let
        other tasks run; it must not wait for the writer (see
        ``GroupCommitWriter.together``)."""
        return self._writer.together()

    async def ensure_lease(self) -> None:
        """Return once the run's lease is confirmed as this process's (see
        ``GroupCommitWriter.ensure_lease``); at once when commits flow."""
        await self._writer.ensure_lease()

    def statistics(self) -> WriterStatistics:
        return self._writer.statistics()
