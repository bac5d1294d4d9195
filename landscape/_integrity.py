"""What ``verify`` checks of the content a run left, beyond the structure of its trail.

* **Sink files.**  Each file sink's last artifact records the size and SHA-256 of the
  file as the run left it; the file on disk must still be exactly that.  A file edited
  since, cut, or overwritten by a later run is reported (a run still executing, or one
  that crashed, has no final artifact yet and is not compared).
* **Payloads** (``verify --deep``).  Every payload the run names is hashed again — the
  SHA-256 of the RFC 8785 canonical JSON of its stored content — and must match the
  hash it is stored under.  An edit in the database cannot keep its hash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import anyio.to_thread
from sqlalchemy import not_, select, union

from . import _schema as t
from ._canonical import CanonicalizationError, canonical_bytes

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy import ColumnElement, Table
    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["PAYLOAD_REFS", "PayloadAudit", "PayloadRef", "altered_payloads", "altered_sink_files"]

_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class PayloadRef:
    """``column`` of ``table`` holds a payload hash; rows where ``skip`` holds need no probe."""

    table: Table
    column: str
    skip: Callable[[], ColumnElement[bool]] | None = None


def _same_as_source_ref() -> ColumnElement[bool]:
    return t.rows.c.source_data_hash == t.rows.c.source_data_ref


#: Every column of a run's records that names a payload.
PAYLOAD_REFS = (
    PayloadRef(t.rows, "source_data_ref"),
    PayloadRef(t.rows, "source_data_hash", _same_as_source_ref),
    PayloadRef(t.node_states, "input_hash"),
    PayloadRef(t.node_states, "output_hash"),
    PayloadRef(t.calls, "request_ref"),
    PayloadRef(t.calls, "response_ref"),
    PayloadRef(t.validation_errors, "row_data_ref"),
)


# -- sink files ---------------------------------------------------------------------------


async def altered_sink_files(conn: AsyncConnection, run_id: str) -> list[str]:
    """One message per file sink whose file is not what the run's last artifact of it
    records (missing, another size, other bytes)."""
    a = t.artifacts
    query = (
        select(a.c.sink_node_id, a.c.uri, a.c.size_bytes, a.c.content_hash)
        .where(a.c.run_id == run_id)
        .order_by(a.c.created_at, a.c.artifact_id)
    )
    latest = {sink: (uri, size, digest) for sink, uri, size, digest in await conn.execute(query)}
    problems = []
    for sink, (uri, size, digest) in sorted(latest.items()):
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            continue  # not a file (the database sink): nothing on disk to compare
        path = Path(unquote(parsed.path))
        problem = await anyio.to_thread.run_sync(_compare_file, path, int(size), str(digest))
        if problem is not None:
            problems.append(f"sink {sink!r}: {problem}")
    return problems


def _compare_file(path: Path, size: int, digest: str) -> str | None:
    try:
        with path.open("rb") as file:
            actual = hashlib.sha256()
            length = 0
            while chunk := file.read(_CHUNK):
                actual.update(chunk)
                length += len(chunk)
    except FileNotFoundError:
        return f"its file {path} is missing"
    except OSError as exc:
        return f"its file {path} cannot be read: {exc.strerror or exc}"
    if length != size:
        return (
            f"{path} has {length} bytes where the run recorded {size}: it was changed after "
            "the run wrote it (edited, cut, or overwritten by a later run)"
        )
    if actual.hexdigest() != digest:
        return (
            f"{path} differs from what the run wrote (SHA-256 {actual.hexdigest()}, "
            f"recorded {digest}): it was edited after the run wrote it"
        )
    return None


# -- payloads -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PayloadAudit:
    """What re-hashing a run's payloads found."""

    #: One message per altered payload (at most the limit asked for).
    problems: list[str]
    altered: int
    checked: int


async def altered_payloads(conn: AsyncConnection, run_id: str, limit: int) -> PayloadAudit:
    """Hash every payload ``run_id`` names again; each one whose content no longer
    hashes to the hash it is stored under is a problem (the first ``limit`` described)."""
    referenced = []
    for ref in PAYLOAD_REFS:
        column = ref.table.c[ref.column]
        hashes = select(column.label("hash")).where(
            ref.table.c.run_id == run_id, column.is_not(None)
        )
        if ref.skip is not None:
            hashes = hashes.where(not_(ref.skip()))
        referenced.append(hashes)
    names = union(*referenced).subquery()
    p = t.payloads
    query = select(p.c.hash, p.c.content).join(names, names.c.hash == p.c.hash)
    problems: list[str] = []
    altered = checked = 0
    result = await conn.stream(query.execution_options(yield_per=1000))
    async for stored_hash, content in result:
        checked += 1
        problem = _rehash(str(stored_hash), str(content))
        if problem is not None:
            altered += 1
            if len(problems) < limit:
                problems.append(problem)
    return PayloadAudit(problems, altered, checked)


def _rehash(stored_hash: str, content: str) -> str | None:
    try:
        value: Any = json.loads(content)
        actual = hashlib.sha256(canonical_bytes(value)).hexdigest()
        if actual != stored_hash:  # a Decimal is stored with digits a double cannot hold
            exact = json.loads(content, parse_float=Decimal)
            actual = hashlib.sha256(canonical_bytes(exact)).hexdigest()
    except (ValueError, CanonicalizationError) as exc:
        return f"payload {stored_hash}: its content is no longer canonical JSON ({exc})"
    if actual != stored_hash:
        return (
            f"payload {stored_hash}: its content hashes to {actual}: it was edited after "
            "it was recorded"
        )
    return None
