"""Test helpers for plugin authors: run a plugin the way the engine does and check its promises.

:func:`check_transform` and :func:`check_sink` drive a plugin through its whole
lifecycle (``async with``) and fail with an :class:`AssertionError` whose message says
which promise of :mod:`plugins.protocols` was broken.  They work in any test runner; the
messages are written out, so they do not rely on pytest's assertion rewriting.
"""

from __future__ import annotations

import copy
import hashlib
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from plugins.protocols import (
    Artifact,
    Determinism,
    Discard,
    RowContext,
    SinkRejection,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from plugins.protocols import Row, Sink, SinkItem, Transform, TransformResult

__all__ = ["check_sink", "check_transform", "row_context"]


def row_context(node_name: str, row_index: int) -> RowContext:
    """A fresh :class:`RowContext` for row ``row_index`` at ``node_name``."""
    return RowContext(
        run_id="check-run",
        node_name=node_name,
        token_id=f"check-token-{row_index}",
        row_index=row_index,
        state_id=f"check-state-{row_index}",
    )


def _same(left: Any, right: Any) -> bool:
    """Equal, or equal in ``repr`` (so NaN values compare as unchanged)."""
    return bool(left == right) or repr(left) == repr(right)


async def check_transform(transform: Transform, rows: Sequence[Row]) -> list[TransformResult]:
    """Run ``transform`` on ``rows`` inside ``async with`` and return its results, in order.

    Asserts, for every row: the input row is not mutated; the result is a dict with
    string keys or a :class:`Discard` with a non-empty reason; a deterministic transform
    gives an equal result when the row is processed a second time.
    """
    results: list[TransformResult] = []
    async with transform:
        for index, row in enumerate(rows):
            result = await _process_checked(transform, row, index)
            if transform.determinism == Determinism.DETERMINISTIC:
                again = await _process_checked(transform, row, index)
                assert _same(again, result), (
                    f"row {index}: deterministic {transform.name!r} gave {again!r} "
                    f"the second time, {result!r} the first"
                )
            results.append(result)
    return results


async def _process_checked(transform: Transform, row: Row, index: int) -> TransformResult:
    before = copy.deepcopy(row)
    result = await transform.process(row, row_context(transform.setup.node_name, index))
    assert _same(row, before), (
        f"row {index}: {transform.name!r} mutated its input row: {before!r} became {row!r}"
    )
    _check_result(transform, result, index)
    return result


def _check_result(transform: Transform, result: object, index: int) -> None:
    if isinstance(result, Discard):
        assert isinstance(result.reason, str), (
            f"row {index}: {transform.name!r} discarded with a non-string reason: {result!r}"
        )
        assert result.reason, (
            f"row {index}: {transform.name!r} discarded without a reason: {result!r}"
        )
        return
    assert isinstance(result, dict), (
        f"row {index}: {transform.name!r} returned a {type(result).__name__}, "
        "not a dict or a Discard"
    )
    bad_keys = [key for key in result if not isinstance(key, str)]
    assert not bad_keys, f"row {index}: {transform.name!r} returned non-string keys {bad_keys!r}"


async def check_sink(sink: Sink, items: Sequence[SinkItem]) -> Artifact | None:
    """Write ``items`` with ``sink`` in two batches inside ``async with``; return its artifact.

    Asserts: every rejection is a :class:`SinkRejection` of an item written, no item is
    rejected twice, and the artifact counts the rows not rejected.  For a file artifact
    (a ``file:`` URI) the size and SHA-256 must match the file's bytes on disk.
    """
    half = len(items) // 2
    async with sink:
        rejections = [*await sink.write(items[:half]), *await sink.write(items[half:])]
        artifact = sink.artifact()
    _check_rejections(sink, items, rejections)
    if artifact is not None:
        _check_artifact(sink, artifact, len(items) - len(rejections))
    return artifact


def _check_rejections(
    sink: Sink, items: Sequence[SinkItem], rejections: Sequence[SinkRejection]
) -> None:
    tokens = {item.token_id for item in items}
    for rejection in rejections:
        assert isinstance(rejection, SinkRejection), (
            f"{sink.name!r} returned {rejection!r}, not a SinkRejection"
        )
        assert rejection.token_id in tokens, (
            f"{sink.name!r} rejected token {rejection.token_id!r}, which it was not given"
        )
        assert rejection.error, f"{sink.name!r} rejected {rejection.token_id!r} without a reason"
    twice = [token for token, count in Counter(r.token_id for r in rejections).items() if count > 1]
    assert not twice, f"{sink.name!r} rejected tokens {twice!r} more than once"


def _check_artifact(sink: Sink, artifact: Artifact, expected_rows: int) -> None:
    assert artifact.rows_written == expected_rows, (
        f"{sink.name!r} artifact says {artifact.rows_written} rows written, "
        f"expected {expected_rows} (items minus rejections)"
    )
    assert len(artifact.content_hash) == 64, (
        f"{sink.name!r} artifact hash {artifact.content_hash!r} is not a SHA-256 hex digest"
    )
    parsed = urlparse(artifact.uri)
    if parsed.scheme != "file":
        return
    data = Path(url2pathname(parsed.path)).read_bytes()
    assert artifact.size_bytes == len(data), (
        f"{sink.name!r} artifact size {artifact.size_bytes} != {len(data)} bytes on disk"
    )
    digest = hashlib.sha256(data).hexdigest()
    assert artifact.content_hash == digest, (
        f"{sink.name!r} artifact hash {artifact.content_hash} != sha256 of the file {digest}"
    )
