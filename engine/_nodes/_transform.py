"""The transform node: one row in, one row out (or discarded, or the row's error)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from landscape import CanonicalizationError, Outcome
from plugins import Discard, RowContext, StopRun, Transform, TransformResult

from .._calls import SharedCalls
from .._jobs import Jobs
from .._reorder import ReleaseWindow
from .._tokens import Token
from ._base import WAKE, NodeTask, error_info

if TYPE_CHECKING:
    from .._config import TransformSettings

__all__ = ["TransformNode"]


@dataclass(slots=True)
class _Processed:
    """What happened to one token here, waiting for its turn to be passed on."""

    token: Token
    state_id: str
    discard_reason: str | None = None
    error: dict[str, Any] | None = None
    #: The plugin raised :class:`~plugins.StopRun`: the token stays for a resume.
    left: bool = False


class TransformNode(NodeTask):
    """Runs its plugin on each token and sends results to ``on_success``.

    With ``concurrency: 1`` rows are processed one after another.  With more, a feeder
    admits each arriving token into a :class:`ReleaseWindow` of ``max_pending`` slots,
    ``concurrency`` workers process them, and an emitter passes results on in arrival
    order (completion order with ``ordered: false``).  A row whose processing raises is
    that row's error (``on_error`` or ``failed``); a :class:`Discard` ends it
    ``discarded`` with the reason; a :class:`~plugins.StopRun` stops the run and leaves
    the row unfinished (its state ``cancelled``), as a forced stop does, for a resume.
    With ``batch_size > 1`` the feeder groups admitted tokens into batches (a partial
    one leaves after ``batch_wait_ms``) that a worker hands to the plugin's
    ``process_batch`` at once; each row still gets its own state and its own slot in
    the window, so the release order is unchanged.  At end of input
    the workers finish what they hold, the window drains and the outbox closes.
    Cancellation stops all of it.
    """

    async def run(self) -> None:
        settings: TransformSettings = self.spec.settings  # type: ignore[assignment]
        if settings.concurrency == 1 and settings.batch_size == 1:
            await self._run_serial()
        else:
            await self._run_concurrent(settings)

    async def _run_serial(self) -> None:
        assert self.inbox is not None
        while (token := await self.inbox.receive()) is not None:
            self.stats.received += 1
            await self.pass_on(await self.process(token))

    async def _run_concurrent(self, settings: TransformSettings) -> None:
        window: ReleaseWindow[_Processed] = ReleaseWindow(settings.window, ordered=settings.ordered)
        jobs: Jobs[list[tuple[int, Token]]] = Jobs()
        async with anyio.create_task_group() as tg:
            for _ in range(settings.concurrency):
                tg.start_soon(self._work, jobs, window, settings.batch_size > 1)
            tg.start_soon(self._emit, window)
            try:
                if settings.batch_size == 1:
                    await self._feed(jobs, window)
                else:
                    await self._feed_batches(jobs, window, settings)
            finally:
                jobs.close()
            window.close()

    async def _feed(
        self,
        jobs: Jobs[list[tuple[int, Token]]],
        window: ReleaseWindow[_Processed],
    ) -> None:
        assert self.inbox is not None
        while (token := await self.inbox.receive()) is not None:
            self.stats.received += 1
            seq = await window.admit()
            if not self._settled(seq, token, window):
                jobs.put([(seq, token)])

    async def _feed_batches(
        self,
        jobs: Jobs[list[tuple[int, Token]]],
        window: ReleaseWindow[_Processed],
        settings: TransformSettings,
    ) -> None:
        """Group arriving tokens into batches of ``batch_size``; a partial batch goes
        when ``batch_wait_ms`` passed since its first token, or before the feeder would
        wait for room in the window (which only a sent batch can make)."""
        wait = settings.batch_wait_ms / 1000.0
        batch: list[tuple[int, Token]] = []
        deadline = math.inf
        while True:
            token = await self.next_input(deadline)
            if token is None:
                break
            if token is not WAKE:
                assert isinstance(token, Token)
                self.stats.received += 1
                if batch and not window.has_room():
                    jobs.put(batch)
                    batch, deadline = [], math.inf
                seq = await window.admit()
                if self._settled(seq, token, window):
                    continue
                batch.append((seq, token))
                if len(batch) == 1:
                    deadline = self.run_ctx.clock.now() + wait
                if len(batch) < settings.batch_size:
                    continue
            if batch:
                jobs.put(batch)
            batch, deadline = [], math.inf
        if batch:
            jobs.put(batch)

    def _settled(self, seq: int, token: Token, window: ReleaseWindow[_Processed]) -> bool:
        """Complete ``seq`` at once if a resume found this node's work on ``token`` on
        record (it is released in its turn, as recorded)."""
        if token.settled_at != self.node_id:
            return False
        token.settled_at = None
        window.complete(seq, _Processed(token, ""))
        return True

    async def _work(
        self,
        jobs: Jobs[list[tuple[int, Token]]],
        window: ReleaseWindow[_Processed],
        batched: bool,
    ) -> None:
        while (job := await jobs.get()) is not None:
            self.stats.in_flight += len(job)
            try:
                if batched:
                    results = await self.process_batch([token for _, token in job])
                else:
                    results = [await self.process(job[0][1])]
            finally:
                self.stats.in_flight -= len(job)
            for (seq, _), processed in zip(job, results, strict=True):
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
        ctx = self._context(token, state_id)
        try:
            result: TransformResult | Exception = await plugin.process(token.row, ctx)
        except anyio.get_cancelled_exc_class():
            self.record_cancelled(token, state_id, started)
            raise
        except Exception as exc:
            result = exc
        return self._settle(token, state_id, started, result)

    async def process_batch(self, tokens: list[Token]) -> list[_Processed]:
        """Run the plugin on several rows at once; each row's state and result are its own."""
        state_ids = [self.recorder.new_id("s") for _ in tokens]
        started = time.time()
        plugin: Transform = self.spec.plugin  # type: ignore[assignment]
        contexts = [self._context(t, s) for t, s in zip(tokens, state_ids, strict=True)]
        shared = SharedCalls(
            self.run_ctx,
            [(s, t.token_id, self.node_id) for t, s in zip(tokens, state_ids, strict=True)],
        )
        try:
            results = await plugin.process_batch([t.row for t in tokens], contexts, shared)
        except anyio.get_cancelled_exc_class():
            for token, state_id in zip(tokens, state_ids, strict=True):
                self.record_cancelled(token, state_id, started)
            raise
        except Exception as exc:
            results = [exc] * len(tokens)
        if len(results) != len(tokens):
            wrong = TypeError(
                f"process_batch returned {len(results)} results for {len(tokens)} rows"
            )
            results = [wrong] * len(tokens)
        return [
            self._settle(token, state_id, started, result)
            for token, state_id, result in zip(tokens, state_ids, results, strict=True)
        ]

    def _context(self, token: Token, state_id: str) -> RowContext:
        run = self.run_ctx
        return RowContext(
            run.run_id,
            self.node_id,
            token.token_id,
            token.row_index,
            state_id,
            run.calls_for(state_id, token.token_id, self.node_id),
        )

    def _settle(
        self, token: Token, state_id: str, started: float, result: TransformResult | Exception
    ) -> _Processed:
        """Record what the plugin made of ``token``'s row: a new row, a discard, an error
        or nothing (it asked the run to stop)."""
        if isinstance(result, StopRun):
            self.run_ctx.request_stop(result.reason)
            self.record_cancelled(token, state_id, started)
            return _Processed(token, state_id, left=True)
        if isinstance(result, Exception):
            return self._failed(token, state_id, started, error_info(result))
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
        if processed.left:
            return  # it stays where its records leave it: a resume sends it on
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
