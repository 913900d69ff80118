"""qcow2 write paths: allocating writes with COW, zeroing, discard, preallocation.

Design notes
------------
* Every function here runs with the caller holding the range lock for the
  clusters it touches (``Qcow2Driver._ranges``), so the L2 entries of those
  clusters cannot change under it; the metadata lock is taken only around
  table and allocator work.
* A write is planned per cluster from a snapshot of its L2 entry: either the
  bytes go in place (allocated, COPIED, not compressed; with extended L2 all
  touched subclusters already allocated), or a *fill range* of the cluster is
  written to its target host cluster (reused when allocated and COPIED, else
  newly allocated).  The fill range covers what must be rewritten: the whole
  cluster with standard L2 entries; the touched subclusters, plus every
  allocated subcluster of a shared cluster, with extended L2.  Bytes of the
  fill range outside the request are COW data read through the normal read
  path (backing file, zeros, the old cluster, or its decompressed contents).
* Order of a commit (QEMU ``qcow2_alloc_cluster_link_l2``): allocate (the
  refcount increments are cached and reach the file before any L2 table,
  cache.py), write the data, set the L2 entries, then drop references to old
  clusters (decrements wait for the L2 flush, refcount.py).  The commit is
  shielded from cancellation once it started.

Reference: qemu block/qcow2-cluster.c (handle_copied, handle_alloc,
perform_cow, zero_in_l2_slice, discard_in_l2_slice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import trio

from nbdserve.block.qcow2.structs import (
    L2E_OFFSET_MASK,
    NP_COMPRESSED,
    NP_COPIED,
    NP_L2E_OFFSET_MASK,
    NP_ZERO,
    QCOW_L2_BITMAP_ALL_ALLOC,
    QCOW_L2_BITMAP_ALL_ZEROES,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
)
from nbdserve.errors import CorruptImageError, NotSupportedError

if TYPE_CHECKING:
    from nbdserve.block.qcow2 import Qcow2Driver

_ZEROS = bytes(1 << 20)


@dataclass(slots=True)
class _Plan:
    """What one cluster of a write needs."""

    index: int  # L2 index
    fill_lo: int  # byte range of the cluster that will be written
    fill_hi: int
    write_lo: int  # the request's part of the cluster
    write_hi: int
    host: int  # target host cluster (-1: allocate)
    new_entry: int  # QCOW_OFLAG_* bits to set besides the offset
    new_bitmap: int
    free_entry: int  # old entry whose reference to drop, 0 for none
    changes_meta: bool
    buf: bytearray | None = None


def _entry(drv: Qcow2Driver, table: np.ndarray | None, idx: int) -> tuple[int, int]:
    if table is None:
        return 0, 0
    if drv.g.extended_l2:
        return int(table[2 * idx]), int(table[2 * idx + 1])
    return int(table[idx]), 0


def _plan_cluster(drv: Qcow2Driver, idx: int, entry: int, bitmap: int, wlo: int, whi: int) -> _Plan:
    g = drv.g
    cs = g.cluster_size
    external = drv.data_file is not drv.file
    compressed = bool(entry & QCOW_OFLAG_COMPRESSED)
    host = 0 if compressed else entry & L2E_OFFSET_MASK
    copied = bool(entry & QCOW_OFLAG_COPIED)
    present = not compressed and (bool(host) or (external and copied))
    reuse = present and (external or copied)
    limit = drv.cmap.host_limit
    if reuse and limit is not None and host >= limit:
        # as on the read path: an in-place write there would grow the file to
        # wherever the (untrusted) entry points
        raise CorruptImageError(f"data cluster at {host:#x} lies past the end of the image file")
    free_entry = entry if (not reuse and (host or compressed) and not external) else 0
    if not g.extended_l2:
        zero_flag = g.has_zero_flag and bool(entry & QCOW_OFLAG_ZERO) and not compressed
        if reuse and not zero_flag:
            return _Plan(idx, wlo, whi, wlo, whi, host, 0, 0, 0, False)
        target = host if reuse else -1
        return _Plan(idx, 0, cs, wlo, whi, target, QCOW_OFLAG_COPIED, 0, free_entry, True)
    us_bits = g.unit_bits
    us = 1 << us_bits
    ulo, uhi = wlo >> us_bits, (whi + us - 1) >> us_bits
    touched = ((1 << uhi) - 1) ^ ((1 << ulo) - 1)
    alloc = bitmap & QCOW_L2_BITMAP_ALL_ALLOC
    zero = bitmap >> 32
    if compressed:
        return _Plan(
            idx, 0, cs, wlo, whi, -1, QCOW_OFLAG_COPIED, QCOW_L2_BITMAP_ALL_ALLOC, free_entry, True
        )
    new_bitmap = (alloc | touched) | ((zero & ~touched & QCOW_L2_BITMAP_ALL_ALLOC) << 32)
    if reuse:
        if touched & ~alloc == 0:
            return _Plan(idx, wlo, whi, wlo, whi, host, 0, 0, 0, False)
        return _Plan(
            idx, ulo * us, uhi * us, wlo, whi, host, QCOW_OFLAG_COPIED, new_bitmap, 0, True
        )
    copy = alloc & ~touched if present else 0
    units = touched | copy
    lo_unit = (units & -units).bit_length() - 1
    hi_unit = units.bit_length()
    return _Plan(
        idx,
        lo_unit * us,
        hi_unit * us,
        wlo,
        whi,
        -1,
        QCOW_OFLAG_COPIED,
        new_bitmap,
        free_entry,
        True,
    )


async def write_span(drv: Qcow2Driver, guest: int, mv: memoryview) -> None:
    """Write ``mv`` at ``guest``; the range lies within one L2 table's span."""
    g = drv.g
    cs = g.cluster_size
    cb = g.cluster_bits
    n = mv.nbytes
    l1i = guest >> g.l2_span_bits
    c_first = guest >> cb
    c_last = (guest + n - 1) >> cb
    async with drv._meta:
        table = await drv.cmap.l2_table(l1i)
        plans = []
        for c in range(c_first, c_last + 1):
            base = c << cb
            entry, bitmap = _entry(drv, table, c & (g.l2_entries - 1))
            wlo = max(guest, base) - base
            whi = min(guest + n, base + cs) - base
            plans.append(_plan_cluster(drv, c & (g.l2_entries - 1), entry, bitmap, wlo, whi))
    await _read_cow(drv, plans, guest, mv, l1i)
    if not any(p.changes_meta for p in plans):
        await _write_pieces(drv, plans, guest, mv, l1i)
        return
    with trio.CancelScope(shield=True):
        await _commit_allocating_write(drv, plans, guest, mv, l1i)


async def _read_cow(
    drv: Qcow2Driver, plans: list[_Plan], guest: int, mv: memoryview, l1i: int
) -> None:
    """Build the buffers of clusters whose fill range is wider than the request."""
    span_base = l1i << drv.g.l2_span_bits
    cb = drv.g.cluster_bits
    for p in plans:
        if p.fill_lo == p.write_lo and p.fill_hi == p.write_hi:
            continue
        base = span_base + (p.index << cb)
        buf = bytearray(p.fill_hi - p.fill_lo)
        view = memoryview(buf)
        if p.write_lo > p.fill_lo:
            await drv.readinto(base + p.fill_lo, view[: p.write_lo - p.fill_lo])
        if p.fill_hi > p.write_hi:
            await drv.readinto(base + p.write_hi, view[p.write_hi - p.fill_lo :])
        src = base + p.write_lo - guest
        view[p.write_lo - p.fill_lo : p.write_hi - p.fill_lo] = mv[
            src : src + p.write_hi - p.write_lo
        ]
        p.buf = buf


async def _commit_allocating_write(
    drv: Qcow2Driver, plans: list[_Plan], guest: int, mv: memoryview, l1i: int
) -> None:
    g = drv.g
    cb = g.cluster_bits
    external = drv.data_file is not drv.file
    span_base = l1i << g.l2_span_bits
    new = [p for p in plans if p.changes_meta and p.host < 0]
    async with drv._meta:
        l2_offset, _ = await l2_for_write(drv, l1i)
        if new:
            if external:
                for p in new:
                    p.host = span_base + (p.index << cb)
            else:
                first = await drv.refcounts.allocate(len(new))
                for i, p in enumerate(new):
                    p.host = first + (i << cb)
    try:
        await _write_pieces(drv, plans, guest, mv, l1i)
    except BaseException:
        if new and not external:
            async with drv._meta:
                for p in new:
                    await drv.refcounts.update(p.host >> cb, 1, -1)
        raise
    async with drv._meta:
        table = await drv.cmap.l2_cache.get(l2_offset)
        for p in plans:
            if not p.changes_meta:
                continue
            value = p.host | p.new_entry
            if g.extended_l2:
                table[2 * p.index] = np.uint64(value)
                table[2 * p.index + 1] = np.uint64(p.new_bitmap)
            else:
                table[p.index] = np.uint64(value)
        drv.cmap.l2_cache.mark_dirty(l2_offset, table)
        await _drop_references(drv, [p.free_entry for p in plans if p.free_entry])


async def _write_pieces(
    drv: Qcow2Driver, plans: list[_Plan], guest: int, mv: memoryview, l1i: int
) -> None:
    """Write every plan's fill range, merging neighbours that are contiguous on both sides."""
    span_base = l1i << drv.g.l2_span_bits
    cb = drv.g.cluster_bits
    pending_host = pending_lo = pending_hi = -1
    for p in plans:
        host = p.host + p.fill_lo
        if p.buf is not None:
            if pending_lo >= 0:
                await drv.data_file.pwrite(pending_host, mv[pending_lo:pending_hi])
                pending_lo = -1
            await drv.data_file.pwrite(host, p.buf)
            continue
        src_lo = span_base + (p.index << cb) + p.fill_lo - guest
        src_hi = src_lo + p.fill_hi - p.fill_lo
        if (
            pending_lo >= 0
            and pending_hi == src_lo
            and pending_host + (src_lo - pending_lo) == host
        ):
            pending_hi = src_hi
            continue
        if pending_lo >= 0:
            await drv.data_file.pwrite(pending_host, mv[pending_lo:pending_hi])
        pending_host, pending_lo, pending_hi = host, src_lo, src_hi
    if pending_lo >= 0:
        await drv.data_file.pwrite(pending_host, mv[pending_lo:pending_hi])
    drv._update_limits()


async def _drop_references(drv: Qcow2Driver, entries: list[int]) -> None:
    """Drop this L2's references to old clusters (caller holds the metadata lock)."""
    if not entries or drv.data_file is not drv.file:
        return
    g = drv.g
    for entry in entries:
        if entry & QCOW_OFLAG_COMPRESSED:
            start, length = g.compressed_clusters(entry)
            drv._decompressed.pop(entry, None)
            drv.compressed_frees += 1
            await drv.refcounts.free_bytes(start, length)
            if drv._compress is not None:  # freed clusters leave the compressed-write cache
                await drv._compress.after_free(start, length)
        else:
            host = entry & L2E_OFFSET_MASK
            await drv.refcounts.update(host >> g.cluster_bits, 1, -1)


async def l2_for_write(drv: Qcow2Driver, l1i: int) -> tuple[int, np.ndarray]:
    """A writable (COPIED) L2 table for ``l1i``: allocated or copied as needed.

    Caller holds the metadata lock.  Reference: qemu qcow2-cluster.c l2_allocate.
    """
    cmap = drv.cmap
    if l1i >= len(cmap.l1):
        raise CorruptImageError(f"L1 index {l1i} beyond the L1 table")
    old = cmap.l2_offset(l1i)
    if old and cmap.l1_copied(l1i):
        return old, await cmap.l2_cache.get(old)
    with trio.CancelScope(shield=True):
        new = await drv.refcounts.allocate(1)
        if old:
            table = (await cmap.l2_cache.get(old)).copy()
        else:
            table = np.zeros(drv.g.cluster_size // 8, dtype=">u8")
        await drv._file.pwrite(new, table.data.cast("B"))
        drv._update_limits()
        await cmap.l2_cache.put(new, table, dirty=False)
        # the new table's refcount, then the table, then the L1 entry pointing at it
        await drv.refcounts.flush()
        await drv.write_l1_entry(l1i, new | QCOW_OFLAG_COPIED)
        if old:
            cmap.l2_cache.forget(old)
            await drv.refcounts.update(old >> drv.g.cluster_bits, 1, -1)
    return new, table


# ---- zeroing and discard ---------------------------------------------------------------


async def zero_range(
    drv: Qcow2Driver, offset: int, length: int, *, may_unmap: bool, fast: bool
) -> None:
    """Make [offset, +length) read as zeros (range lock held)."""
    g = drv.g
    if not g.has_zero_flag and drv.backing is not None:
        raise NotSupportedError("qcow2 v2 images with a backing file cannot mark zeros")
    unit = 1 << g.unit_bits
    end = offset + length
    lo = -(-offset // unit) * unit
    hi = end // unit * unit
    if hi <= lo:
        lo = hi = end
    partial = [(offset, lo - offset), (hi, end - hi)] if lo < hi else [(offset, length)]
    partial = [(o, n) for o, n in partial if n > 0]
    if partial and fast:
        raise NotSupportedError("zeroing part of a cluster would write data")
    for o, n in partial:
        await _write_zero_data(drv, o, n)
    pos = lo
    span_bits = g.l2_span_bits
    while pos < hi:
        span_end = min(hi, ((pos >> span_bits) + 1) << span_bits)
        with trio.CancelScope(shield=True):
            leftovers = await _zero_units(drv, pos, span_end, may_unmap)
        for o, n in leftovers:
            await _write_zero_data(drv, o, n)
        pos = span_end


async def _write_zero_data(drv: Qcow2Driver, offset: int, length: int) -> None:
    pos = 0
    while pos < length:
        n = min(len(_ZEROS), length - pos)
        await drv._write_locked(offset + pos, memoryview(_ZEROS)[:n])
        pos += n


async def _zero_units(drv: Qcow2Driver, lo: int, hi: int, may_unmap: bool) -> list[tuple[int, int]]:
    """Mark whole units of one L2 span zero; return ranges that need data writes."""
    g = drv.g
    cb = g.cluster_bits
    l1i = lo >> g.l2_span_bits
    external = drv.data_file is not drv.file
    async with drv._meta:
        if drv.cmap.l2_offset(l1i) == 0 and drv.backing is None:
            return []  # unallocated without backing already reads as zeros
        l2_offset, table = await l2_for_write(drv, l1i)
        mask = g.l2_entries - 1
        c_lo, c_hi = lo >> cb, (hi - 1) >> cb
        full_lo = (lo + g.cluster_size - 1) >> cb  # first fully covered cluster
        full_hi = hi >> cb  # one past the last fully covered cluster
        frees: list[int] = []
        leftovers: list[tuple[int, int]] = []
        if full_hi > full_lo:
            frees += _zero_full_clusters(
                drv, table, full_lo & mask, full_hi - full_lo, may_unmap, external
            )
        for c in {c_lo, c_hi}:
            if full_lo <= c < full_hi:
                continue
            base = c << cb
            a, b = max(lo, base), min(hi, base + g.cluster_size)
            if not _zero_subclusters(drv, table, c & mask, a - base, b - base):
                leftovers.append((a, b - a))
        drv.cmap.l2_cache.mark_dirty(l2_offset, table)
        await _drop_references(drv, frees)
    return leftovers


def _zero_full_clusters(
    drv: Qcow2Driver,
    table: np.ndarray,
    first: int,
    count: int,
    may_unmap: bool,
    external: bool,
) -> list[int]:
    """Vectorised zero_in_l2_slice: returns the old entries to drop references of."""
    g = drv.g
    words = table.reshape(-1, 2)[:, 0] if g.extended_l2 else table
    entries = words[first : first + count].astype(np.uint64)
    compressed = (entries & NP_COMPRESSED) != 0
    hosts = np.where(compressed, np.uint64(0), entries & NP_L2E_OFFSET_MASK)
    copied = (entries & NP_COPIED) != 0
    present = ((hosts != 0) | (copied & external)) & ~compressed
    # v2 has no zero flag: zeroing there means deallocating
    keep = present & (copied | external) & (not may_unmap) & (g.has_zero_flag or g.extended_l2)
    if g.extended_l2:
        new = np.where(keep, hosts | NP_COPIED, np.uint64(0))
        bitmaps = table.reshape(-1, 2)[first : first + count, 1]
        bitmaps[:] = np.uint64(QCOW_L2_BITMAP_ALL_ZEROES)
    elif g.has_zero_flag:
        new = np.where(keep, hosts | NP_COPIED | NP_ZERO, NP_ZERO)
    else:
        new = np.zeros(count, dtype=np.uint64)
    dropped = (present & ~keep) | compressed
    words[first : first + count] = new
    if external:
        return []
    return [int(e) for e in entries[dropped]]


def _zero_subclusters(drv: Qcow2Driver, table: np.ndarray, idx: int, a: int, b: int) -> bool:
    """Set zero bits for whole subclusters [a, b) of one cluster; False if data is needed."""
    g = drv.g
    if not g.extended_l2:
        return False
    entry = int(table[2 * idx])
    if entry & QCOW_OFLAG_COMPRESSED:
        return False
    ub = g.unit_bits
    m = ((1 << (b >> ub)) - 1) ^ ((1 << (a >> ub)) - 1)
    bitmap = int(table[2 * idx + 1])
    alloc = bitmap & QCOW_L2_BITMAP_ALL_ALLOC & ~m
    zero = ((bitmap >> 32) | m) & QCOW_L2_BITMAP_ALL_ALLOC
    table[2 * idx + 1] = np.uint64(alloc | (zero << 32))
    return True


async def discard_range(drv: Qcow2Driver, offset: int, length: int) -> None:
    """Free whole clusters of [offset, +length) (QEMU discard_in_l2_slice)."""
    g = drv.g
    cs = g.cluster_size
    lo = -(-offset // cs) * cs
    hi = (offset + length) // cs * cs
    pos = lo
    span_bits = g.l2_span_bits
    while pos < hi:
        span_end = min(hi, ((pos >> span_bits) + 1) << span_bits)
        with trio.CancelScope(shield=True):
            await _discard_clusters(drv, pos, span_end)
        pos = span_end
    await trio.lowlevel.checkpoint()


async def _discard_clusters(drv: Qcow2Driver, lo: int, hi: int) -> None:
    g = drv.g
    cb = g.cluster_bits
    l1i = lo >> g.l2_span_bits
    external = drv.data_file is not drv.file
    async with drv._meta:
        if drv.cmap.l2_offset(l1i) == 0:
            return
        l2_offset, table = await l2_for_write(drv, l1i)
        first = (lo >> cb) & (g.l2_entries - 1)
        count = (hi - lo) >> cb
        words = table.reshape(-1, 2)[:, 0] if g.extended_l2 else table
        entries = words[first : first + count].astype(np.uint64)
        compressed = (entries & NP_COMPRESSED) != 0
        hosts = np.where(compressed, np.uint64(0), entries & NP_L2E_OFFSET_MASK)
        # with a backing file, freed clusters must not let old backing data show
        zero = drv.backing is not None and g.has_zero_flag
        if g.extended_l2:
            words[first : first + count] = 0
            bitmaps = table.reshape(-1, 2)[first : first + count, 1]
            bitmaps[:] = np.uint64(QCOW_L2_BITMAP_ALL_ZEROES if zero else 0)
        else:
            words[first : first + count] = NP_ZERO if zero else np.uint64(0)
        drv.cmap.l2_cache.mark_dirty(l2_offset, table)
        if not external:
            dropped = entries[(hosts != 0) | compressed]
            await _drop_references(drv, [int(e) for e in dropped])


# ---- preallocation ------------------------------------------------------------------------


async def preallocate_metadata(drv: Qcow2Driver) -> None:
    """Map every cluster of the image to a host cluster (data left unwritten).

    With extended L2 entries the subcluster bitmaps stay empty, as QEMU leaves
    them (qcow2_alloc_cluster_link_l2 skips the bitmap for preallocation): the
    clusters are mapped but read through to the backing file, or as zeros.
    """
    g = drv.g
    cb = g.cluster_bits
    external = drv.data_file is not drv.file
    n_clusters = -(-drv.size // g.cluster_size)
    end = 0
    async with drv._meta:
        for l1i in range(len(drv.cmap.l1)):
            first_c = l1i << g.l2_bits
            count = min(g.l2_entries, n_clusters - first_c)
            if count <= 0:
                break
            l2_offset, table = await l2_for_write(drv, l1i)
            if external:
                hosts = np.arange(first_c, first_c + count, dtype=np.uint64) << np.uint64(cb)
            else:
                start = await drv.refcounts.allocate(count)
                hosts = np.uint64(start) + (np.arange(count, dtype=np.uint64) << np.uint64(cb))
                end = max(end, start + (count << cb))
            values = hosts | NP_COPIED
            if g.extended_l2:
                pairs = table.reshape(-1, 2)
                pairs[:count, 0] = values
                pairs[:count, 1] = np.uint64(0)
            else:
                table[:count] = values
            drv.cmap.l2_cache.mark_dirty(l2_offset, table)
        if end > drv._file.size:
            await drv._file.truncate(end)
            drv._update_limits()
    await drv.flush()
