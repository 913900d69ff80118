"""RangeLock: serialise requests that modify overlapping cluster ranges.

Allocating writes, zeroing and discards of the same clusters must not run
interleaved (QEMU's ``dependent_requests``), but requests on disjoint clusters
must run concurrently.  The number of held ranges is bounded by the number of
requests in flight, so a list scan is cheaper than any tree.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio


class RangeLock:
    """Exclusive locks over half-open integer ranges [start, end)."""

    def __init__(self) -> None:
        self._held: list[tuple[int, int, trio.Event]] = []

    def is_free(self, start: int, end: int) -> bool:
        """True when no held range overlaps [start, end); never blocks."""
        return all(not (s < end and start < e) for s, e, _ in self._held)

    @contextlib.asynccontextmanager
    async def hold(self, start: int, end: int) -> AsyncIterator[None]:
        while True:
            blocker = next((ev for s, e, ev in self._held if s < end and start < e), None)
            if blocker is None:
                break
            await blocker.wait()
        entry = (start, end, trio.Event())
        self._held.append(entry)
        try:
            await trio.lowlevel.checkpoint()
            yield
        finally:
            self._held.remove(entry)
            entry[2].set()
