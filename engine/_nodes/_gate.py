"""The gate node: routes each row by a condition, or forks it into branches."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from landscape import Outcome
from plugins.expressions import ExpressionEvaluationError

from .._forks import ForkInstance
from .._tokens import Token, derived_token_id
from ._base import NodeTask

if TYPE_CHECKING:
    from .._graph import Route

__all__ = ["GateNode"]


def route_label(value: Any) -> str:
    """The route a condition value selects: ``true``/``false`` for booleans, else ``str``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class GateNode(NodeTask):
    """Evaluates its condition per row and sends the row down the matching route.

    The decision (condition, value, route) is recorded in the node state and as a
    routing event.  A row whose condition fails to evaluate, or whose value matches no
    route, is that row's error (``on_error`` or ``failed``).  A fork gate sends a child
    token down every branch (parents recorded) and ends the parent ``forked``.  At end
    of input the outbox closes.
    """

    async def run(self) -> None:
        assert self.inbox is not None
        handle = self._fork if self.spec.condition is None else self._route
        while (token := await self.inbox.receive()) is not None:
            self.stats.received += 1
            await handle(token)

    async def _route(self, token: Token) -> None:
        assert self.spec.condition is not None
        state_id = self.recorder.new_id("s")
        started = time.time()
        condition = self.spec.condition.source
        try:
            value = self.spec.condition.evaluate({"row": token.row})
        except ExpressionEvaluationError as exc:
            error = {
                "type": "ExpressionEvaluationError",
                "message": str(exc),
                "condition": condition,
            }
            self.record_state(token, state_id, started, time.time(), output_hash=None, error=error)
            await self.fail_row(token, error, state_id)
            return
        label = route_label(value)
        route = self.spec.routes.get(label)
        decision = {"condition": condition, "value": value, "route": label}
        if route is None:
            error = {"type": "RoutingError", "message": f"no route for value {label!r}", **decision}
            self.record_state(token, state_id, started, time.time(), output_hash=None, error=error)
            await self.fail_row(token, error, state_id)
            return
        self.record_state(
            token, state_id, started, time.time(), output_hash=token.row_hash, context=decision
        )
        self._record_route(state_id, route, decision)
        await self.deliver(token, route)

    async def _fork(self, parent: Token) -> None:
        state_id = self.recorder.new_id("s")
        started = time.time()
        branches = list(self.spec.routes.values())
        fork = ForkInstance.open(
            parent.token_id,
            self.node_id,
            [route.label for route in branches],
            join=self.run_ctx.joins.get(self.node_id),
            parent=parent.fork,
            parent_branch=parent.branch,
        )
        children = [self._child(parent, route.label, fork) for route in branches]
        self.record_state(
            parent,
            state_id,
            started,
            time.time(),
            output_hash=parent.row_hash,
            context={"fork_to": [route.label for route in branches]},
        )
        for route in branches:
            self._record_route(state_id, route, {"fork": route.label})
        self.run_ctx.record_outcome(
            parent,
            Outcome.FORKED,
            self.node_id,
            context={"node": self.node_id, "children": [child.token_id for child in children]},
        )
        for child, route in zip(children, branches, strict=True):
            await self.deliver(child, route)

    def _child(self, parent: Token, branch: str, fork: ForkInstance | None) -> Token:
        child = Token(
            derived_token_id("fork", parent.token_id, branch),
            parent.row_id,
            parent.row_index,
            parent.row,
            parent.row_hash,
            branch=branch,
            step=parent.step,
            fork=fork,
        )
        self.recorder.token(
            token_id=child.token_id,
            row_id=child.row_id,
            branch_name=branch,
            parents=(parent.token_id,),
        )
        self.run_ctx.token_made(child)
        return child

    def _record_route(self, state_id: str, route: Route, reason: dict[str, Any]) -> None:
        # A discarding route has no edge: the decision stays in the node state's context
        # and the token's `discarded` outcome names the route.
        if route.edge_id is not None:
            self.recorder.routing_event(
                state_id=state_id, edge_id=route.edge_id, route_label=route.label, reason=reason
            )
