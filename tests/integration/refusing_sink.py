"""A JSONL sink whose 'disk' refuses the write of one row, every time it is in a write."""

from __future__ import annotations

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
