"""Run ownership: one process executes a run at a time, and only that process writes it.

A run's owner holds a **lease** in ``run_leases``: who it is (an owner id, host, pid and
an identity of its process), when it took the run, and a heartbeat.  ``run`` records a
new lease with the run; ``resume`` takes the lease over only from an owner that is no
longer alive — it released the run, its heartbeat is older than the lease's length, or
it is a process of this machine that has ended — with a compare-and-set on the owner it
saw, so of two resumes racing one wins and the other is refused, naming the owner.

Every group commit of the owner begins with the **fence**: an update of its lease's
heartbeat that must match exactly one row (the run, still held by this owner id).  A
process that lost its lease therefore commits nothing more — no record, no outcome, no
sink position — and fails with :class:`OwnershipLost`.  Sinks write outside the
database, so the owner also never starts a sink write unless a commit confirmed its
lease recently (see ``GroupCommitWriter.ensure_lease``): well before anyone else could
consider it expired.

Times of the lease (``acquired_at``, ``heartbeat_at``) are the **database's** clock, so
processes on machines whose clocks differ agree on when a lease expires.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from . import _schema as t
from ._errors import AuditIntegrityError, LandscapeError

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement, Dialect
    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = [
    "Fence",
    "LeaseHolder",
    "Owner",
    "OwnershipLost",
    "RunExists",
    "RunOwned",
    "claim_run",
    "db_now",
    "forget_lease",
    "guard_statement",
    "lease_holders",
    "take_over_run",
]

#: Owner ids of the leases this process holds now (a lease naming this process but
#: none of these is left over from an execution that ended without releasing it).
_HELD_HERE: set[str] = set()


class RunOwned(LandscapeError):
    """The run is executed by another live process; ``holder`` says which."""

    def __init__(self, run_id: str, holder: LeaseHolder) -> None:
        self.run_id = run_id
        self.holder = holder
        super().__init__(f"run {run_id} is being executed by {holder.describe()}")


class RunExists(LandscapeError):
    """A new run was to be started under the id of a run on record."""


class OwnershipLost(AuditIntegrityError):
    """This process no longer holds the lease of the run it writes (another process took
    the run over after its heartbeat stopped): it must write nothing more."""


def _read_process_key(pid: int) -> str:
    """What tells process ``pid`` of this machine from every other, also from an
    earlier process with the same pid: the kernel's boot id, the pid namespace and the
    process's start time (Linux).  Raises :class:`ProcessLookupError` when there is no
    such process (or only its zombie), another :class:`OSError` when it cannot tell."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    try:
        namespace = os.readlink(f"/proc/{pid}/ns/pid")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError as exc:
        raise ProcessLookupError(pid) from exc
    # The command name (field 2) may hold spaces and parentheses: split after its end.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # exited, not yet reaped by its parent
        raise ProcessLookupError(pid)
    return f"{boot}/{namespace}/{fields[19]}"  # field 22: start time in clock ticks


def _own_process_key() -> str | None:
    try:
        return _read_process_key(os.getpid())
    except OSError:
        return None  # not Linux: only the heartbeat tells whether an owner is alive


def _machine_of(process_key: str) -> str:
    """The boot and pid namespace part of a process key: where a pid means one process."""
    return process_key.rsplit("/", 1)[0]


@dataclass(frozen=True, slots=True)
class Owner:
    """One execution of a run by this process (a new owner id each time)."""

    owner_id: str
    host: str
    pid: int
    process_key: str | None

    @classmethod
    def here(cls) -> Owner:
        return cls(
            f"w-{secrets.token_hex(8)}", socket.gethostname(), os.getpid(), _own_process_key()
        )


@dataclass(frozen=True, slots=True)
class LeaseHolder:
    """A run's lease as recorded, and the database's time when it was read."""

    run_id: str
    partition_index: int
    owner_id: str
    host: str
    pid: int
    process_key: str | None
    acquired_at: float
    heartbeat_at: float
    lease_seconds: float
    released_at: float | None
    epoch: int
    read_at: float

    @property
    def heartbeat_age(self) -> float:
        return max(0.0, self.read_at - self.heartbeat_at)

    def alive(self) -> bool:
        """Whether the owner may still be executing the run."""
        if self.released_at is not None or self.heartbeat_age > self.lease_seconds:
            return False
        return _process_alive(self) is not False

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.acquired_at))
        return (
            f"pid {self.pid} on {self.host} since {since} (last heartbeat "
            f"{self.heartbeat_age:.1f} s ago)"
        )


def _process_alive(holder: LeaseHolder) -> bool | None:
    """Whether the holder's process is alive, when this machine can tell (``None``: it
    cannot, the process being elsewhere or the platform not saying)."""
    here = _own_process_key()
    if here is None or holder.process_key is None or holder.host != socket.gethostname():
        return None
    if _machine_of(here) != _machine_of(holder.process_key):
        return None  # another boot or another pid namespace: its pids are not ours
    if holder.pid == os.getpid():
        return holder.owner_id in _HELD_HERE
    try:
        return _read_process_key(holder.pid) == holder.process_key
    except ProcessLookupError:
        return False
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class Fence:
    """What every commit of an owner checks: the lease of ``run_id`` (and partition)
    is still held by ``owner_id``."""

    run_id: str
    owner_id: str
    partition_index: int = 0
    #: How long the lease lasts without a heartbeat, and how often the owner beats.
    lease_seconds: float = 10.0
    heartbeat_seconds: float = 2.0

    @property
    def trusted_for(self) -> float:
        """How long after sending a commit that confirmed the lease the owner may act on
        it: two heartbeats short of the lease, so a write started then is done before
        anyone else could take the run."""
        return self.lease_seconds - 2 * self.heartbeat_seconds

    def release_key(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "partition_index": self.partition_index,
            "owner_id": self.owner_id,
        }


def db_now_sql(dialect: Dialect) -> str:
    """SQL for the database's current time, in UNIX epoch seconds."""
    if dialect.name == "postgresql":
        return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"
    if dialect.name == "sqlite":
        return "((julianday('now') - 2440587.5) * 86400.0)"
    raise LandscapeError(f"run leases need SQLite or PostgreSQL, not {dialect.name}")


def _db_now(dialect: Dialect) -> ColumnElement[float]:
    return text(db_now_sql(dialect))  # type: ignore[return-value]


async def db_now(conn: AsyncConnection) -> float:
    """The database's current time (UNIX epoch seconds)."""
    return float((await conn.execute(select(_db_now(conn.dialect)))).scalar_one())


def guard_statement(dialect: Dialect, fence: Fence) -> tuple[str, list[Any]]:
    """The fence of one commit: SQL that beats the lease's heartbeat and must change
    exactly one row, and its parameters."""
    L = t.run_leases
    statement = (
        update(L)
        .where(
            L.c.run_id == fence.run_id,
            L.c.partition_index == fence.partition_index,
            L.c.owner_id == fence.owner_id,
            L.c.released_at.is_(None),
        )
        .values(heartbeat_at=_db_now(dialect))
    )
    compiled = statement.compile(dialect=dialect)
    assert compiled.positiontup is not None
    return str(compiled), [compiled.params[name] for name in compiled.positiontup]


async def lease_holders(
    conn: AsyncConnection, run_ids: list[str] | None = None
) -> dict[str, LeaseHolder]:
    """The lease of each run (of ``run_ids``, or of every run), by run id."""
    L = t.run_leases
    now = await db_now(conn)
    query = select(L).where(L.c.partition_index == 0)
    if run_ids is not None:
        query = query.where(L.c.run_id.in_(run_ids))
    return {
        row.run_id: LeaseHolder(
            run_id=row.run_id,
            partition_index=int(row.partition_index),
            owner_id=row.owner_id,
            host=row.host,
            pid=int(row.pid),
            process_key=row.process_key,
            acquired_at=float(row.acquired_at),
            heartbeat_at=float(row.heartbeat_at),
            lease_seconds=float(row.lease_seconds),
            released_at=None if row.released_at is None else float(row.released_at),
            epoch=int(row.epoch),
            read_at=now,
        )
        for row in await conn.execute(query)
    }


async def claim_run(conn: AsyncConnection, owner: Owner, fence: Fence) -> None:
    """Record ``owner`` as the first owner of the new run ``fence.run_id`` (committed);
    raise :class:`RunExists` when a run of that id is on record."""
    known = await conn.execute(
        select(t.runs.c.run_id)
        .where(t.runs.c.run_id == fence.run_id)
        .union(select(t.run_leases.c.run_id).where(t.run_leases.c.run_id == fence.run_id))
    )
    if known.first() is not None:
        raise RunExists(f"run {fence.run_id} is on record already: choose another id")
    now = _db_now(conn.dialect)
    statement = insert(t.run_leases).values(
        run_id=fence.run_id,
        partition_index=fence.partition_index,
        owner_id=owner.owner_id,
        host=owner.host,
        pid=owner.pid,
        process_key=owner.process_key,
        acquired_at=now,
        heartbeat_at=now,
        lease_seconds=fence.lease_seconds,
        released_at=None,
        epoch=1,
    )
    try:
        await conn.execute(statement)
    except IntegrityError as exc:  # claimed by another process since the check
        raise RunExists(f"run {fence.run_id} is on record already: choose another id") from exc
    await conn.commit()
    _HELD_HERE.add(owner.owner_id)


async def take_over_run(conn: AsyncConnection, owner: Owner, fence: Fence) -> int:
    """Make ``owner`` the owner of ``fence.run_id`` (committed); its epoch (how many
    owners the run has had).  Raises :class:`RunOwned` when the run has a live owner,
    also one that took the run over between the read and the write."""
    run_id = fence.run_id
    holder = (await lease_holders(conn, [run_id])).get(run_id)
    if holder is not None and holder.alive():
        raise RunOwned(run_id, holder)
    L = t.run_leases
    now = _db_now(conn.dialect)
    values = {
        "owner_id": owner.owner_id,
        "host": owner.host,
        "pid": owner.pid,
        "process_key": owner.process_key,
        "acquired_at": now,
        "heartbeat_at": now,
        "lease_seconds": fence.lease_seconds,
        "released_at": None,
    }
    epoch = 1 if holder is None else holder.epoch + 1
    try:
        if holder is None:  # a run recorded before leases were
            await conn.execute(
                insert(L).values(
                    run_id=run_id, partition_index=fence.partition_index, epoch=epoch, **values
                )
            )
            taken = True
        else:  # compare-and-set on the owner and epoch seen: of two racing, one wins
            result = await conn.execute(
                update(L)
                .where(
                    and_(
                        L.c.run_id == run_id,
                        L.c.partition_index == fence.partition_index,
                        L.c.owner_id == holder.owner_id,
                        L.c.epoch == holder.epoch,
                    )
                )
                .values(epoch=epoch, **values)
            )
            taken = result.rowcount == 1
    except IntegrityError:
        taken = False
    if not taken:
        await conn.rollback()
        winner = (await lease_holders(conn, [run_id]))[run_id]
        raise RunOwned(run_id, winner)
    await conn.commit()
    _HELD_HERE.add(owner.owner_id)
    return epoch


def forget_lease(owner: Owner) -> None:
    """This process's execution as ``owner`` has ended (released or not)."""
    _HELD_HERE.discard(owner.owner_id)
