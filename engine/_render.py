"""Rich renderables for the CLI's ``explain``, ``verify`` and ``runs`` (pure functions).

Nothing here prints or reads the Landscape: each function turns a record into a
renderable, so the CLI decides where it goes and tests render it to a string.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING, Any

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rich.console import RenderableType

    from landscape._lineage import (
        BatchMembership,
        CallRecord,
        Lineage,
        NodeStateRecord,
        OutcomeRecord,
        RouteRecord,
        TokenLineage,
    )
    from landscape._store import RunSummary
    from landscape._verify import VerifyReport

__all__ = ["render_lineage", "render_runs", "render_verify", "short_hash"]

_HASH_CHARS = 12
_VALUE_CHARS = 100
_STATUS_MARKS = {
    "completed": "[green]✓[/]",
    "failed": "[red]✗[/]",
    "pending": "[yellow]…[/]",
    "cancelled": "[dim]⊘[/]",
    "open": "[red]?[/]",
}
_OUTCOME_STYLES = {
    "completed": "green",
    "routed": "green",
    "quarantined": "yellow",
    "failed": "red",
    "discarded": "dim",
    "buffered": "yellow",
}
_RUN_STYLES = {"completed": "green", "failed": "red", "interrupted": "yellow", "running": "cyan"}


def short_hash(value: str | None) -> str:
    """The first 12 characters of a hash, or ``-`` when there is none."""
    return value[:_HASH_CHARS] if value else "-"


def _compact(value: Any, limit: int = _VALUE_CHARS) -> str:
    """``value`` as one line of JSON, cut to ``limit`` characters, markup-escaped."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return escape(text)


def _duration(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f} ms"


def _error_text(error: Any) -> str:
    """A one-line description of a recorded error (``type: message`` when it has them)."""
    if isinstance(error, dict) and "message" in error:
        kind = error.get("type") or error.get("kind")
        return _compact(f"{kind}: {error['message']}" if kind else error["message"])
    return _compact(error)


# -- explain ---------------------------------------------------------------------------


def render_lineage(lineage: Lineage) -> Tree:
    """A tree of everything recorded about one source row.

    The root names the run and row; below it the source record (hash, data, validation
    errors), then each token with the node states it passed (status, short input/output
    hashes, duration, the row after every node that changed it, gate decisions, routes,
    calls, errors), its batches, its outcome and sink, and the tokens made from it (fork
    branches, joins) nested under it.
    """
    run, row = lineage.run, lineage.row
    tree = Tree(
        f"[bold]row {row.row_index}[/] ({escape(row.row_id)}) of run "
        f"[bold]{escape(run.run_id)}[/] ({_run_status(run.status)})"
    )
    source = tree.add(
        f"source [bold]{escape(row.source_node_id)}[/] · hash {short_hash(row.source_data_hash)}"
    )
    source.add(f"data {_compact(row.data)}")
    for error in row.validation_errors:
        source.add(f"[red]✗ validation error:[/] {_compact(error)}")
    for token in lineage.tokens:
        _add_token(tree, token, lineage.focus_token_id, label=None)
    return tree


def _run_status(status: str) -> str:
    style = _RUN_STYLES.get(status, "")
    return f"[{style}]{escape(status)}[/]" if style else escape(status)


def _token_label(token: TokenLineage, focus: str | None, label: str | None) -> str:
    text = label or f"token [bold]{escape(token.token_id)}[/]"
    if token.branch_name is not None and label is None:
        text = f"branch [bold]{escape(token.branch_name)}[/]: {text}"
    if len(token.parent_ids) > 1:
        text += f" (from {', '.join(escape(p) for p in token.parent_ids)})"
    if token.token_id == focus:
        text += " [reverse]◀ asked for[/]"
    return text


def _add_token(parent: Tree, token: TokenLineage, focus: str | None, label: str | None) -> None:
    node = parent.add(_token_label(token, focus, label))
    for state in token.states:
        _add_state(node, state)
    for batch in token.batches:
        node.add(_batch_text(batch))
    for outcome in token.outcomes:
        node.add(_outcome_text(outcome))
    for child in token.children:
        kind = "branch" if child.branch_name is not None else "child"
        _add_token(node, child, focus, label=_child_label(child, kind))
    for merged in token.merged_into:
        node.add(f"→ merged into token {escape(merged)} (shown under its first parent)")


def _child_label(child: TokenLineage, kind: str) -> str:
    if kind == "branch":
        return (
            f"⑂ branch [bold]{escape(child.branch_name or '')}[/]: token {escape(child.token_id)}"
        )
    if len(child.parent_ids) > 1:
        return f"⑃ joined: token [bold]{escape(child.token_id)}[/]"
    return f"↳ token [bold]{escape(child.token_id)}[/]"


def _state_text(state: NodeStateRecord) -> str:
    mark = _STATUS_MARKS.get(state.status, "?")
    kind = f" ({escape(state.node_type)})" if state.node_type else ""
    attempt = f" attempt {state.attempt}" if state.attempt != 1 else ""
    return (
        f"{mark} [bold]{escape(state.node_id)}[/]{kind} {escape(state.status)}{attempt} · "
        f"in {short_hash(state.input_hash)} → out {short_hash(state.output_hash)} · "
        f"{_duration(state.duration_ms)}"
    )


def _add_state(parent: Tree, state: NodeStateRecord) -> None:
    node = parent.add(_state_text(state))
    if state.output is not None and state.output_hash != state.input_hash:
        node.add(f"row {_compact(state.output)}")
    if state.error is not None:
        node.add(f"[red]error:[/] {_error_text(state.error)}")
    gate = _gate_text(state.context)
    if gate is not None:
        node.add(gate)
    elif state.context is not None and state.status != "completed":
        node.add(f"context {_compact(state.context)}")
    for route in state.routes:
        node.add(_route_text(route))
    for call in state.calls:
        _add_call(node, call)


def _gate_text(context: Any) -> str | None:
    if not isinstance(context, dict) or "condition" not in context:
        return None
    return (
        f"gate: {_compact(context['condition'])} → {_compact(context.get('value'))}"
        f" · route {_compact(context.get('route'))}"
    )


def _route_text(route: RouteRecord) -> str:
    edge = f"{escape(route.from_node or '?')} → {escape(route.to_node or '?')}"
    mode = f", {escape(route.mode)}" if route.mode else ""
    reason = f" · reason {_compact(route.reason)}" if route.reason is not None else ""
    return f"route [bold]{escape(route.route_label)}[/] ({edge}{mode}){reason}"


def _add_call(parent: Tree, call: CallRecord) -> None:
    what = "/".join(escape(p) for p in (call.provider, call.model) if p)
    parts = [f"call {call.call_index} {escape(call.call_type)} {what}".rstrip()]
    parts += [f"attempt {call.attempt}", escape(call.status)]
    if call.http_status is not None:
        parts.append(f"HTTP {call.http_status}")
    parts.append(_duration(call.latency_ms))
    if call.prompt_tokens is not None or call.completion_tokens is not None:
        parts.append(f"tokens {call.prompt_tokens or 0}+{call.completion_tokens or 0}")
    if call.cost:
        parts.append(f"cost {call.cost:.6f}")
    node = parent.add(" · ".join(parts))
    node.add(f"request {short_hash(call.request_hash)} → response {short_hash(call.response_hash)}")
    for role, text in _chat_messages(call.request):
        node.add(f"[dim]{escape(role)}:[/] {escape(_clip(text))}")
    answer = _chat_answer(call.response)
    if answer is not None:
        node.add(f"[dim]answer:[/] {escape(_clip(answer))}")
    if call.error is not None:
        node.add(f"[red]error:[/] {_error_text(call.error)}")


def _chat_messages(request: Any) -> list[tuple[str, str]]:
    """The (role, text) messages of a chat completion request, if it is one."""
    messages = request.get("messages") if isinstance(request, dict) else None
    if not isinstance(messages, list):
        return []
    return [
        (str(m.get("role")), m["content"])
        for m in messages
        if isinstance(m, dict) and isinstance(m.get("content"), str)
    ]


def _chat_answer(response: Any) -> str | None:
    """The text of a chat completion's first choice, if the response is one."""
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _clip(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _batch_text(batch: BatchMembership) -> str:
    trigger = f", trigger {escape(batch.trigger_reason)}" if batch.trigger_reason else ""
    job = f", job {escape(batch.external_job_id)}" if batch.external_job_id else ""
    return (
        f"batch {escape(batch.batch_id)} at [bold]{escape(batch.aggregation_node_id)}[/] "
        f"(member #{batch.ordinal}, attempt {batch.attempt}, {escape(batch.status)}{trigger}{job})"
    )


def _outcome_text(outcome: OutcomeRecord) -> str:
    style = _OUTCOME_STYLES.get(outcome.outcome, "cyan")
    text = f"● outcome [{style}]{escape(outcome.outcome)}[/]"
    if outcome.sink_name:
        text += f" → sink [bold]{escape(outcome.sink_name)}[/]"
    if outcome.batch_id:
        text += f" (batch {escape(outcome.batch_id)})"
    if not outcome.is_terminal:
        text += " (not terminal)"
    if outcome.context is not None:
        text += f" · {_compact(outcome.context)}"
    return text


# -- verify ----------------------------------------------------------------------------


def render_verify(report: VerifyReport) -> RenderableType:
    """One green line when the trail is sound, else a header and a table of violations."""
    covered = f"{report.checked_tokens} tokens checked"
    if report.watermark is not None:
        covered += f", watermark row {report.watermark}"
    if report.payloads_checked is not None:
        covered += f", {report.payloads_checked} payloads hashed again"
    if report.diverted:
        covered += f", {report.diverted} diverted by a sink that could not write them"
    if report.ok:
        return Text.from_markup(
            f"[green]✓[/] run {escape(report.run_id)}: audit trail OK ({covered})"
        )
    header = Text.from_markup(
        f"[red]✗[/] run {escape(report.run_id)}: {len(report.violations)} violation(s) ({covered})"
    )
    table = Table("Invariant", "Token", "Row", "Problem", show_lines=False)
    for violation in report.violations:
        table.add_row(
            violation.invariant,
            violation.token_id or "",
            "" if violation.row_index is None else str(violation.row_index),
            violation.message,
        )
    return Group(header, table)


# -- runs ------------------------------------------------------------------------------


def _timestamp(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _run_duration(run: RunSummary) -> str:
    if run.completed_at is None:
        return "-"
    seconds = run.completed_at - run.started_at
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    return (
        f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
        if minutes >= 60
        else f"{minutes}m{secs:02d}s"
    )


def _outcome_counts(outcomes: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(outcomes.items()))


def render_runs(runs: Sequence[RunSummary]) -> Table:
    """A table of runs: id, pipeline, status, start (UTC), duration, rows, outcome counts."""
    table = Table(
        "Run", "Pipeline", "Status", "Started (UTC)", "Duration", "Rows", "Outcomes", "Calls"
    )
    table.columns[5].justify = "right"
    for run in runs:
        table.add_row(
            escape(run.run_id),
            escape(run.pipeline_name or ""),
            _run_status(run.status),
            _timestamp(run.started_at),
            _run_duration(run),
            "-" if run.rows_processed is None else str(run.rows_processed),
            _outcome_counts(run.outcomes),
            _call_summary(run),
        )
    return table


def _call_summary(run: RunSummary) -> str:
    summary = run.calls.describe() if run.calls.calls else "-"
    if run.replayed_from is not None:
        summary += f" (replay of {escape(run.replayed_from)})"
    return summary
