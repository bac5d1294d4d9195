"""The live progress display of ``ledgerflow run`` (rich)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from types import TracebackType

    from ._pipeline import RunStatistics

__all__ = ["LiveProgress", "render_statistics"]


def render_statistics(stats: RunStatistics) -> Group:
    """Rows read and rate, then one line per node: received, in flight, queue, outcomes."""
    header = Text.assemble(
        ("run ", "dim"),
        (stats.run_id, "bold"),
        f"   rows read {stats.rows_read:,}   {stats.rows_per_second:,.0f} rows/s   "
        f"{stats.elapsed_s:,.1f} s   audit backlog {stats.audit_backlog:,}",
    )
    if stats.calls.calls:
        header.append("\n" + stats.calls.describe())
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("node", "kind", "received", "in flight", "queue", "outcomes"):
        table.add_column(
            column, justify="left" if column in ("node", "kind", "outcomes") else "right"
        )
    for node in stats.nodes:
        outcomes = "  ".join(f"{name} {count:,}" for name, count in sorted(node.outcomes.items()))
        table.add_row(
            node.node_id,
            node.kind.value,
            f"{node.received:,}",
            str(node.in_flight),
            str(node.queue_depth),
            outcomes,
        )
    return Group(header, table)


class LiveProgress:
    """A rich ``Live`` display fed with :class:`RunStatistics` snapshots."""

    def __init__(self, console: Console) -> None:
        self._live = Live(console=console, refresh_per_second=4, transient=False)

    def __enter__(self) -> Self:
        self._live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._live.__exit__(exc_type, exc, tb)

    def update(self, stats: RunStatistics) -> None:
        self._live.update(render_statistics(stats))
