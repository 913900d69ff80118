"""Compressed cluster writes for qcow2 (export setting ``compress = true``).

Design notes
------------
* Every write is cut at cluster boundaries.  A piece that covers a whole
  guest cluster (the image's last, partial cluster counts when the piece
  reaches the end of the disk; it is zero-padded like QEMU pads it) is
  compressed; the rest, and clusters that do not compress, take the normal
  write path (write.py), which already turns a compressed cluster it
  writes into part of into a normal one (decompress, merge, rewrite).
* Compression is what QEMU writes (qcow2-threads.c): a raw deflate stream
  (window 2^12, memLevel 9, default level) for zlib images, one zstd frame
  for zstd images.  A cluster is stored compressed only when the result is
  at most ``cluster_size - 1`` bytes, QEMU's bound
  (``qcow2_co_pwritev_compressed_task``); the L2 entry's sector count then
  always fits its field (qcow2.txt, "Compressed Clusters Descriptor").
* Compression runs in worker threads behind a ``trio.CapacityLimiter``
  (``compress_threads``, default 2): zlib and zstandard release the GIL, so
  one client's compressed writes never stall the event loop and other
  clients.  A request's clusters are split into one batch per worker.
* Host space comes from :class:`ByteAllocator` (QEMU ``qcow2_alloc_bytes``):
  extents are packed byte by byte into the current host cluster and may run
  on into the next cluster when the allocator hands out the contiguous one.
  Each compressed cluster holds one reference on every host cluster it
  touches, so refcounts stay exact and ``qemu-img check`` agrees.
* With the write cache (compress_cache.py; ``compress_cache_size`` bytes,
  0 disables it) an extent is allocated, cached and linked into its L2
  table in one metadata-locked step; the cache writes whole host clusters
  and is flushed before any L2 table reaches the file.  Without it, the
  extents of a request are allocated, written (contiguous ones as one
  write) and only then linked, like a normal allocating write.
* When a host cluster's refcount drops to zero (the last compressed
  cluster in it was overwritten, zeroed or discarded), the allocator stops
  filling it and the cache drops its bytes, before the cluster can be
  allocated again (:meth:`CompressedWriter.after_free`, called under the
  metadata lock).

Reference: qemu block/qcow2.c (qcow2_co_pwritev_compressed_task),
block/qcow2-threads.c (qcow2_zlib_compress, qcow2_zstd_compress),
block/qcow2-refcount.c (qcow2_alloc_bytes), block/qcow2-cluster.c
(qcow2_alloc_compressed_cluster_offset).
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import trio

from nbdserve.block.qcow2.compress_cache import CompressedWriteCache
from nbdserve.block.qcow2.structs import (
    COMPRESSED_SECTOR_SIZE,
    COMPRESSION_ZSTD,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
)
from nbdserve.errors import ConfigError, NoSpaceError

if TYPE_CHECKING:
    from nbdserve.block.file import FileBackend
    from nbdserve.block.qcow2 import Qcow2Driver
    from nbdserve.block.qcow2.cluster import Geometry
    from nbdserve.block.qcow2.refcount import Refcounts

DEFAULT_CACHE_BYTES = 4 * 1024 * 1024
DEFAULT_THREADS = 2
# qcow2.h QCOW_MAX_CLUSTER_OFFSET: host offsets must stay below 2^56
QCOW_MAX_CLUSTER_OFFSET = (1 << 56) - 1
_ZLIB_WBITS = -12  # raw deflate, 4 KiB window (QEMU)
_ZLIB_MEMLEVEL = 9


# ---- settings ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompressSettings:
    cache_size: int = DEFAULT_CACHE_BYTES  # bytes; 0 = no write cache
    threads: int = DEFAULT_THREADS
    level: int | None = None  # None: QEMU's (zlib 6, zstd 3)


def _as_bool(value: object, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "on", "yes"):
        return True
    if text in ("0", "false", "off", "no", ""):
        return False
    raise ConfigError(f"qcow2 setting {key} must be true or false, not {value!r}")


def _as_int(value: object, key: str, lowest: int) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise ConfigError(f"qcow2 setting {key} must be an integer, not {value!r}") from None
    if number < lowest:
        raise ConfigError(f"qcow2 setting {key} must be at least {lowest}, not {number}")
    return number


def parse_settings(settings: Mapping[str, object]) -> CompressSettings | None:
    """The compression settings of an export, or None when ``compress`` is off."""
    if not _as_bool(settings.get("compress", False), "compress"):
        return None
    level = settings.get("compress_level")
    return CompressSettings(
        cache_size=_as_int(
            settings.get("compress_cache_size", DEFAULT_CACHE_BYTES), "compress_cache_size", 0
        ),
        threads=_as_int(settings.get("compress_threads", DEFAULT_THREADS), "compress_threads", 1),
        level=None if level is None else _as_int(level, "compress_level", -1),
    )


# ---- compression (runs in worker threads) ------------------------------------------

_local = threading.local()


def _zstd_compressor(level: int) -> object:
    """One ZstdCompressor per thread and level (they are not thread-safe)."""
    import zstandard

    cache: dict[int, object] | None = getattr(_local, "zstd", None)
    if cache is None:
        cache = _local.zstd = {}
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level)
    return comp


def compress_cluster(
    data: memoryview | bytes, cluster_size: int, compression_type: int, level: int | None = None
) -> bytes | None:
    """The compressed form of one guest cluster, or None when it would not be smaller
    than ``cluster_size - 1`` bytes (then it is written as a normal cluster).

    ``data`` shorter than a cluster (the image's last one) is zero-padded.
    """
    if len(data) < cluster_size:
        data = bytes(data) + bytes(cluster_size - len(data))
    if compression_type == COMPRESSION_ZSTD:
        comp = _zstd_compressor(3 if level is None else level)
        out: bytes = comp.compress(data)  # type: ignore[attr-defined]
    else:
        z = zlib.compressobj(
            -1 if level is None else level, zlib.DEFLATED, _ZLIB_WBITS, _ZLIB_MEMLEVEL
        )
        out = z.compress(data) + z.flush()
    return out if len(out) <= cluster_size - 1 else None


def _compress_all(
    views: Sequence[memoryview], cluster_size: int, compression_type: int, level: int | None
) -> list[bytes | None]:
    return [compress_cluster(v, cluster_size, compression_type, level) for v in views]


def batches(count: int, workers: int) -> list[tuple[int, int]]:
    """Split ``count`` items into at most ``workers`` contiguous, even batches."""
    n = max(1, min(workers, count))
    bounds = [count * k // n for k in range(n + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(n) if bounds[k + 1] > bounds[k]]


class Compressor:
    """Compresses clusters in at most ``threads`` worker threads at a time."""

    def __init__(
        self, cluster_size: int, compression_type: int, threads: int, level: int | None
    ) -> None:
        self.cluster_size = cluster_size
        self.compression_type = compression_type
        self.threads = threads
        self.level = level
        self._limiter = trio.CapacityLimiter(threads)

    async def compress(self, views: Sequence[memoryview]) -> list[bytes | None]:
        parts = batches(len(views), self.threads)
        if not parts:
            await trio.lowlevel.checkpoint()
            return []
        results: list[list[bytes | None]] = [[] for _ in parts]

        async def run(k: int, lo: int, hi: int) -> None:
            results[k] = await trio.to_thread.run_sync(
                _compress_all,
                views[lo:hi],
                self.cluster_size,
                self.compression_type,
                self.level,
                limiter=self._limiter,
            )

        if len(parts) == 1:
            await run(0, *parts[0])
        else:
            async with trio.open_nursery() as nursery:
                for k, (lo, hi) in enumerate(parts):
                    nursery.start_soon(run, k, lo, hi)
        return [r for batch in results for r in batch]


# ---- L2 entries ---------------------------------------------------------------------------


def compressed_l2_entry(g: Geometry, host_offset: int, length: int) -> int:
    """The L2 entry of a compressed cluster of ``length`` bytes at ``host_offset``:
    the offset, and the number of 512-byte sectors after the first one it touches."""
    sectors = (host_offset + length - 1) // COMPRESSED_SECTOR_SIZE - (
        host_offset // COMPRESSED_SECTOR_SIZE
    )
    assert 0 <= sectors <= g.csize_mask
    assert host_offset <= g.cluster_offset_mask
    return QCOW_OFLAG_COMPRESSED | (sectors << g.csize_shift) | host_offset


# ---- byte allocation ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AllocPlan:
    """How the next extent will be placed (decided under the metadata lock)."""

    in_current: bool  # fits in the current cluster
    may_span: bool  # may start in the current cluster and run into a new contiguous one


class ByteAllocator:
    """QEMU's qcow2_alloc_bytes: byte-granular space for compressed extents.

    Caller holds the driver's metadata lock.  ``current`` is the host cluster
    being filled and ``used`` the bytes of it handed out; every extent adds
    one reference to each host cluster it touches.
    """

    def __init__(self, refcounts: Refcounts, g: Geometry, cache: CompressedWriteCache | None):
        self._refcounts = refcounts
        self._g = g
        self._cache = cache
        self.current: int | None = None
        self.used = 0
        self._limit = min(g.cluster_offset_mask, QCOW_MAX_CLUSTER_OFFSET)

    async def _can_share(self, cluster_offset: int) -> bool:
        """A cluster can take one more reference (refcount_bits=1 images never share)."""
        count = await self._refcounts.get(cluster_offset >> self._g.cluster_bits)
        return count < self._refcounts.max_refcount

    async def plan(self, size: int) -> AllocPlan:
        cs = self._g.cluster_size
        assert 0 < size < cs
        if self.current is None or not await self._can_share(self.current):
            return AllocPlan(False, False)
        fits = self.used + size <= cs
        return AllocPlan(fits, not fits and self.used < cs)

    def clusters_touched(self, plan: AllocPlan) -> tuple[int | None, int]:
        """(current cluster if the extent may use it, number of new clusters)."""
        if plan.in_current:
            return self.current, 0
        return (self.current if plan.may_span else None), 1

    async def allocate(self, size: int, plan: AllocPlan, data: bytes | None = None) -> int:
        """Host offset of ``size`` new bytes placed as ``plan`` says.

        With a cache, ``data`` (the extent) is appended to it before the cluster
        it fills or leaves is closed."""
        closing: list[int] = []
        offset = await self._place(size, plan, closing)
        if self._cache is not None:
            assert data is not None
            self._cache.append(offset, data)
            for cluster_offset in closing:
                self._cache.close(cluster_offset)
        return offset

    async def _place(self, size: int, plan: AllocPlan, closing: list[int]) -> int:
        cb = self._g.cluster_bits
        cs = self._g.cluster_size
        refcounts = self._refcounts
        if plan.in_current:
            assert self.current is not None
            offset = self.current + self.used
            await refcounts.update(self.current >> cb, 1, 1)
            self.used += size
        else:
            new = await refcounts.allocate(1)
            if new + cs - 1 > self._limit:
                await refcounts.update(new >> cb, 1, -1)
                raise NoSpaceError("the image file is too large for compressed clusters")
            if plan.may_span and self.current is not None and new == self.current + cs:
                offset = self.current + self.used
                head = cs - self.used  # the extent's bytes in the current cluster
                await refcounts.update(self.current >> cb, 1, 1)
                closing.append(self.current)
                self.current, self.used = new, size - head
            else:
                if self.current is not None:
                    closing.append(self.current)
                offset, self.current, self.used = new, new, size
        if self.used == cs:
            closing.append(self.current)
            self.current, self.used = None, 0
        return offset

    def forget(self, cluster_offset: int) -> None:
        """The cluster was freed: never fill it again."""
        if self.current == cluster_offset:
            self.current, self.used = None, 0


# ---- the driver-side state ---------------------------------------------------------------


class CompressedWriter:
    """Everything ``compress = true`` adds to one open qcow2 image."""

    def __init__(
        self,
        file: FileBackend,
        refcounts: Refcounts,
        g: Geometry,
        compression_type: int,
        settings: CompressSettings,
    ) -> None:
        self.g = g
        self.settings = settings
        self.refcounts = refcounts
        self.compressor = Compressor(
            g.cluster_size, compression_type, settings.threads, settings.level
        )
        self.cache = (
            CompressedWriteCache(file, g.cluster_size, settings.cache_size)
            if settings.cache_size
            else None
        )
        self.allocator = ByteAllocator(refcounts, g, self.cache)
        self.compressed_clusters = 0
        self.normal_clusters = 0
        self.bytes_in = 0
        self.bytes_out = 0

    def is_full_cluster(self, offset: int, length: int, disk_size: int) -> bool:
        """Whether a write of [offset, +length) covers one whole guest cluster."""
        cs = self.g.cluster_size
        return offset % cs == 0 and (length == cs or offset + length == disk_size)

    def new_active(self, plan: AllocPlan) -> int:
        """Clusters an extent placed by ``plan`` may newly make active in the cache."""
        assert self.cache is not None
        current, fresh = self.allocator.clusters_touched(plan)
        return fresh + (current is not None and not self.cache.is_active(current))

    async def flush_data(self) -> None:
        """Write every cached extent (before L2 tables, refcounts and sync)."""
        if self.cache is not None:
            await self.cache.flush()
        else:
            await trio.lowlevel.checkpoint()

    async def after_free(self, host_offset: int, length: int) -> None:
        """References to [host_offset, +length) were dropped (metadata lock held):
        clusters left unreferenced leave the allocator and the cache."""
        cb = self.g.cluster_bits
        first, last = host_offset >> cb, (host_offset + length - 1) >> cb
        for index in range(first, last + 1):
            if await self.refcounts.get(index) == 0:
                self.allocator.forget(index << cb)
                if self.cache is not None:
                    await self.cache.drop(index << cb)

    async def read_raw(self, file: FileBackend, host_offset: int, length: int) -> bytes | None:
        """The bytes of a compressed extent if some are still only in the cache."""
        cache = self.cache
        if cache is None or not cache.covers_any(host_offset, length):
            return None
        return await cache.read(host_offset, length)

    def statistics(self) -> dict[str, int]:
        stats = {
            "compressed_clusters_written": self.compressed_clusters,
            "incompressible_clusters_written": self.normal_clusters,
            "compress_bytes_in": self.bytes_in,
            "compress_bytes_out": self.bytes_out,
        }
        if self.cache is not None:
            stats.update(self.cache.statistics())
        return stats


# ---- the write path -------------------------------------------------------------------------


def split_clusters(
    guest: int, length: int, cluster_size: int, disk_size: int
) -> list[tuple[int, int, bool]]:
    """(start, end, whole cluster) for each guest cluster [guest, +length) touches."""
    out = []
    pos = guest
    end = guest + length
    while pos < end:
        base = pos - pos % cluster_size
        hi = min(end, base + cluster_size)
        whole = pos == base and (hi == base + cluster_size or hi == disk_size)
        out.append((pos, hi, whole))
        pos = hi
    return out


def _normal_ranges(pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge adjacent guest ranges (sorted) so the normal path sees few, large writes."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(pieces):
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


async def write_span(drv: Qcow2Driver, guest: int, mv: memoryview) -> None:
    """Write ``mv`` at ``guest`` (within one L2 table's span), compressing whole clusters.

    The caller holds the range lock of every cluster touched.
    """
    from nbdserve.block.qcow2 import write

    w = drv._compress
    assert w is not None
    cs = drv.g.cluster_size
    pieces = split_clusters(guest, mv.nbytes, cs, drv.size)
    whole = [(lo, hi) for lo, hi, full in pieces if full]
    payloads = await w.compressor.compress([mv[lo - guest : hi - guest] for lo, hi in whole])
    normal = [(lo, hi) for lo, hi, full in pieces if not full]
    items: list[tuple[int, bytes]] = []
    for (lo, hi), payload in zip(whole, payloads, strict=True):
        if payload is None:
            normal.append((lo, hi))
            w.normal_clusters += 1
        else:
            items.append((lo, payload))
            w.compressed_clusters += 1
            w.bytes_in += hi - lo
            w.bytes_out += len(payload)
    for lo, hi in _normal_ranges(normal):
        await write.write_span(drv, lo, mv[lo - guest : hi - guest])
    if not items:
        return
    l1i = guest >> drv.g.l2_span_bits
    with trio.CancelScope(shield=True):
        if w.cache is not None:
            await _commit_cached(drv, w, l1i, items)
        else:
            await _commit_uncached(drv, w, l1i, items)


def _set_entry(drv: Qcow2Driver, table: np.ndarray, guest: int, entry: int) -> int:
    """Point the L2 entry of ``guest``'s cluster at a compressed extent; return the old
    entry if it held a reference to drop (0 otherwise)."""
    g = drv.g
    idx = (guest >> g.cluster_bits) & (g.l2_entries - 1)
    if g.extended_l2:
        old = int(table[2 * idx])
        table[2 * idx] = np.uint64(entry)
        table[2 * idx + 1] = np.uint64(0)  # compressed clusters have no subclusters
    else:
        old = int(table[idx])
        table[idx] = np.uint64(entry)
    return old if old & (QCOW_OFLAG_COMPRESSED | L2E_OFFSET_MASK) else 0


async def _commit_cached(
    drv: Qcow2Driver, w: CompressedWriter, l1i: int, items: list[tuple[int, bytes]]
) -> None:
    """Allocate, cache and link each extent in one locked step, keeping the cache bound."""
    from nbdserve.block.qcow2.write import _drop_references, l2_for_write

    cache = w.cache
    assert cache is not None
    done = 0
    while done < len(items):
        need = 0
        async with drv._meta:
            l2_offset, table = await l2_for_write(drv, l1i)
            frees = []
            try:
                while done < len(items):
                    guest, payload = items[done]
                    plan = await w.allocator.plan(len(payload))
                    need = w.new_active(plan)
                    if not cache.has_room(need):
                        break
                    host = await w.allocator.allocate(len(payload), plan, payload)
                    entry = compressed_l2_entry(drv.g, host, len(payload))
                    frees.append(_set_entry(drv, table, guest, entry))
                    done += 1
            finally:  # keep what was linked even if an allocation failed (ENOSPC)
                drv.cmap.l2_cache.mark_dirty(l2_offset, table)
                await _drop_references(drv, [e for e in frees if e])
        if done < len(items):
            await cache.make_room(need)
    await cache.write_closed()


async def _commit_uncached(
    drv: Qcow2Driver, w: CompressedWriter, l1i: int, items: list[tuple[int, bytes]]
) -> None:
    """Allocate every extent, write them, then link them (a normal allocating write)."""
    from nbdserve.block.qcow2.write import _drop_references, l2_for_write

    hosts: list[int] = []
    try:
        async with drv._meta:
            for _, payload in items:
                plan = await w.allocator.plan(len(payload))
                hosts.append(await w.allocator.allocate(len(payload), plan))
        await _write_extents(drv.data_file, hosts, [p for _, p in items[: len(hosts)]])
    except BaseException:
        async with drv._meta:
            for host, (_, payload) in zip(hosts, items, strict=False):
                await drv.refcounts.free_bytes(host, len(payload))
                await w.after_free(host, len(payload))
        raise
    async with drv._meta:
        l2_offset, table = await l2_for_write(drv, l1i)
        frees = [
            _set_entry(drv, table, guest, compressed_l2_entry(drv.g, host, len(payload)))
            for host, (guest, payload) in zip(hosts, items, strict=True)
        ]
        drv.cmap.l2_cache.mark_dirty(l2_offset, table)
        await _drop_references(drv, [e for e in frees if e])


async def _write_extents(file: FileBackend, hosts: list[int], payloads: list[bytes]) -> None:
    """Write extents, joining those that follow each other in the file into one write."""
    run_start = -1
    run: list[bytes] = []
    for host, payload in zip(hosts, payloads, strict=True):
        if run and run_start + sum(map(len, run)) == host:
            run.append(payload)
            continue
        if run:
            await file.pwrite(run_start, b"".join(run))
        run_start, run = host, [payload]
    if run:
        await file.pwrite(run_start, b"".join(run))
