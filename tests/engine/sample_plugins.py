"""Custom plugins used by the engine tests (loaded by import path, like a user's own)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, ClassVar

import anyio

from plugins import Row, RowContext, Sink, SinkItem, SinkRejection, Transform


class SlowTag(Transform):
    """Adds ``tag`` after a random (seeded per row) latency; fails rows whose ``fail`` is true."""

    name: ClassVar[str] = ""

    async def process(self, row: Row, ctx: RowContext) -> Row:
        delay = random.Random(ctx.row_index).random() * float(self.options.get("max_delay", 0.01))
        await anyio.sleep(delay)
        if row.get("fail"):
            raise ValueError(f"row {row.get('id')} asked to fail")
        return {**row, "tag": f"t{row.get('id')}"}


class Divide(Transform):
    """``ratio = a / b`` — fails with ZeroDivisionError when b is 0."""

    async def process(self, row: Row, ctx: RowContext) -> Row:
        return {**row, "ratio": row["a"] / row["b"]}


class Login(Transform):
    """Fails every row with an error that quotes its ``password`` option and a URL with
    it (as a careless plugin or driver might)."""

    async def process(self, row: Row, ctx: RowContext) -> Row:
        password = self.options["password"]
        raise PermissionError(f"login refused for {password!r} at https://bot:{password}@api/")


class BrokenSink(Sink):
    """A sink whose writes always fail (the disk is gone)."""

    async def write(self, items: Sequence[SinkItem]) -> Sequence[SinkRejection]:
        raise OSError("disk unplugged")


class CollectingSink(Sink):
    """Keeps what it is given in memory (for assertions)."""

    def __init__(self, options: Any, setup: Any) -> None:
        super().__init__(options, setup)
        self.items: list[SinkItem] = []

    async def write(self, items: Sequence[SinkItem]) -> Sequence[SinkRejection]:
        self.items.extend(items)
        return []
