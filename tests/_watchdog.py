"""Running calls in a child process under a watchdog: the tests' hang detector.

A thread cannot tell a hang in C code that never lets go of the GIL (a comparison of two
huge nested lists, say) from a slow call: the watching thread itself never gets to run,
nor does pytest-timeout's signal handler.  A child process can be watched from outside
and killed, and its address space is capped, so that code that regresses into building
gigabytes fails with a MemoryError there instead of taking the machine's memory.  The
timeout is a hang detector, far above what any call should take, not a performance bound.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

#: Seconds one call may run before the test calls it hung.
HANG_SECONDS = 30.0
#: Address space the child may take beyond what it starts with.
MEMORY_CAP = 1024 * 1024 * 1024


def run_watched(
    function: Callable[[T], Any], items: Sequence[T], *, hang_seconds: float = HANG_SECONDS
) -> list[Any]:
    """``[function(item) for item in items]``, computed in a forked child process.

    Each result must pickle.  If one call runs longer than ``hang_seconds``, the child is
    killed and the test fails naming the item; the child cannot allocate more than
    ``MEMORY_CAP`` bytes more than the test process had.
    """
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_serve, args=(function, items, sender), daemon=True)
    child.start()
    sender.close()
    results: list[Any] = []
    try:
        for item in items:
            if not receiver.poll(hang_seconds):
                pytest.fail(f"still running after {hang_seconds} s (a hang): {item!r}"[:2000])
            results.append(receiver.recv())
    finally:
        child.kill()
        child.join()
        receiver.close()
    return results


def _serve(function: Callable[[T], Any], items: Sequence[T], sender: Connection) -> None:
    _cap_memory()
    for item in items:
        sender.send(function(item))


def _cap_memory() -> None:
    with open("/proc/self/statm", encoding="ascii") as statm:
        pages = int(statm.read().split()[0])
    size = pages * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (size + MEMORY_CAP, resource.RLIM_INFINITY))
