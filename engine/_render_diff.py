"""The rich renderable of ``ledgerflow diff`` (a pure function of a :class:`RunDiff`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ._render import _OUTCOME_STYLES, _chat_answer, _compact, _error_text, _run_status, short_hash

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rich.console import RenderableType

    from landscape import Divergence, RowDiff, RunDiff
    from landscape._diff import FieldChange, NodeDecision, TokenEnd

__all__ = ["render_diff"]

_FIELDS_SHOWN = 4
_INDEXES_SHOWN = 20
_ANSWER_CHARS = 80


def render_diff(diff: RunDiff) -> RenderableType:
    """The two runs, the counts, then a table of the differing rows analysed.

    Each row of the table shows the row index, where its lines ended in each run
    (``branch: outcome→sink``), the first node where they diverged with what each run
    decided there (a gate's condition, value and route; an LLM's answer; otherwise the
    output hashes), and the fields of the final rows that differ.  Below it: how many
    differing rows were left out (``--limit``), and the rows whose source data differs
    or that only one run has.
    """
    parts: list[RenderableType] = [_header(diff), _counts(diff)]
    if diff.rows:
        parts.append(_rows_table(diff.rows))
    parts.extend(_footer(diff))
    return Group(*parts)


def _header(diff: RunDiff) -> Text:
    a, b = diff.run_a, diff.run_b
    return Text.from_markup(
        f"diff [bold]A[/] {escape(a.run_id)} ({_run_status(a.status)}) · "
        f"[bold]B[/] {escape(b.run_id)} ({_run_status(b.status)})"
    )


def _counts(diff: RunDiff) -> Text:
    c = diff.counts
    if diff.identical:
        return Text.from_markup(f"[green]✓[/] {c.compared:,} rows compared: all identical")
    text = (
        f"{c.compared:,} rows compared: {c.identical:,} identical, "
        f"[bold]{c.different:,} differ[/], {c.source_differs:,} source differs · "
        f"only in A: {c.only_in_a:,} · only in B: {c.only_in_b:,}"
    )
    return Text.from_markup(text)


def _rows_table(rows: Sequence[RowDiff]) -> Table:
    table = Table("Row", "A", "B", "Diverges at", "A decided", "B decided", "Fields (A → B)")
    table.columns[0].justify = "right"
    for row in rows:
        first = row.first_divergence
        table.add_row(
            str(row.row_index),
            _ends(row.ends_a),
            _ends(row.ends_b),
            _where(row),
            _decided(first, first.a) if first else "",
            _decided(first, first.b) if first else "",
            _fields(row.field_changes or (first.changed_fields if first else ())),
        )
    return table


def _ends(ends: Sequence[TokenEnd]) -> str:
    return "\n".join(_end(end) for end in ends) or "-"


def _end(end: TokenEnd) -> str:
    branch = f"{escape(end.path)}: " if end.path else ""
    if end.outcome is None:
        return f"{branch}[yellow]unfinished[/]"
    style = _OUTCOME_STYLES.get(end.outcome, "cyan")
    sink = f"→{escape(end.sink)}" if end.sink else ""
    return f"{branch}[{style}]{escape(end.outcome)}[/]{sink}"


def _where(row: RowDiff) -> str:
    first = row.first_divergence
    if first is None:
        return "-"
    kind = f" ({escape(first.node_type)})" if first.node_type else ""
    text = f"[bold]{escape(first.node_id)}[/]{kind}"
    if first.path:
        text += f"\non {escape(first.path)}"
    text += f"\n[dim]{escape(first.kind)}[/]"
    more = len(row.divergences) - 1
    if more:
        text += f"\n+{more} more"
    return text


def _decided(divergence: Divergence, decision: NodeDecision | None) -> str:
    """What one run did at the diverging node, in the terms that differ."""
    if decision is None:
        return "[dim](no such step)[/]" if divergence.kind != "token" else "[dim](no token)[/]"
    if divergence.kind in ("node", "end", "token"):
        return f"{escape(decision.node_id)} {escape(decision.status)}"
    if divergence.kind == "route":
        return _route_decision(decision)
    if divergence.kind == "answer":
        return _answer(decision)
    if divergence.kind == "status" and decision.error is not None:
        return f"{escape(decision.status)}: {_error_text(decision.error)}"
    return f"{escape(decision.status)} · out {short_hash(decision.output_hash)}"


def _route_decision(decision: NodeDecision) -> str:
    reason = decision.reason
    routes = ", ".join(escape(r) for r in decision.routes) or "-"
    if isinstance(reason, dict) and "condition" in reason:
        return (
            f"{_compact(reason['condition'])} → {_compact(reason.get('value'))}"
            f"\nroute {_compact(reason.get('route'))}"
        )
    if isinstance(reason, dict) and "error" in reason:
        return f"error route {routes}: {_error_text(reason['error'])}"
    return f"routes {routes}"


def _answer(decision: NodeDecision) -> str:
    answer: Any = _chat_answer(decision.answer)
    text = _compact(decision.answer if answer is None else answer, _ANSWER_CHARS)
    status = decision.answer_status
    return text if status in (None, "success") else f"{text} [dim]({escape(status or '')})[/]"


def _fields(changes: Sequence[FieldChange]) -> str:
    lines = [_field(change) for change in changes[:_FIELDS_SHOWN]]
    if len(changes) > _FIELDS_SHOWN:
        lines.append(f"+{len(changes) - _FIELDS_SHOWN} more")
    return "\n".join(lines)


def _field(change: FieldChange) -> str:
    branch = f"{escape(change.path)}: " if change.path else ""
    name = escape(change.field)
    if change.change == "added":
        return f"{branch}{name}: [dim]absent[/] → {_compact(change.b, 40)}"
    if change.change == "removed":
        return f"{branch}{name}: {_compact(change.a, 40)} → [dim]absent[/]"
    return f"{branch}{name}: {_compact(change.a, 40)} → {_compact(change.b, 40)}"


def _footer(diff: RunDiff) -> list[Text]:
    lines = []
    c = diff.counts
    if c.different > len(diff.rows):
        lines.append(
            Text(f"showing {len(diff.rows):,} of {c.different:,} differing rows (--limit)")
        )
    for label, count, indexes in (
        ("source differs (not analysed)", c.source_differs, diff.source_differs),
        ("only in A", c.only_in_a, diff.only_in_a),
        ("only in B", c.only_in_b, diff.only_in_b),
    ):
        if count:
            lines.append(Text(f"{label}: rows {_indexes(indexes, count)}"))
    return lines


def _indexes(indexes: Sequence[int], count: int) -> str:
    shown = ", ".join(str(i) for i in indexes[:_INDEXES_SHOWN])
    return shown + (f" … ({count:,} in all)" if count > min(len(indexes), _INDEXES_SHOWN) else "")
