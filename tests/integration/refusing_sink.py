"""A JSONL sink whose 'disk' refuses the write of one row, every time it is in a write."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import ClassVar

from pydantic import BaseModel

from plugins import SinkItem, SinkRejection, SinkWriteError
from plugins._sinks import JsonlSink, JsonlSinkOptions


class RefusingSinkOptions(JsonlSinkOptions):
    refuse: int


class RefusingSink(JsonlSink):
    """Refuses (leaving nothing behind) any write holding the row whose ``i`` is ``refuse``."""

    name: ClassVar[str] = "refusing"
    Options: ClassVar[type[BaseModel] | None] = RefusingSinkOptions
    options: RefusingSinkOptions

    async def write(self, items: Sequence[SinkItem]) -> Sequence[SinkRejection]:
        if any(item.row.get("i") == self.options.refuse for item in items):
            raise SinkWriteError("the write was refused: Input/output error")
        return await super().write(items)


class BrokenSinkOptions(JsonlSinkOptions):
    broken_while: str


class BrokenSink(JsonlSink):
    """A JSONL sink whose every write fails outright (its state unknown, so the run
    fails) while the file ``broken_while`` exists."""

    name: ClassVar[str] = "broken"
    Options: ClassVar[type[BaseModel] | None] = BrokenSinkOptions
    options: BrokenSinkOptions

    async def write(self, items: Sequence[SinkItem]) -> Sequence[SinkRejection]:
        if os.path.exists(self.options.broken_while):  # noqa: ASYNC240 (a test double)
            raise RuntimeError("the device is gone")
        return await super().write(items)
