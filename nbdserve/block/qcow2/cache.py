"""A bounded LRU of metadata tables (L2 tables, refcount blocks) held as numpy arrays.

Design notes
------------
* Keyed by the table's host offset; every table has the same byte size.
* Write-back: a changed table is marked dirty and reaches the file on
  :meth:`flush` or when it is evicted.  ``before_write`` runs before any dirty
  table of this cache is written, which is how write ordering is expressed
  (QEMU's ``qcow2_cache_set_dependency``): the L2 cache's hook flushes the
  refcount cache, so an L2 entry never reaches the disk before the refcount
  that accounts for its cluster.
* No pinning: callers hold the driver's metadata lock while they use a table,
  and :meth:`mark_dirty` re-inserts a table that was evicted meanwhile, so a
  reference held across an await can never lose an update.
* ``peek`` is synchronous so the read fast path can consult the cache without
  a task switch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from nbdserve.block.file import FileBackend

Decode = Callable[[bytes | bytearray], np.ndarray]
Encode = Callable[[np.ndarray], bytes | memoryview]


class TableCache:
    """LRU of equally sized tables from one file."""

    def __init__(
        self,
        file: FileBackend,
        table_size: int,
        capacity: int,
        decode: Decode,
        encode: Encode,
        name: str,
    ) -> None:
        self._file = file
        self.table_size = table_size
        self.capacity = max(2, capacity)
        self._decode = decode
        self._encode = encode
        self.name = name
        self._tables: OrderedDict[int, np.ndarray] = OrderedDict()
        self._dirty: set[int] = set()
        self.before_write: Callable[[], Awaitable[None]] | None = None
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._tables)

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)

    def peek(self, offset: int) -> np.ndarray | None:
        """The cached table at ``offset`` or None; never blocks.

        A found table counts as a hit: most cached reads are answered through
        here, so without it the hit ratio would describe only the slow path.
        None is not a miss: the caller falls back to ``get``, which counts it.
        """
        table = self._tables.get(offset)
        if table is not None:
            self.hits += 1
            self._tables.move_to_end(offset)
        return table

    async def get(self, offset: int) -> np.ndarray:
        """The table at ``offset``, loaded on a miss (may evict and write back)."""
        table = self._tables.get(offset)
        if table is not None:
            self.hits += 1
            self._tables.move_to_end(offset)
            return table
        self.misses += 1
        raw = await self._file.pread(offset, self.table_size)
        table = self._decode(raw)
        await self._insert(offset, table)
        return table

    async def put(self, offset: int, table: np.ndarray, *, dirty: bool) -> None:
        """Insert a table made in memory (new or copied)."""
        await self._insert(offset, table)
        if dirty:
            self._dirty.add(offset)

    def mark_dirty(self, offset: int, table: np.ndarray) -> None:
        if offset not in self._tables:
            self._tables[offset] = table  # evicted while borrowed: keep the update
        self._dirty.add(offset)

    def forget(self, offset: int) -> None:
        """Drop a table whose cluster was freed; its contents no longer matter."""
        self._tables.pop(offset, None)
        self._dirty.discard(offset)

    def clear(self) -> None:
        self._tables.clear()
        self._dirty.clear()

    async def _insert(self, offset: int, table: np.ndarray) -> None:
        self._tables[offset] = table
        self._tables.move_to_end(offset)
        while len(self._tables) > self.capacity:
            victim, vtable = next(iter(self._tables.items()))
            if victim in self._dirty:
                await self._write(victim, vtable)
            # the write may have awaited: re-check it is still the oldest and clean
            if victim in self._tables and victim not in self._dirty:
                del self._tables[victim]
                self.evictions += 1

    async def _write(self, offset: int, table: np.ndarray) -> None:
        if self.before_write is not None:
            await self.before_write()
        self._dirty.discard(offset)
        try:
            await self._file.pwrite(offset, self._encode(table))
        except BaseException:
            self._dirty.add(offset)
            raise

    async def flush(self) -> None:
        """Write every dirty table (after ``before_write``)."""
        if not self._dirty:
            return
        if self.before_write is not None:
            await self.before_write()
        for offset in sorted(self._dirty):
            table = self._tables.get(offset)
            self._dirty.discard(offset)
            if table is None:
                continue
            try:
                await self._file.pwrite(offset, self._encode(table))
            except BaseException:
                self._dirty.add(offset)
                raise

    def statistics(self) -> dict[str, int]:
        return {
            f"{self.name}_hits": self.hits,
            f"{self.name}_misses": self.misses,
            f"{self.name}_evictions": self.evictions,
            f"{self.name}_dirty": len(self._dirty),
        }
