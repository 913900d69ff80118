"""A write cache for compressed qcow2 clusters: whole host clusters, aligned writes.

Design notes
------------
* Compressed extents are small and byte-granular; written one by one they
  become unaligned writes that O_DIRECT turns into read-modify-write cycles
  (QEMU's motivation for its compressed-write cache, 2021).  This cache
  gathers them per *host* cluster and writes a cluster's bytes as one I/O,
  zero-padded to the alignment (``min(cluster_size, 4096)``).
* The byte allocator (compress.py) hands out offsets in increasing order
  inside the cluster it fills, and the driver appends each extent here in
  the same metadata-locked step that allocates it.  So a cached cluster's
  data is always one prefix ``[base, filled)`` of a buffer, never a sparse
  extent list: ``base`` is 0 for every cluster this cache saw from its first
  byte.  A cluster is *closed* once the allocator has moved past it (it is
  full, or the next extent did not fit); only the allocator's current
  cluster is open.
* A cluster is *active* while it holds bytes not yet on disk
  (``filled > flushed``).  At most ``max_active`` clusters are active
  (``compress_cache_size`` bytes, at least two clusters, since one extent
  may touch two).  A writer that would exceed the bound first makes room:
  it writes closed clusters, then the open one, or waits for clusters
  another task is writing (QEMU's waiters).  The writer that closes a
  cluster writes it out before its request completes ("flushed when full").
* The open cluster may be written partially (FLUSH, close, the bound); it
  stays cached, so the next write of it starts at the aligned block before
  its first unwritten byte and rewrites the same bytes in front of it.
  Writes of one cluster are serialised by its ``lock`` and take a copy of
  the buffer, so a slower earlier write can never land after a later one.
* Ordering: an L2 entry pointing at an extent must not reach the disk
  before the extent does.  The driver runs :meth:`flush` before any L2
  table write (the L2 cache's ``before_write`` hook) and before FLUSH's
  metadata writes.
* A host cluster whose refcount drops to zero is dropped from the cache
  (after any write of it in flight has finished) before the allocator can
  hand it out again, so stale compressed bytes never overwrite new data.
* Reads of extents not yet on disk are served from the buffers
  (:meth:`read`).

Nothing here takes the driver's metadata lock, so the driver may call any
method while holding it.

Reference: QEMU block/qcow2-compressed-write-cache.c (Vladimir
Sementsov-Ogievskiy's 2021 series; not merged upstream).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from nbdserve.block.file import FileBackend

LOGGER = logging.getLogger(__name__)

# the size a flush pads a cluster's data to (capped at the cluster size)
FLUSH_ALIGNMENT = 4096


class _CachedCluster:
    """One host cluster's pending compressed bytes."""

    __slots__ = ("base", "buf", "closed", "dropped", "filled", "flushed", "lock", "offset")

    def __init__(self, offset: int, cluster_size: int, base: int) -> None:
        self.offset = offset  # host offset of the cluster
        self.buf = bytearray(cluster_size)
        self.base = base  # bytes before this were never in the buffer (already on disk)
        self.filled = base  # [base, filled) holds extents
        self.flushed = base  # [0, flushed) is on disk
        self.closed = False  # the allocator will append nothing more
        self.dropped = False  # freed: must never be written
        self.lock = trio.Lock()  # one write of this cluster at a time

    def active(self) -> bool:
        """Holds bytes that are not on disk yet."""
        return self.filled > self.flushed


class CompressedWriteCache:
    """Pending compressed extents, grouped by host cluster."""

    def __init__(self, file: FileBackend, cluster_size: int, max_bytes: int) -> None:
        self._file = file
        self.cluster_size = cluster_size
        self.max_active = max(2, max_bytes // cluster_size)
        self.alignment = min(cluster_size, max(FLUSH_ALIGNMENT, file.direct_alignment))
        self._clusters: dict[int, _CachedCluster] = {}  # insertion order = age
        self._room = trio.lowlevel.ParkingLot()  # writers waiting for room
        self.writes = 0
        self.bytes_written = 0
        self.full_writes = 0
        self.partial_writes = 0
        self.room_waits = 0

    # ---- state ---------------------------------------------------------------

    @property
    def active_count(self) -> int:
        return sum(1 for c in self._clusters.values() if c.active())

    def is_active(self, cluster_offset: int) -> bool:
        c = self._clusters.get(cluster_offset)
        return c is not None and c.active()

    def has_room(self, new_active: int) -> bool:
        """Whether ``new_active`` more clusters may become active."""
        return self.active_count + new_active <= self.max_active

    def __len__(self) -> int:
        return len(self._clusters)

    # ---- appending (the caller holds the driver's metadata lock) ---------------

    def append(self, host_offset: int, data: bytes) -> None:
        """Cache an extent just allocated at ``host_offset`` (may span two clusters)."""
        cs = self.cluster_size
        pos = 0
        while pos < len(data):
            at = host_offset + pos
            cluster_offset = at - at % cs
            start = at - cluster_offset
            n = min(len(data) - pos, cs - start)
            c = self._clusters.get(cluster_offset)
            if c is None:
                c = self._clusters[cluster_offset] = _CachedCluster(cluster_offset, cs, start)
            assert not c.closed, "extents must arrive in allocation order"
            assert start == c.filled, "extents must arrive in allocation order"
            c.buf[start : start + n] = data[pos : pos + n]
            c.filled = start + n
            pos += n

    def close(self, cluster_offset: int) -> None:
        """The allocator moved past this cluster: it gets no more extents."""
        c = self._clusters.get(cluster_offset)
        if c is None:
            return
        c.closed = True
        if not c.active() and not c.lock.locked():
            del self._clusters[cluster_offset]

    # ---- writing out --------------------------------------------------------------

    async def write_closed(self) -> None:
        """Write every closed cluster that is waiting (the writer that closed it does
        this); clusters that follow each other in the file go out as one write."""
        ready = [c for c in self._clusters.values() if c.closed and c.active()]
        await self._write_clusters([c for c in ready if not c.lock.locked()])

    async def make_room(self, new_active: int) -> None:
        """Return once ``new_active`` more clusters may become active."""
        while not self.has_room(new_active):
            victim = self._pick_victim()
            if victim is not None:
                await self._write_clusters([victim])
                continue
            self.room_waits += 1
            await self._room.park()

    def _pick_victim(self) -> _CachedCluster | None:
        """The oldest closed active cluster nobody is writing, else the open one."""
        idle = [c for c in self._clusters.values() if c.active() and not c.lock.locked()]
        closed = [c for c in idle if c.closed]
        if closed:
            return closed[0]
        return idle[0] if idle else None

    async def flush(self) -> None:
        """Write every byte cached so far (waits for writes already in flight)."""
        await self._write_clusters(
            [c for c in self._clusters.values() if c.active() or c.lock.locked()]
        )

    async def _write_clusters(self, clusters: list[_CachedCluster]) -> None:
        """Write the pending bytes of ``clusters``; locks are taken in offset order (the
        only multi-lock acquisition), so writers of overlapping sets cannot deadlock."""
        if not clusters:
            await trio.lowlevel.checkpoint()
            return
        group = sorted(clusters, key=lambda c: c.offset)
        async with contextlib.AsyncExitStack() as stack:
            for c in group:
                await stack.enter_async_context(c.lock)
            try:
                for run in self._runs([c for c in group if c.active() and not c.dropped]):
                    await self._write_run(run)
            finally:
                self._room.unpark_all()
        for c in group:
            if c.closed and not c.active() and self._clusters.get(c.offset) is c:
                del self._clusters[c.offset]

    def _span(self, c: _CachedCluster) -> tuple[int, int]:
        """The byte range of a cluster a write covers: from the aligned block holding its
        first unwritten byte; to the cluster end when closed (its unused tail is
        zeros), else to the aligned end of its data."""
        a = self.alignment
        lo = max(c.base, c.flushed - c.flushed % a)
        hi = self.cluster_size if c.closed else min(self.cluster_size, -(-c.filled // a) * a)
        return lo, hi

    def _runs(self, clusters: list[_CachedCluster]) -> list[list[_CachedCluster]]:
        """Group clusters (sorted) whose spans are contiguous in the file."""
        runs: list[list[_CachedCluster]] = []
        end = -1
        for c in clusters:
            lo, hi = self._span(c)
            if runs and c.offset + lo == end:
                runs[-1].append(c)
            else:
                runs.append([c])
            end = c.offset + hi
        return runs

    async def _write_run(self, run: list[_CachedCluster]) -> None:
        spans = [self._span(c) for c in run]
        ends = [c.filled for c in run]
        data = b"".join(bytes(c.buf[lo:hi]) for c, (lo, hi) in zip(run, spans, strict=True))
        await self._file.pwrite(run[0].offset + spans[0][0], data)
        for c, end in zip(run, ends, strict=True):
            c.flushed = max(c.flushed, end)
            if c.closed:
                self.full_writes += 1
            else:
                self.partial_writes += 1
        self.writes += 1
        self.bytes_written += len(data)

    # ---- freeing -------------------------------------------------------------------

    async def drop(self, cluster_offset: int) -> None:
        """The cluster was freed: forget its bytes (after a write in flight finishes)."""
        c = self._clusters.pop(cluster_offset, None)
        if c is None:
            await trio.lowlevel.checkpoint()
            return
        c.dropped = True
        async with c.lock:
            pass
        self._room.unpark_all()

    # ---- reading -------------------------------------------------------------------

    def covers_any(self, host_offset: int, length: int) -> bool:
        cs = self.cluster_size
        first = host_offset - host_offset % cs
        return any(off in self._clusters for off in range(first, host_offset + length, cs))

    async def read(self, host_offset: int, length: int) -> bytes:
        """``length`` bytes from ``host_offset``: cached clusters from their buffers,
        the rest from the file (a compressed extent touches at most three clusters)."""
        cs = self.cluster_size
        out = bytearray(length)
        view = memoryview(out)
        pos = 0
        while pos < length:
            at = host_offset + pos
            cluster_offset = at - at % cs
            n = min(length - pos, cluster_offset + cs - at)
            c = self._clusters.get(cluster_offset)
            start = at - cluster_offset
            if c is not None and start + n > c.base:
                on_disk = max(0, c.base - start)  # the part before ``base`` is on disk
                if on_disk:
                    await self._file.pread_into(at, view[pos : pos + on_disk])
                view[pos + on_disk : pos + n] = c.buf[start + on_disk : start + n]
            else:
                await self._file.pread_into(at, view[pos : pos + n])
            pos += n
        await trio.lowlevel.checkpoint()
        return bytes(out)

    def statistics(self) -> dict[str, int]:
        return {
            "compress_cache_clusters": len(self._clusters),
            "compress_cache_active": self.active_count,
            "compress_cache_writes": self.writes,
            "compress_cache_full_writes": self.full_writes,
            "compress_cache_partial_writes": self.partial_writes,
            "compress_cache_bytes_written": self.bytes_written,
            "compress_cache_room_waits": self.room_waits,
        }
