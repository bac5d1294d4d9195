"""Which branches of a forked row may still deliver a token to its join.

A fork gate that some coalesce joins (or that forks a token already inside such a
fork) opens a :class:`ForkInstance`, and every child token carries it.  The instance
counts, per branch, the tokens still on their way.  When a branch's count drops to
zero because its token ended somewhere else (a sink, a discard, an error, a batch),
the coalesce is told at once that the branch will never arrive, so the join resolves
by its policy without waiting for a timeout.  A nested fork holds one count of its
parent's branch until it is joined (the joined token takes the count over) or until
all of its own branches ended.

Nothing here is kept per row in any table: an instance lives exactly as long as the
tokens and pending joins that refer to it, so memory follows what is in flight, not
the length of the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["ForkInstance", "JoinListener", "JoinResult"]


class JoinListener(Protocol):
    """The coalesce that joins a fork: told when one of its branches can no longer come."""

    def branch_lost(self, instance: ForkInstance, branch: str) -> None: ...


@dataclass(frozen=True, slots=True)
class JoinResult:
    """How a join was resolved, for the branches that arrive after it."""

    output_token_id: str | None
    arrived: tuple[str, ...]
    missing: tuple[str, ...]
    reason: str | None = None


@dataclass(slots=True, eq=False)
class ForkInstance:
    """One fork of one token: what each of its branches still has on the way."""

    #: The forked (parent) token's id: the join key.
    key: str
    fork_node: str
    live: dict[str, int]
    #: The coalesce joining this fork, if any.
    join: JoinListener | None = None
    #: The fork this one happened inside, and on which of its branches.
    parent: ForkInstance | None = None
    parent_branch: str | None = None
    #: Set once the coalesce resolved the join.
    result: JoinResult | None = None
    #: Whether this fork's count on the parent's branch was handed on or given up.
    released: bool = False

    @classmethod
    def open(
        cls,
        key: str,
        fork_node: str,
        branches: Iterable[str],
        *,
        join: JoinListener | None,
        parent: ForkInstance | None,
        parent_branch: str | None,
    ) -> ForkInstance | None:
        """A new instance, or ``None`` when nothing will ever ask about this fork."""
        if join is None and parent is None:
            return None
        live = dict.fromkeys(branches, 1)
        return cls(key, fork_node, live, join=join, parent=parent, parent_branch=parent_branch)

    def leave(self, branch: str, *, lost: bool) -> None:
        """One token of ``branch`` is gone: ended elsewhere (``lost``) or arrived at the join."""
        self.live[branch] -= 1
        if self.live[branch]:
            return
        if self.join is not None:
            if lost and self.result is None:
                self.join.branch_lost(self, branch)
        elif not any(self.live.values()):
            self.release()

    def release(self) -> None:
        """This fork's line on its parent's branch has ended (at most once)."""
        if self.released:
            return
        self.released = True
        if self.parent is not None:
            assert self.parent_branch is not None
            self.parent.leave(self.parent_branch, lost=True)

    def hand_over(self) -> None:
        """The joined token carries this fork's count on the parent's branch on."""
        self.released = True
