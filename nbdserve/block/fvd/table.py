"""The FVD lookup table of compact images: virtual chunk -> physical chunk.

Entries are ``<u4``; ``0xFFFFFFFF`` means no storage.  Physical chunk ``p``
lives at data-store offset ``data_offset + p * chunk_size``.  The allocator
reuses leaked chunks (below the highest used one, referenced by no entry)
before it grows the store, as the spec asks.

Allocation is two-step so that a table entry never points at data that has
not landed: :meth:`reserve` hands out a physical chunk, the caller writes the
data, then :meth:`publish` makes the entry visible (and journals it).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from nbdserve.block.fvd.structs import (
    TABLE_DTYPE,
    TABLE_ENTRY_RESERVED_BIT,
    TABLE_UNALLOCATED,
)
from nbdserve.errors import InvalidImageError


class ChunkTable:
    """Entries for virtual chunks ``[0, chunk_count)`` plus the chunk allocator."""

    def __init__(self, chunk_count: int, raw: bytes | None = None) -> None:
        self.chunk_count = chunk_count
        if raw is None:
            self.entries: npt.NDArray[np.uint32] = np.full(
                chunk_count, TABLE_UNALLOCATED, dtype=TABLE_DTYPE
            )
        else:
            self.entries = np.frombuffer(raw, dtype=TABLE_DTYPE, count=chunk_count).copy()
        self._free: list[int] = []
        self._next_new = 0
        self._reserved: set[int] = set()

    # ---- validation -----------------------------------------------------------

    def check_entries(self) -> None:
        """Entries are unallocated or name a physical chunk the store could hold.

        A compact store never needs more physical chunks than there are
        virtual ones, so ``p >= chunk_count`` is corruption.
        """
        used = self.entries[self.entries != TABLE_UNALLOCATED]
        reserved_bit = np.flatnonzero((used & np.uint32(TABLE_ENTRY_RESERVED_BIT)) != 0)
        if reserved_bit.size:
            raise InvalidImageError(
                f"FVD table entry has bit 31 set ({int(used[reserved_bit[0]]):#010x})"
            )
        past = np.flatnonzero(self.entries != TABLE_UNALLOCATED)
        bad = past[self.entries[past] >= self.chunk_count]
        if bad.size:
            index = int(bad[0])
            raise InvalidImageError(
                f"FVD table entry {index} points to physical chunk {int(self.entries[index])}, "
                f"past what the data store could hold ({self.chunk_count} chunks)"
            )

    def duplicates(self) -> list[int]:
        """Physical chunks referenced by more than one virtual chunk."""
        used = self.entries[self.entries != TABLE_UNALLOCATED]
        values, counts = np.unique(used, return_counts=True)
        return [int(v) for v in values[counts > 1]]

    def leaked(self) -> list[int]:
        """Physical chunks below the highest used one that nothing references.

        Only entries that can be valid (``p < chunk_count``) count: the checker
        meets the others too (it reports them as corruption), and an entry read
        from the image must never size an allocation (0xFFFFFF00 would ask for
        16 GiB).
        """
        valid = (self.entries != TABLE_UNALLOCATED) & (self.entries < self.chunk_count)
        used = self.entries[valid]
        if used.size == 0:
            return []
        top = int(used.max())
        all_chunks = np.arange(top + 1, dtype=np.uint32)
        return [int(p) for p in np.setdiff1d(all_chunks, used, assume_unique=False)]

    def allocated_count(self) -> int:
        return int(np.count_nonzero(self.entries != TABLE_UNALLOCATED))

    def physical_end(self) -> int:
        """One past the highest physical chunk in use (0 when none)."""
        used = self.entries[self.entries != TABLE_UNALLOCATED]
        return int(used.max()) + 1 if used.size else 0

    # ---- lookups --------------------------------------------------------------

    def lookup(self, index: int) -> int | None:
        value = int(self.entries[index])
        return None if value == TABLE_UNALLOCATED else value

    # ---- allocation -----------------------------------------------------------

    def start_allocator(self) -> None:
        """Compute the free list from the entries (after load and recovery)."""
        self._free = sorted(self.leaked(), reverse=True)
        self._next_new = self.physical_end()
        self._reserved.clear()

    def reserve(self) -> tuple[int, bool]:
        """A physical chunk for a new allocation: (p, reused).

        ``reused`` says the chunk's storage may hold old bytes and must be
        zeroed before use.
        """
        if self._free:
            p = self._free.pop()
            self._reserved.add(p)
            return p, True
        p = self._next_new
        if p >= self.chunk_count:
            raise AssertionError("FVD allocator ran out of chunks")  # cannot happen
        self._next_new += 1
        self._reserved.add(p)
        return p, False

    def unreserve(self, p: int) -> None:
        """Give back a reserved chunk whose write failed."""
        self._reserved.discard(p)
        self._free.append(p)
        self._free.sort(reverse=True)

    def publish(self, index: int, p: int) -> None:
        self._reserved.discard(p)
        self.entries[index] = p

    def snapshot(self) -> bytes:
        return self.entries.tobytes()
