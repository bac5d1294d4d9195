"""The shape every node task shares, and what nodes do alike with a token."""

from __future__ import annotations

import math
import time
import traceback
from typing import TYPE_CHECKING, Any, Final

import anyio
from anyio import EndOfStream

from landscape import NodeStateStatus, Outcome

if TYPE_CHECKING:
    from anyio import CancelScope

    from plugins import Row

    from .._graph import NodeSpec, Route
    from .._run_context import NodeStats, RunContext
    from .._streams import Inbox, Outbox
    from .._tokens import Token

__all__ = ["WAKE", "NodeTask", "error_info"]

#: What :meth:`NodeTask.next_input` returns when a deadline passed or a wake-up came.
WAKE: Final = "wake"


def error_info(exc: BaseException) -> dict[str, Any]:
    """What is recorded about a row's error: type, message and where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None
    return {"type": type(exc).__name__, "message": str(exc), "where": where}


class NodeTask:
    """A node: reads its inbox (if any) until end of input, writes its outbox.

    Subclasses implement :meth:`run`.  On end of input a node finishes what it holds
    and closes its outbox; a row's error becomes that row's outcome; cancellation
    propagates untouched.
    """

    def __init__(
        self, spec: NodeSpec, run: RunContext, inbox: Inbox | None, outbox: Outbox
    ) -> None:
        self.spec = spec
        #: The node's id (``spec.node_id``), read for every record the node makes.
        self.node_id = spec.node_id
        self.run_ctx = run
        self.recorder = run.recorder
        self.inbox = inbox
        self.outbox = outbox
        self.stats: NodeStats = run.stats[spec.node_id]
        self._waiting: CancelScope | None = None
        self._woken = False
        self._scope = anyio.CancelScope()

    async def run_task(self) -> None:
        """Run the node (until :meth:`cancel`), then close its streams whatever happened."""
        try:
            with self._scope:
                await self.run()
        finally:
            if self.inbox is not None:
                self.inbox.close()
            self.outbox.close()

    def cancel(self) -> None:
        """Cancel the node's work (a stop's drain timeout ran out): the nodes after it
        see its output end."""
        self._scope.cancel()

    async def run(self) -> None:
        """Process the inbox until end of input (the streams are closed by the caller)."""
        raise NotImplementedError

    async def next_input(self, deadline: float = math.inf) -> Token | str | None:
        """The next token, ``None`` at end of input, or :data:`WAKE` once the run's clock
        reaches ``deadline`` or :meth:`wake` is called, whichever comes first.

        Cancelling a wait for a memory stream item never loses the item (anyio does
        not hand an item to a receiver whose cancellation is pending).
        """
        assert self.inbox is not None
        try:
            token = self.inbox.receive_nowait()
        except EndOfStream:
            return None
        if token is not None:
            return token
        if self._woken:  # a wake-up came while the node was busy elsewhere
            self._woken = False
            return WAKE
        with self.run_ctx.clock.deadline_scope(deadline) as scope:
            self._waiting = scope
            try:
                return await self.inbox.receive()
            finally:
                self._waiting = None
        return WAKE

    def wake(self) -> None:
        """End the current :meth:`next_input` wait now (from another task), or the next
        one at once if the node is busy elsewhere."""
        if self._waiting is not None:
            self._waiting.cancel()
        else:
            self._woken = True

    # -- moving tokens on ----------------------------------------------------------------

    async def deliver(self, token: Token, route: Route) -> None:
        """Send ``token`` along ``route`` (a discarding route ends it ``discarded``)."""
        if route.target is None:
            self.run_ctx.record_outcome(
                token,
                Outcome.DISCARDED,
                self.node_id,
                context={"node": self.node_id, "route": route.label},
            )
            return
        token.arrival = route.arrival
        token.inlet = route.inlet
        if route.to_sink:
            self.run_ctx.token_to_sink(token, self.node_id)
            if token.fork is not None:
                # A join waiting for this branch learns now, not once the sink has written.
                assert token.branch is not None
                token.fork.leave(token.branch, lost=True)
                token.fork = None
        try:
            await self.outbox.send(route.target, token)
        except anyio.BrokenResourceError:
            if not self.run_ctx.stop_requested.is_set():
                raise
            # The node it goes to was cancelled by the stop: the token stays where its
            # records leave it, and a resume sends it on.

    async def fail_row(
        self,
        token: Token,
        error: dict[str, Any],
        state_id: str,
        context: dict[str, Any] | None = None,
    ) -> None:
        """Route ``token`` by the node's ``on_error``, or end it ``failed``.

        ``context`` adds to what the ``failed`` outcome records (node and error).
        """
        error = self.recorder.scrub(error)  # it goes into the row as well as the record
        route = self.spec.error_route
        if route is None or route.target is None:
            self.run_ctx.record_outcome(
                token,
                Outcome.FAILED,
                self.node_id,
                context={"node": self.node_id, "error": error, **(context or {})},
            )
            return
        row = {**token.row, "_error": error["message"], "_error_node": self.node_id}
        await self.divert(token, route, error, state_id, row)

    async def divert(
        self, token: Token, route: Route, error: dict[str, Any], state_id: str, row: Row
    ) -> None:
        """Send a failed ``token`` down an error route, carrying ``row`` (which names the
        error); the decision is recorded as a routing event of the failed state."""
        assert route.edge_id is not None, "an error route always leads to a sink"
        self.set_row(token, row)
        # The row sent is on record with the decision, so a resume can send it again.
        self.recorder.routing_event(
            state_id=state_id,
            edge_id=route.edge_id,
            route_label=route.label,
            reason={"error": error, "row_hash": token.row_hash},
        )
        token.error = error
        await self.deliver(token, route)

    def set_row(self, token: Token, row: Row) -> None:
        """Give ``token`` a new row, storing it unless it is the row it already has."""
        if row is not token.row:
            token.row_hash = self.recorder.store(row)
            token.row = row

    def record_state(
        self,
        token: Token,
        state_id: str,
        started_at: float,
        completed_at: float,
        *,
        output_hash: str | None,
        error: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
    ) -> None:
        """Record the token's visit here as completed (or failed when ``error`` is set)."""
        self.recorder.node_state(
            state_id=state_id,
            token_id=token.token_id,
            node_id=self.node_id,
            status=NodeStateStatus.FAILED if error else NodeStateStatus.COMPLETED,
            input_hash=token.row_hash,
            output_hash=output_hash,
            started_at=started_at,
            completed_at=completed_at,
            step_index=token.step,
            attempt=token.attempt,
            error=error,
            context=context,
        )
        token.step += 1
        token.attempt = 1

    def record_cancelled(self, token: Token, state_id: str, started_at: float) -> None:
        """Record that the run was cancelled while the token was being processed here
        (or that its plugin raised :class:`~plugins.StopRun`).

        The token is left where it was (no outcome, same step): a resume re-does the work
        as a new attempt.
        """
        self.recorder.node_state(
            state_id=state_id,
            token_id=token.token_id,
            node_id=self.node_id,
            status=NodeStateStatus.CANCELLED,
            input_hash=token.row_hash,
            output_hash=None,
            started_at=started_at,
            completed_at=time.time(),
            step_index=token.step,
            attempt=token.attempt,
        )
