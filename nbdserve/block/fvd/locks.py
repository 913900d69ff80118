"""RangeLock: exclusive locks on guest byte ranges (FVD's ``copy_locks``).

Writers that copy-on-write, allocate chunks, or store copy-on-read and
prefetched data hold the range they change, so that a store re-checking the
bitmap under the lock can never overwrite a newer client write.  Holders are
few (one per in-flight request), so a list scan is cheap.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio


class RangeLock:
    """Exclusive, non-reentrant locks on half-open ranges ``[lo, hi)``."""

    def __init__(self) -> None:
        self._held: list[tuple[int, int, trio.Event]] = []

    @contextlib.asynccontextmanager
    async def hold(self, lo: int, hi: int) -> AsyncIterator[None]:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            for a, b, event in self._held:
                if a < hi and lo < b:
                    await event.wait()
                    break
            else:
                break
        entry = (lo, hi, trio.Event())
        self._held.append(entry)
        try:
            yield
        finally:
            self._held.remove(entry)
            entry[2].set()

    def __len__(self) -> int:
        return len(self._held)
