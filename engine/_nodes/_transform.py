"""The transform node: one row in, one row out (or discarded, or the row's error)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from landscape import CanonicalizationError, Outcome
from plugins import Discard, RowContext, Transform

from .._reorder import ReleaseWindow
from ._base import NodeTask, error_info

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream

    from .._config import TransformSettings
    from .._tokens import Token

__all__ = ["TransformNode"]


@dataclass(slots=True)
class _Processed:
    """What happened to one token here, waiting for its turn to be passed on."""

    token: Token
    state_id: str
    discard_reason: str | None = None
    error: dict[str, Any] | None = None


class TransformNode(NodeTask):
    """Runs its plugin on each token and sends results to ``on_success``.

    With ``concurrency: 1`` rows are processed one after another.  With more, a feeder
    admits each arriving token into a :class:`ReleaseWindow` of ``max_pending`` slots,
    ``concurrency`` workers process them, and an emitter passes results on in arrival
    order (completion order with ``ordered: false``).  A row whose processing raises is
    that row's error (``on_error`` or ``failed``); a :class:`Discard` ends it
    ``discarded`` with the reason.  At end of input the workers finish what they hold,
    the window drains and the outbox closes.  Cancellation stops all of it.
    """

    async def run(self) -> None:
        settings: TransformSettings = self.spec.settings  # type: ignore[assignment]
        if settings.concurrency == 1:
            await self._run_serial()
        else:
            await self._run_concurrent(settings.concurrency, settings.window, settings.ordered)

    async def _run_serial(self) -> None:
        assert self.inbox is not None
        while (token := await self.inbox.receive()) is not None:
            self.stats.received += 1
            await self.pass_on(await self.process(token))

    async def _run_concurrent(self, concurrency: int, max_pending: int, ordered: bool) -> None:
        window: ReleaseWindow[_Processed] = ReleaseWindow(max_pending, ordered=ordered)
        send, receive = anyio.create_memory_object_stream[tuple[int, "Token"]](0)
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(self._work, receive.clone(), window)
            receive.close()
            tg.start_soon(self._emit, window)
            async with send:
                assert self.inbox is not None
                while (token := await self.inbox.receive()) is not None:
                    self.stats.received += 1
                    seq = await window.admit()
                    await send.send((seq, token))
            window.close()

    async def _work(
        self, jobs: MemoryObjectReceiveStream[tuple[int, Token]], window: ReleaseWindow[_Processed]
    ) -> None:
        async with jobs:
            async for seq, token in jobs:
                self.stats.in_flight += 1
                try:
                    processed = await self.process(token)
                finally:
                    self.stats.in_flight -= 1
                window.complete(seq, processed)

    async def _emit(self, window: ReleaseWindow[_Processed]) -> None:
        while (processed := await window.release()) is not None:
            await self.pass_on(processed)
            window.free()

    async def process(self, token: Token) -> _Processed:
        """Run the plugin on ``token``'s row and record the node state."""
        state_id = self.recorder.new_id("s")
        started = time.time()
        plugin: Transform = self.spec.plugin  # type: ignore[assignment]
        run = self.run_ctx
        ctx = RowContext(
            run.run_id,
            self.node_id,
            token.token_id,
            token.row_index,
            state_id,
            run.calls_for(state_id),
        )
        try:
            result = await plugin.process(token.row, ctx)
        except Exception as exc:
            return self._failed(token, state_id, started, error_info(exc))
        if isinstance(result, Discard):
            self.record_state(
                token,
                state_id,
                started,
                time.time(),
                output_hash=None,
                context={"discarded": result.reason},
            )
            return _Processed(token, state_id, discard_reason=result.reason)
        if not isinstance(result, dict):
            error = {
                "type": "TypeError",
                "message": f"transform returned {type(result).__name__}, not a row",
            }
            return self._failed(token, state_id, started, error)
        return self._succeeded(token, state_id, started, result)

    def _succeeded(
        self, token: Token, state_id: str, started: float, row: dict[str, Any]
    ) -> _Processed:
        if row is token.row:
            output_hash = token.row_hash
        else:
            try:
                output_hash = self.recorder.store(row)
            except CanonicalizationError as exc:
                return self._failed(token, state_id, started, error_info(exc))
        self.record_state(token, state_id, started, time.time(), output_hash=output_hash)
        token.row = row
        token.row_hash = output_hash
        return _Processed(token, state_id)

    def _failed(
        self, token: Token, state_id: str, started: float, error: dict[str, Any]
    ) -> _Processed:
        self.record_state(token, state_id, started, time.time(), output_hash=None, error=error)
        return _Processed(token, state_id, error=error)

    async def pass_on(self, processed: _Processed) -> None:
        """Send a processed token on, in the order the node releases them."""
        token = processed.token
        if processed.error is not None:
            await self.fail_row(token, processed.error, processed.state_id)
        elif processed.discard_reason is not None:
            self.run_ctx.record_outcome(
                token,
                Outcome.DISCARDED,
                self.node_id,
                context={"node": self.node_id, "reason": processed.discard_reason},
            )
        else:
            await self.deliver(token, self.spec.routes["success"])
