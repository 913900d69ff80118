"""qcow2 refcounts: the refcount table, refcount blocks, the cluster allocator.

Design notes
------------
* Refcount blocks of every width (``refcount_order`` 0..6) are held unpacked
  as ``uint64`` arrays in a :class:`TableCache`; packing to 1/2/4/8..64-bit
  big-endian entries happens only at the file boundary (structs.py).
* The refcount table itself is small (at most 8 MiB) and held whole as a
  ``>u8`` array; a changed entry is written through at once, always after the
  block it points to.
* Allocation searches upward from ``free_cluster_index`` (the lowest cluster
  that may be free, QEMU's ``free_cluster_index``) for a run of free clusters
  with numpy.  A missing refcount block is placed *inside the range it
  describes* (at the first cluster being allocated), so it always counts
  itself and never needs another block first.  When the table itself is too
  short, a new, larger table and the blocks describing it are laid out
  together past the end of everything (QEMU ``alloc_refcount_block`` /
  ``qcow2_refcount_area``), the header is switched with one write, and the
  old table's clusters are freed.
* Ordering: increments are only cached (dirty); the L2 cache flushes this
  cache before writing any L2 table.  Decrements must not reach the disk
  before the L2 entries that stopped referencing the clusters, so
  ``before_decrement`` (the driver flushes its L2 cache) runs first.
* Every method expects the caller to hold the driver's metadata lock.

Reference: qemu block/qcow2-refcount.c.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import numpy as np

from nbdserve.block.qcow2.cache import TableCache
from nbdserve.block.qcow2.structs import (
    QCOW_MAX_REFTABLE_SIZE,
    REFT_OFFSET_MASK,
    decode_refcounts,
    encode_refcounts,
    pack_u64,
)
from nbdserve.errors import CorruptImageError, NoSpaceError

if TYPE_CHECKING:
    from nbdserve.block.file import FileBackend

ReftableMoved = Callable[[int, int], Awaitable[None]]


class Refcounts:
    """Refcount state of one image.  Caller holds the driver's metadata lock."""

    def __init__(
        self,
        file: FileBackend,
        *,
        cluster_bits: int,
        refcount_order: int,
        reftable_offset: int,
        reftable: np.ndarray,
        cache_capacity: int = 64,
    ) -> None:
        self._file = file
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.refcount_order = refcount_order
        self.max_refcount = (1 << (1 << refcount_order)) - 1
        # log2 of clusters described by one refcount block
        self.block_shift = cluster_bits + 3 - refcount_order
        self.entries_per_block = 1 << self.block_shift
        self.reftable_offset = reftable_offset
        self.reftable = reftable
        self.free_cluster_index = 0
        self.cache = TableCache(
            file,
            self.cluster_size,
            cache_capacity,
            lambda raw: decode_refcounts(raw, refcount_order),
            lambda t: encode_refcounts(t, refcount_order),
            "refblock",
        )
        self.on_reftable_moved: ReftableMoved | None = None
        self.before_decrement: Callable[[], Awaitable[None]] | None = None
        # (start, end) host byte ranges allocation must never hand out
        self.protected: Callable[[], list[tuple[int, int]]] = list
        # the active L1 table, for the overlap check against L2 tables
        self.l2_offsets: Callable[[], np.ndarray] = lambda: np.zeros(0, dtype=">u8")

    # ---- lookups ---------------------------------------------------------------

    def _block_offset(self, block_index: int) -> int:
        if block_index >= len(self.reftable):
            return 0
        offset = int(self.reftable[block_index]) & REFT_OFFSET_MASK
        if offset % self.cluster_size:
            raise CorruptImageError(
                f"refcount block {block_index} at {offset:#x} is not cluster aligned"
            )
        return offset

    async def _block(self, block_index: int) -> np.ndarray | None:
        offset = self._block_offset(block_index)
        if not offset:
            return None
        return await self.cache.get(offset)

    async def get(self, cluster_index: int) -> int:
        block = await self._block(cluster_index >> self.block_shift)
        if block is None:
            return 0
        return int(block[cluster_index & (self.entries_per_block - 1)])

    async def get_range(self, first: int, count: int) -> np.ndarray:
        """Refcounts of ``count`` clusters from ``first`` (zeros where no block)."""
        out = np.zeros(count, dtype=np.uint64)
        pos = first
        while pos < first + count:
            bi = pos >> self.block_shift
            block_end = (bi + 1) << self.block_shift
            n = min(block_end, first + count) - pos
            block = await self._block(bi)
            if block is not None:
                local = pos & (self.entries_per_block - 1)
                out[pos - first : pos - first + n] = block[local : local + n]
            pos += n
        return out

    # ---- updates ------------------------------------------------------------------

    async def update(self, first: int, count: int, delta: int) -> None:
        """Add ``delta`` to the refcount of ``count`` clusters from ``first``."""
        if delta < 0 and self.before_decrement is not None:
            await self.before_decrement()
        pos = first
        while pos < first + count:
            bi = pos >> self.block_shift
            block_end = (bi + 1) << self.block_shift
            n = min(block_end, first + count) - pos
            offset = self._block_offset(bi)
            if not offset:
                raise CorruptImageError(f"cluster {pos} has no refcount block")
            block = await self.cache.get(offset)
            local = pos & (self.entries_per_block - 1)
            seg = block[local : local + n]
            if delta < 0 and int(seg.min()) < -delta:
                bad = pos + int(np.flatnonzero(seg < np.uint64(-delta))[0])
                raise CorruptImageError(f"refcount of cluster {bad} would drop below zero")
            if delta > 0 and int(seg.max()) > self.max_refcount - delta:
                raise NoSpaceError(
                    f"refcount overflow ({self.max_refcount} is the most this image can count)"
                )
            if delta > 0:
                seg += np.uint64(delta)
            else:
                seg -= np.uint64(-delta)
                freed = np.flatnonzero(seg == 0)
                if len(freed) and pos + int(freed[0]) < self.free_cluster_index:
                    self.free_cluster_index = pos + int(freed[0])
            self.cache.mark_dirty(offset, block)
            pos += n

    async def free_bytes(self, host_offset: int, length: int) -> None:
        """Drop one reference from every cluster touching [host_offset, +length)."""
        first = host_offset >> self.cluster_bits
        last = (host_offset + length - 1) >> self.cluster_bits
        await self.update(first, last - first + 1, -1)

    # ---- allocation -----------------------------------------------------------------

    async def allocate(self, count: int) -> int:
        """Allocate ``count`` contiguous clusters (refcount 1); return the host offset.

        Refcount blocks missing for the run are placed just in front of it, in
        the same free stretch, so a large allocation is not split by them.
        """
        extra = 0
        while True:
            first = await self._find_free(count + extra)
            missing = self._missing_blocks(first, count + extra)
            if any(bi >= len(self.reftable) for bi in missing):
                await self._grow(max(missing))
                extra = 0
                continue
            if len(missing) > extra:
                extra = len(missing)
                continue
            break
        if missing:
            await self._create_blocks(missing, first)
        first += len(missing)
        offset = first << self.cluster_bits
        self._check_protected(offset, count << self.cluster_bits)
        await self.update(first, count, 1)
        if first - len(missing) == self.free_cluster_index:
            self.free_cluster_index = first + count
        return offset

    def _missing_blocks(self, first: int, count: int) -> list[int]:
        lo = first >> self.block_shift
        hi = (first + count - 1) >> self.block_shift
        return [bi for bi in range(lo, hi + 1) if not self._block_offset(bi)]

    async def _create_blocks(self, missing: list[int], at: int) -> None:
        """Write blocks ``missing`` at clusters at, at+1, ... and account for them."""
        positions = list(range(at, at + len(missing)))
        self._check_protected(at << self.cluster_bits, len(missing) << self.cluster_bits)
        new = set(missing)
        for bi, pos in zip(missing, positions, strict=True):
            counts = np.zeros(self.entries_per_block, dtype=np.uint64)
            for q in positions:
                if q >> self.block_shift == bi:
                    counts[q & (self.entries_per_block - 1)] = 1
            offset = pos << self.cluster_bits
            await self._file.pwrite(offset, encode_refcounts(counts, self.refcount_order))
            await self.cache.put(offset, counts, dirty=False)
        for bi, pos in zip(missing, positions, strict=True):
            self.reftable[bi] = np.uint64(pos << self.cluster_bits)
            await self._file.pwrite(
                self.reftable_offset + 8 * bi, pack_u64(pos << self.cluster_bits)
            )
        # block clusters that fall in ranges of blocks that already existed
        for q in positions:
            if q >> self.block_shift not in new:
                await self.update(q, 1, 1)

    async def _find_free(self, count: int) -> int:
        """The first cluster of a run of ``count`` free clusters at or after the hint."""
        idx = self.free_cluster_index
        run_start, run_len = idx, 0
        while True:
            bi = idx >> self.block_shift
            block_end = (bi + 1) << self.block_shift
            block = await self._block(bi)
            if block is None:
                if run_len == 0:
                    run_start = idx
                run_len += block_end - idx
                if run_len >= count:
                    return run_start
                idx = block_end
                continue
            local = idx & (self.entries_per_block - 1)
            found, run_start, run_len = _scan_block(block[local:], idx, run_start, run_len, count)
            if found:
                return run_start
            idx = block_end

    def _check_protected(self, offset: int, length: int) -> None:
        """QEMU's cached overlap check: a fresh allocation must not land on live metadata
        (header, L1/refcount/snapshot tables, active L2 tables, refcount blocks).  Only
        corrupt refcounts can make it, and overwriting metadata would spread the damage."""
        for start, end in self.protected():
            if offset < end and start < offset + length:
                self._overlap(offset, length, f"metadata at {start:#x}..{end:#x}")
        first = np.uint64(offset & ~(self.cluster_size - 1))
        last = np.uint64(offset + length)
        for name, table in (("refcount block", self.reftable), ("L2 table", self.l2_offsets())):
            offsets = table & np.uint64(REFT_OFFSET_MASK & 0x00FFFFFFFFFFFFFF)
            hit = (offsets >= first) & (offsets < last)
            if hit.any():
                self._overlap(offset, length, f"a {name} at {int(offsets[hit][0]):#x}")

    def _overlap(self, offset: int, length: int, what: str) -> None:
        raise CorruptImageError(
            f"allocator handed out {offset:#x}+{length:#x}, which overlaps {what}: "
            "the refcounts are corrupt (repair with img check -r all)"
        )

    # ---- table growth -----------------------------------------------------------------

    async def _grow(self, needed_block_index: int) -> None:
        """Lay out a larger refcount table plus the blocks describing it, then switch."""
        cluster = self.cluster_size
        old_len = len(self.reftable)
        file_clusters = -(-self._file.size // cluster)
        area = max(file_clusters, old_len << self.block_shift)
        table_clusters, blocks = self._plan_area(area, needed_block_index, old_len)
        new_len = table_clusters * cluster // 8
        if new_len * 8 > QCOW_MAX_REFTABLE_SIZE:
            raise NoSpaceError("the refcount table would exceed its maximum size")
        area_len = len(blocks) + table_clusters
        new_table = np.zeros(new_len, dtype=">u8")
        new_table[:old_len] = self.reftable
        for i, bi in enumerate(blocks):
            new_table[bi] = np.uint64((area + i) << self.cluster_bits)
        # the new blocks count every cluster of the area
        for i, bi in enumerate(blocks):
            counts = np.zeros(self.entries_per_block, dtype=np.uint64)
            lo = max(area, bi << self.block_shift)
            hi = min(area + area_len, (bi + 1) << self.block_shift)
            if hi > lo:
                counts[lo - (bi << self.block_shift) : hi - (bi << self.block_shift)] = 1
            offset = (area + i) << self.cluster_bits
            await self._file.pwrite(offset, encode_refcounts(counts, self.refcount_order))
            await self.cache.put(offset, counts, dirty=False)
        table_offset = (area + len(blocks)) << self.cluster_bits
        await self._file.pwrite(table_offset, memoryview(new_table.tobytes()))
        await self.cache.flush()
        old_offset, old_clusters = self.reftable_offset, (old_len * 8 + cluster - 1) // cluster
        if self.on_reftable_moved is not None:
            await self.on_reftable_moved(table_offset, table_clusters)
        self.reftable = new_table
        self.reftable_offset = table_offset
        await self.update(old_offset >> self.cluster_bits, old_clusters, -1)

    def _plan_area(self, area: int, needed: int, old_len: int) -> tuple[int, list[int]]:
        """(table clusters, block indexes) such that the area describes itself."""
        cluster = self.cluster_size
        n_blocks = 1
        table_clusters = 1
        for _ in range(64):
            end = area + n_blocks + table_clusters
            last_bi = (end - 1) >> self.block_shift
            want_len = max(needed + 1, last_bi + 1, old_len + old_len // 2 + 1)
            new_table_clusters = -(-want_len * 8 // cluster)
            blocks = list(range(area >> self.block_shift, last_bi + 1))
            if new_table_clusters == table_clusters and len(blocks) == n_blocks:
                return table_clusters, blocks
            table_clusters, n_blocks = new_table_clusters, len(blocks)
        raise NoSpaceError("could not lay out a larger refcount table")

    # ---- flush ---------------------------------------------------------------------

    async def flush(self) -> None:
        await self.cache.flush()


def _scan_block(
    seg: np.ndarray, idx: int, run_start: int, run_len: int, count: int
) -> tuple[bool, int, int]:
    """Continue a free-run search through ``seg`` (refcounts from cluster ``idx``)."""
    used = np.flatnonzero(seg)
    if len(used) == 0:
        if run_len == 0:
            run_start = idx
        run_len += len(seg)
        return run_len >= count, run_start, run_len
    # the run carried in from before ends at the first used cluster
    lead = int(used[0])
    if run_len + lead >= count:
        return True, (run_start if run_len else idx), run_len + lead
    # gaps between used clusters, then the tail after the last used one
    gaps = np.diff(used) - 1
    big = np.flatnonzero(gaps >= count)
    if len(big):
        return True, idx + int(used[big[0]]) + 1, int(gaps[big[0]])
    tail_start = int(used[-1]) + 1
    return False, idx + tail_start, len(seg) - tail_start
