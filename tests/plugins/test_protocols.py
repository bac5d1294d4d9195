"""The per-row value objects plugins are handed: frozen, with hand-written constructors."""

from __future__ import annotations

import dataclasses

import pytest

from plugins import CallList, RowContext, SinkItem, SourceRecord


def test_row_context_is_frozen_and_gets_its_own_call_list() -> None:
    first = RowContext("run", "node", "token", 3, "state")
    second = RowContext("run", "node", "token", 3, "state")
    assert first.calls is not second.calls
    assert first == second  # both with an empty list of calls
    first.calls.record(object())  # type: ignore[arg-type]
    assert first != second
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.state_id = "other"  # type: ignore[misc]


def test_row_context_keeps_the_call_log_it_is_given() -> None:
    calls = CallList()
    ctx = RowContext(
        run_id="run", node_name="node", token_id="t", row_index=0, state_id="s", calls=calls
    )
    assert ctx.calls is calls
    moved = dataclasses.replace(ctx, state_id="s2")
    assert (moved.state_id, moved.calls, moved.row_index) == ("s2", calls, 0)


def test_source_record_and_sink_item_are_frozen_with_their_defaults() -> None:
    record = SourceRecord(None, "a,b", error="bad line")
    assert dataclasses.astuple(record) == (None, "a,b", "bad line", None)
    assert SourceRecord({"a": 1}, {"a": 1}) == SourceRecord(row={"a": 1}, raw={"a": 1})
    item = SinkItem("t1", 7, {"a": 1})
    assert dataclasses.astuple(item) == ("t1", 7, {"a": 1})
    assert hash(SinkItem("t1", 7, "row")) == hash(SinkItem("t1", 7, "row"))
    for frozen, name in ((record, "error"), (item, "row")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(frozen, name, None)
