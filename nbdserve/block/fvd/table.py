"""The FVD lookup table of compact images: virtual chunk -> physical chunk.

Entries are ``<u4``; ``0xFFFFFFFF`` means no storage.  Physical chunk ``p``
lives at data-store offset ``data_offset + p * chunk_size``.  The allocator
reuses leaked chunks (below the highest used one, referenced by no entry)
before it grows the store, as the spec asks.

The entries are a :class:`~nbdserve.block.pagedtable.PagedTable`: pages with
no allocated chunk are not held, so memory follows the allocated chunks and
long unallocated stretches are skipped page by page.  Validation and the
allocator work on the allocated entries only.

Allocation is two-step so that a table entry never points at data that has
not landed: :meth:`reserve` hands out a physical chunk, the caller writes the
data, then :meth:`publish` makes the entry visible (and journals it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from nbdserve.block.fvd.structs import (
    TABLE_DTYPE,
    TABLE_ENTRY_RESERVED_BIT,
    TABLE_UNALLOCATED,
)
from nbdserve.block.pagedtable import PagedTable
from nbdserve.errors import InvalidImageError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from nbdserve.block.file import FileBackend


class ChunkTable:
    """Entries for virtual chunks ``[0, chunk_count)`` plus the chunk allocator."""

    def __init__(
        self, chunk_count: int, raw: bytes | None = None, *, table: PagedTable | None = None
    ) -> None:
        self.chunk_count = chunk_count
        if table is None:
            table = PagedTable.from_bytes(raw or b"", chunk_count, TABLE_DTYPE, TABLE_UNALLOCATED)
        self.table = table
        self._free: list[int] = []
        self._next_new = 0
        self._reserved: set[int] = set()

    @classmethod
    async def load(
        cls,
        file: FileBackend,
        offset: int,
        chunk_count: int,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> ChunkTable:
        """Read the table region (all of it: 0xFFFFFFFF pages cannot be skipped as
        host holes), keeping only pages that map chunks."""
        table = await PagedTable.load(
            file, offset, chunk_count, TABLE_DTYPE, TABLE_UNALLOCATED, progress=progress
        )
        return cls(chunk_count, table=table)

    def allocated(self) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.uint32]]:
        """(virtual chunk indices, entries) of every allocated chunk, ascending."""
        index, values = self.table.items()
        return index, values.astype(np.uint32)

    def dense(self) -> npt.NDArray[np.uint32]:
        """Every entry (tools and tests)."""
        return self.table.dense().astype(np.uint32)

    # ---- validation -----------------------------------------------------------

    def check_entries(self) -> None:
        """Entries are unallocated or name a physical chunk the store could hold.

        A compact store never needs more physical chunks than there are
        virtual ones, so ``p >= chunk_count`` is corruption.
        """
        index, used = self.allocated()
        reserved_bit = np.flatnonzero((used & np.uint32(TABLE_ENTRY_RESERVED_BIT)) != 0)
        if reserved_bit.size:
            raise InvalidImageError(
                f"FVD table entry has bit 31 set ({int(used[reserved_bit[0]]):#010x})"
            )
        bad = np.flatnonzero(used >= self.chunk_count)
        if bad.size:
            raise InvalidImageError(
                f"FVD table entry {int(index[bad[0]])} points to physical chunk "
                f"{int(used[bad[0]])}, past what the data store could hold "
                f"({self.chunk_count} chunks)"
            )

    def duplicates(self) -> list[int]:
        """Physical chunks referenced by more than one virtual chunk."""
        _, used = self.allocated()
        values, counts = np.unique(used, return_counts=True)
        return [int(v) for v in values[counts > 1]]

    def leaked(self) -> list[int]:
        """Physical chunks below the highest used one that nothing references.

        Only entries that can be valid (``p < chunk_count``) count: the checker
        meets the others too (it reports them as corruption), and an entry read
        from the image must never size an allocation (0xFFFFFF00 would ask for
        16 GiB).
        """
        _, entries = self.allocated()
        used = entries[entries < self.chunk_count]
        if used.size == 0:
            return []
        top = int(used.max())
        all_chunks = np.arange(top + 1, dtype=np.uint32)
        return [int(p) for p in np.setdiff1d(all_chunks, used, assume_unique=False)]

    def allocated_count(self) -> int:
        return len(self.allocated()[0])

    def physical_end(self) -> int:
        """One past the highest physical chunk in use (0 when none)."""
        _, used = self.allocated()
        return int(used.max()) + 1 if used.size else 0

    # ---- lookups --------------------------------------------------------------

    def lookup(self, index: int) -> int | None:
        value = self.table.get(index)
        return None if value == TABLE_UNALLOCATED else value

    def run_at(self, index: int, stop: int) -> tuple[int | None, int]:
        """(physical chunk or None, chunks) of the run from ``index`` (before ``stop``):
        all unallocated (any length), or allocated to consecutive physical chunks."""
        return self.lookup(index), self.table.run_length(index, stop, 1)

    def all_allocated(self, first: int, stop: int) -> bool:
        """Every chunk in ``[first, stop)`` has storage."""
        return bool((self.table.window(first, stop - first) != TABLE_UNALLOCATED).all())

    # ---- updates --------------------------------------------------------------

    def set(self, index: int, value: int) -> None:
        self.table.set(index, value)

    def set_entries(self, first: int, values: Sequence[int]) -> None:
        """Entries ``first..`` = ``values`` (journal replay, repairs)."""
        self.table.set_range(first, np.asarray(values, dtype=TABLE_DTYPE))

    def set_many(self, indices: npt.NDArray[np.intp], value: int) -> None:
        self.table.set_many(indices, value)

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
        self.table.set(index, p)

    def snapshot(self) -> bytes:
        """The whole table region (tools; the driver writes dirty pages only)."""
        return self.table.to_bytes()
