"""qcow2 guest-to-host mapping: index arithmetic, L2 classification, runs.

Design notes
------------
* Pure functions first: :class:`Geometry` holds the numbers derived from the
  header, and ``offset_to_l1_index`` & co. are QEMU's helpers, testable with
  hypothesis.
* :func:`classify` turns a slice of an L2 table into per-unit kinds and host
  offsets with numpy (a unit is a cluster, or a subcluster with extended L2
  entries), and :func:`units_to_runs` merges units into runs of one kind with
  contiguous host offsets.  No per-cluster Python loop.
* :class:`ClusterMap` owns the active L1 table and the L2 cache and answers
  ``map_runs(offset, length)``, the one primitive that ``readinto``,
  ``block_status`` and the write path use (QEMU ``qcow2_get_host_offset``).
  Stretches of empty L1 entries are found with numpy as well, so mapping a
  mostly-empty 16 TiB image costs per allocated L2 table, not per byte.
* Metadata found inconsistent here (misaligned offsets, L2 tables past the end
  of the file, invalid subcluster bitmaps) raises ``CorruptImageError`` for the
  affected request only.

Reference: qemu block/qcow2-cluster.c.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from nbdserve.block.qcow2.structs import (
    COMPRESSED_SECTOR_SIZE,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    NP_COMPRESSED,
    NP_COPIED,
    NP_L1E_OFFSET_MASK,
    NP_L2E_OFFSET_MASK,
    NP_ZERO,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
)
from nbdserve.errors import CorruptImageError

if TYPE_CHECKING:
    from nbdserve.block.qcow2.cache import TableCache


class RunKind(enum.IntEnum):
    """QEMU's QCow2SubclusterType, minus the distinctions reads do not need."""

    UNALLOCATED = 0  # defer to the backing file
    ZERO_PLAIN = 1  # reads as zeros, no host cluster
    ZERO_ALLOC = 2  # reads as zeros, host cluster kept
    NORMAL = 3  # data at host_offset
    COMPRESSED = 4  # compressed cluster starting at host_offset
    INVALID = 5  # both "allocated" and "zero" bits of a subcluster
    MISALIGNED = 6  # host cluster offset not cluster aligned


# the kinds as plain ints for numpy expressions: an IntEnum operand makes numpy
# probe it for array protocols through Enum's __getattr__, 2-2.5 µs per operation
# (timeit), some twenty operations per L2 table mapped
_K_UNALLOCATED = int(RunKind.UNALLOCATED)
_K_ZERO_PLAIN = int(RunKind.ZERO_PLAIN)
_K_ZERO_ALLOC = int(RunKind.ZERO_ALLOC)
_K_NORMAL = int(RunKind.NORMAL)
_K_COMPRESSED = int(RunKind.COMPRESSED)
_K_INVALID = int(RunKind.INVALID)
_K_MISALIGNED = int(RunKind.MISALIGNED)


@dataclass(frozen=True, slots=True)
class Geometry:
    """Numbers derived from the header that every mapping step needs."""

    cluster_bits: int
    extended_l2: bool
    has_zero_flag: bool  # v3 images
    # with an external data file host offset 0 is valid; COPIED then marks allocation
    external_data: bool = False

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_bits(self) -> int:
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def l2_entries(self) -> int:
        return 1 << self.l2_bits

    @property
    def l2_span_bits(self) -> int:
        """log2 of the guest bytes one L2 table maps."""
        return self.cluster_bits + self.l2_bits

    @property
    def unit_bits(self) -> int:
        """log2 of the mapping granularity (subcluster size with extended L2)."""
        return self.cluster_bits - 5 if self.extended_l2 else self.cluster_bits

    @property
    def units_per_cluster(self) -> int:
        return 32 if self.extended_l2 else 1

    @property
    def csize_shift(self) -> int:
        return 62 - (self.cluster_bits - 8)

    @property
    def csize_mask(self) -> int:
        return (1 << (self.cluster_bits - 8)) - 1

    @property
    def cluster_offset_mask(self) -> int:
        return (1 << self.csize_shift) - 1

    def compressed_extent(self, l2_entry: int) -> tuple[int, int]:
        """(host offset, bytes to read) of a compressed cluster (qcow2.txt)."""
        coffset = l2_entry & self.cluster_offset_mask
        sectors = ((l2_entry >> self.csize_shift) & self.csize_mask) + 1
        return coffset, sectors * COMPRESSED_SECTOR_SIZE - (coffset % COMPRESSED_SECTOR_SIZE)

    def compressed_clusters(self, l2_entry: int) -> tuple[int, int]:
        """(byte offset, byte length) whose clusters a compressed entry references."""
        coffset = l2_entry & self.cluster_offset_mask
        sectors = ((l2_entry >> self.csize_shift) & self.csize_mask) + 1
        start = coffset & ~(COMPRESSED_SECTOR_SIZE - 1)
        return start, sectors * COMPRESSED_SECTOR_SIZE


# ---- pure index arithmetic (QEMU names) -----------------------------------------------


def offset_to_l1_index(g: Geometry, offset: int) -> int:
    return offset >> g.l2_span_bits


def offset_to_l2_index(g: Geometry, offset: int) -> int:
    return (offset >> g.cluster_bits) & (g.l2_entries - 1)


def offset_into_cluster(g: Geometry, offset: int) -> int:
    return offset & (g.cluster_size - 1)


def offset_to_sc_index(g: Geometry, offset: int) -> int:
    return (offset >> g.unit_bits) & (g.units_per_cluster - 1)


def l2_span_start(g: Geometry, l1_index: int) -> int:
    return l1_index << g.l2_span_bits


# ---- classification ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    """A stretch of guest bytes that one layer maps the same way."""

    kind: RunKind
    guest_offset: int
    length: int
    host_offset: int = 0  # NORMAL/ZERO_ALLOC: host byte; COMPRESSED: the raw L2 entry
    l2_entry: int = 0

    @property
    def end(self) -> int:
        return self.guest_offset + self.length


def classify(
    g: Geometry, table: np.ndarray, first_unit: int, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kinds, host offsets and raw entries of ``count`` units of one L2 table.

    ``table`` is the L2 table as ``>u8`` words (two per entry with extended L2).
    Host offsets of NORMAL/ZERO_ALLOC units point at the unit itself; for
    COMPRESSED units the raw entry is returned instead.
    """
    if g.extended_l2:
        return _classify_extended(g, table, first_unit, count)
    entries = table[first_unit : first_unit + count].astype(np.uint64)
    offsets = entries & NP_L2E_OFFSET_MASK
    compressed = (entries & NP_COMPRESSED) != 0
    present = _present(g, entries, offsets)
    kinds = np.where(present, _K_NORMAL, _K_UNALLOCATED).astype(np.uint8)
    if g.has_zero_flag:
        zero = ((entries & NP_ZERO) != 0) & ~compressed
        kinds[zero] = np.where(present[zero], _K_ZERO_ALLOC, _K_ZERO_PLAIN)
    kinds[compressed] = _K_COMPRESSED
    _mark_misaligned(g, kinds, offsets)
    return kinds, offsets, entries


def _present(g: Geometry, entries: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Which entries have a host cluster (QEMU qcow2_get_subcluster_type)."""
    present: np.ndarray = offsets != 0
    if g.external_data:
        present |= (entries & NP_COPIED) != 0
    return present


def _mark_misaligned(g: Geometry, kinds: np.ndarray, offsets: np.ndarray) -> None:
    mapped = (kinds == _K_NORMAL) | (kinds == _K_ZERO_ALLOC)
    bad = mapped & ((offsets & np.uint64(g.cluster_size - 1)) != 0)
    if bad.any():
        kinds[bad] = _K_MISALIGNED


def _classify_extended(
    g: Geometry, table: np.ndarray, first_unit: int, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    first_cluster = first_unit >> 5
    last_cluster = (first_unit + count - 1) >> 5
    pairs = table[2 * first_cluster : 2 * last_cluster + 2].astype(np.uint64).reshape(-1, 2)
    units = np.arange(first_unit, first_unit + count, dtype=np.int64)
    local = units - (first_cluster << 5)
    ci = local >> 5
    sc = (local & 31).astype(np.uint64)
    entries = pairs[ci, 0]
    bitmaps = pairs[ci, 1]
    offsets = entries & NP_L2E_OFFSET_MASK
    compressed = (entries & NP_COMPRESSED) != 0
    alloc = ((bitmaps >> sc) & np.uint64(1)) != 0
    zero = ((bitmaps >> (sc + np.uint64(32))) & np.uint64(1)) != 0
    present = _present(g, entries, offsets)
    kinds = np.full(count, _K_UNALLOCATED, dtype=np.uint8)
    kinds[alloc] = _K_NORMAL
    kinds[zero] = np.where(present[zero], _K_ZERO_ALLOC, _K_ZERO_PLAIN)
    kinds[alloc & zero] = _K_INVALID
    kinds[compressed] = _K_COMPRESSED
    _mark_misaligned(g, kinds, offsets)
    hosts = offsets + (sc << np.uint64(g.unit_bits))
    return kinds, hosts, entries


def occupied_units(g: Geometry, table: np.ndarray, first: int, stop: int) -> tuple[int, int] | None:
    """[lo, hi) within units [first, stop) from the first to the last unit whose L2
    words are not all zero; None when every one is zero (all unallocated).

    Whether a word is zero does not depend on its byte order, so the big-endian
    table is viewed as native words (no byteswapped copy), and the ends come from
    argmax over a mask: half the cost of np.flatnonzero on a 8192-entry table.
    """
    words = table.view(np.uint64)
    if g.extended_l2:
        # a cluster's two words decide its 32 subclusters
        c0, c1 = first >> 5, (stop - 1) >> 5
        pairs = words[2 * c0 : 2 * c1 + 2].reshape(-1, 2)
        used = (pairs[:, 0] | pairs[:, 1]) != 0
        if not used.any():
            return None
        lo_c = c0 + int(used.argmax())
        hi_c = c0 + len(used) - int(used[::-1].argmax())
        return max(first, lo_c << 5), min(stop, hi_c << 5)
    used = words[first:stop] != 0
    if not used.any():
        return None
    return first + int(used.argmax()), stop - int(used[::-1].argmax())


def check_units(
    g: Geometry,
    kinds: np.ndarray,
    hosts: np.ndarray,
    l2_offset: int,
    host_limit: int | None,
    guest_base: int = 0,
) -> None:
    """Raise CorruptImageError for entries QEMU would also refuse.

    ``guest_base`` is the guest offset of the first unit: the error carries the
    guest offset of the first bad one (a READ reports it as ERROR_OFFSET).
    """

    def at(bad: np.ndarray) -> int:
        return guest_base + (int(np.flatnonzero(bad)[0]) << g.unit_bits)

    invalid = kinds == _K_INVALID
    if invalid.any():
        raise CorruptImageError(
            f"L2 table at {l2_offset:#x} has a subcluster both allocated and zero"
        ).at(at(invalid))
    bad = kinds == _K_MISALIGNED
    if bad.any():
        host = int(hosts[np.flatnonzero(bad)[0]])
        raise CorruptImageError(
            f"cluster allocation offset {host:#x} unaligned (L2 table at {l2_offset:#x})"
        ).at(at(bad))
    if host_limit is not None:
        beyond = (kinds == _K_NORMAL) & (hosts >= np.uint64(host_limit))
        if beyond.any():
            host = int(hosts[np.flatnonzero(beyond)[0]])
            raise CorruptImageError(
                f"data cluster at {host:#x} lies past the end of the image file "
                f"(L2 table at {l2_offset:#x})"
            ).at(at(beyond))


def units_to_runs(
    g: Geometry,
    kinds: np.ndarray,
    hosts: np.ndarray,
    entries: np.ndarray,
    guest_start: int,
    first_unit: int,
    *,
    hosts_matter: bool = True,
) -> list[Run]:
    """Merge classified units into runs (guest_start is the first unit's guest offset).

    With ``hosts_matter`` false (block status) only the kind splits runs: a
    fragmented stretch of data is one run, not one per cluster, and its runs
    carry no host offset or entry.
    """
    n = len(kinds)
    unit = 1 << g.unit_bits
    if n == 1:
        breaks = np.zeros(0, dtype=np.int64)
    elif not hosts_matter:
        breaks = np.flatnonzero(kinds[:-1] != kinds[1:]) + 1
    else:
        k0, k1 = kinds[:-1], kinds[1:]
        brk = k0 != k1
        mapped = (k1 == _K_NORMAL) | (k1 == _K_ZERO_ALLOC)
        brk |= mapped & (hosts[1:] != hosts[:-1] + np.uint64(unit))
        if (k1 == _K_COMPRESSED).any():
            clusters = np.arange(first_unit, first_unit + n) >> (g.cluster_bits - g.unit_bits)
            brk |= (k1 == _K_COMPRESSED) & (clusters[1:] != clusters[:-1])
        breaks = np.flatnonzero(brk) + 1
    starts = [0, *breaks.tolist()]
    ends = [*breaks.tolist(), n]
    out = []
    for s, e in zip(starts, ends, strict=True):
        kind = RunKind(int(kinds[s]))
        guest, length = guest_start + (s << g.unit_bits), (e - s) << g.unit_bits
        if not hosts_matter:
            out.append(Run(kind, guest, length))
            continue
        host = int(hosts[s]) if kind in (RunKind.NORMAL, RunKind.ZERO_ALLOC) else 0
        entry = int(entries[s]) if kind == RunKind.COMPRESSED else 0
        out.append(Run(kind, guest, length, host, entry))
    return out


def append_run(runs: list[Run], run: Run, *, hosts_matter: bool = True) -> None:
    """Append, merging with the previous run when nothing distinguishes them."""
    if runs and _mergeable(runs[-1], run, hosts_matter):
        last = runs[-1]
        runs[-1] = Run(last.kind, last.guest_offset, last.length + run.length, last.host_offset)
        return
    runs.append(run)


def _mergeable(last: Run, run: Run, hosts_matter: bool = True) -> bool:
    if last.end != run.guest_offset or last.kind != run.kind:
        return False
    if run.kind in (RunKind.UNALLOCATED, RunKind.ZERO_PLAIN) or not hosts_matter:
        return True
    return run.kind in (RunKind.NORMAL, RunKind.ZERO_ALLOC) and (
        last.host_offset + last.length == run.host_offset
    )


def clip_runs(runs: list[Run], start: int, end: int) -> list[Run]:
    out = []
    for r in runs:
        lo, hi = max(r.guest_offset, start), min(r.end, end)
        if hi <= lo:
            continue
        if lo == r.guest_offset and hi == r.end:
            out.append(r)
            continue
        host = (
            r.host_offset + (lo - r.guest_offset)
            if r.host_offset and r.kind != RunKind.COMPRESSED
            else r.host_offset
        )
        out.append(Run(r.kind, lo, hi - lo, host, r.l2_entry))
    return out


# ---- the mapping object ------------------------------------------------------------------


class ClusterMap:
    """The active L1 table and the L2 cache: guest offset -> runs.

    Callers that may load tables hold the driver's metadata lock; ``peek_*``
    helpers are synchronous and never load.
    """

    def __init__(
        self,
        g: Geometry,
        l1: np.ndarray,
        l1_offset: int,
        l2_cache: TableCache,
        size: int,
        l2_limit: int,
    ) -> None:
        self.g = g
        self.l1 = l1
        self.l1_offset = l1_offset
        self.l2_cache = l2_cache
        self.size = size
        # L2 tables must start below this host offset (the image file's end)
        self.l2_limit = l2_limit
        self.host_limit: int | None = None  # data clusters must start below this
        # the geometry's numbers as plain attributes for peek_host, the per-read
        # path: Geometry's properties recompute them on every access
        self._cluster_bits = g.cluster_bits
        self._cluster_mask = g.cluster_size - 1
        self._span_bits = g.l2_span_bits
        self._l2_index_mask = g.l2_entries - 1
        # work counters (statistics): what mapping cost, independent of the virtual size
        self.tables_mapped = 0  # L2 tables consulted by map_runs / peek_runs
        self.units_classified = 0  # L2 units (clusters or subclusters) looked at
        self.l1_gaps_skipped = 0  # stretches of empty L1 entries answered as one run

    def l2_offset(self, l1_index: int) -> int:
        if l1_index >= len(self.l1):
            return 0
        entry = int(self.l1[l1_index])
        offset = entry & L1E_OFFSET_MASK
        if offset % self.g.cluster_size:
            raise CorruptImageError(
                f"L2 table offset {offset:#x} (L1 index {l1_index}) is not cluster aligned"
            )
        if offset and offset >= self.l2_limit:
            raise CorruptImageError(
                f"L2 table at {offset:#x} (L1 index {l1_index}) lies past the end of the file"
            )
        return offset

    def l1_copied(self, l1_index: int) -> bool:
        return bool(int(self.l1[l1_index]) & QCOW_OFLAG_COPIED)

    async def l2_table(self, l1_index: int) -> np.ndarray | None:
        offset = self.l2_offset(l1_index)
        if not offset:
            return None
        return await self.l2_cache.get(offset)

    async def map_runs(self, offset: int, length: int, *, hosts_matter: bool = True) -> list[Run]:
        """Runs covering exactly [offset, offset+length) (clipped to the image size);
        ``hosts_matter`` as in :func:`units_to_runs`."""
        g = self.g
        end = min(offset + length, self.size)
        runs: list[Run] = []
        pos = offset
        while pos < end:
            pos = self._skip_unmapped(runs, pos, end)
            if pos >= end:
                break
            l1i = pos >> g.l2_span_bits
            span_end = min(end, (l1i + 1) << g.l2_span_bits)
            l2_off = self.l2_offset(l1i)
            table = await self.l2_cache.get(l2_off)
            for run in self._runs_in_table(l1i, l2_off, table, pos, span_end, hosts_matter):
                append_run(runs, run, hosts_matter=hosts_matter)
            pos = span_end
        return runs

    def peek_runs(self, offset: int, length: int, *, hosts_matter: bool = True) -> list[Run] | None:
        """map_runs from cached tables only: None when a table would have to be loaded.

        Synchronous, so it is atomic with respect to other tasks and needs no lock.
        """
        g = self.g
        end = min(offset + length, self.size)
        runs: list[Run] = []
        pos = offset
        while pos < end:
            pos = self._skip_unmapped(runs, pos, end)
            if pos >= end:
                break
            l1i = pos >> g.l2_span_bits
            span_end = min(end, (l1i + 1) << g.l2_span_bits)
            l2_off = self.l2_offset(l1i)
            table = self.l2_cache.peek(l2_off)
            if table is None:
                return None
            for run in self._runs_in_table(l1i, l2_off, table, pos, span_end, hosts_matter):
                append_run(runs, run, hosts_matter=hosts_matter)
            pos = span_end
        return runs

    def _skip_unmapped(self, runs: list[Run], pos: int, end: int) -> int:
        """Append one UNALLOCATED run for the empty L1 stretch at ``pos``; the new pos."""
        span_bits = self.g.l2_span_bits
        l1i = pos >> span_bits
        if self._l1_mapped(l1i):
            return pos
        span_end = min(end, self._next_mapped_l1(l1i, end) << span_bits)
        append_run(runs, Run(RunKind.UNALLOCATED, pos, span_end - pos))
        self.l1_gaps_skipped += 1
        return span_end

    def unmapped(self, offset: int, length: int) -> bool:
        """No L2 table covers any of [offset, offset+length): the whole range defers
        to the backing file.  One L1 lookup for ranges inside one L2 span."""
        span_bits = self.g.l2_span_bits
        l1i = offset >> span_bits
        last = (offset + length - 1) >> span_bits
        if last == l1i:
            return not self._l1_mapped(l1i)
        stop = min(last + 1, len(self.l1))
        return stop <= l1i or not (self.l1[l1i:stop] & NP_L1E_OFFSET_MASK).any()

    def _l1_mapped(self, l1i: int) -> bool:
        return l1i < len(self.l1) and bool(int(self.l1[l1i]) & L1E_OFFSET_MASK)

    def _next_mapped_l1(self, l1i: int, end: int) -> int:
        """First L1 index >= l1i with a table (or the index past ``end``)."""
        last = min(len(self.l1), ((end - 1) >> self.g.l2_span_bits) + 1)
        if last <= l1i + 1:  # the common case of a range inside one L2 span: no numpy
            return l1i + 1
        nz = (self.l1[l1i:last] & NP_L1E_OFFSET_MASK).nonzero()[0]
        return l1i + int(nz[0]) if len(nz) else last

    def _runs_in_table(
        self,
        l1i: int,
        l2_off: int,
        table: np.ndarray,
        start: int,
        end: int,
        hosts_matter: bool = True,
    ) -> list[Run]:
        """Runs of [start, end), which lies inside the span of L2 table ``l1i``."""
        g = self.g
        base = l1i << g.l2_span_bits
        first_unit = (start - base) >> g.unit_bits
        last_unit = (end - 1 - base) >> g.unit_bits
        self.tables_mapped += 1
        # only the units from the first to the last nonzero entry are classified:
        # all-zero entries are unallocated in every variant of the format, and a
        # sparse table (a few data clusters among 8192 entries) then costs one
        # numpy scan instead of some twenty whole-table operations
        occupied = occupied_units(g, table, first_unit, last_unit + 1)
        if occupied is None:
            return [Run(RunKind.UNALLOCATED, start, end - start)]
        lo, hi = occupied
        self.units_classified += hi - lo
        kinds, hosts, entries = classify(g, table, lo, hi - lo)
        guest_lo = base + (lo << g.unit_bits)
        check_units(g, kinds, hosts, l2_off, self.host_limit, guest_lo)
        runs = units_to_runs(g, kinds, hosts, entries, guest_lo, lo, hosts_matter=hosts_matter)
        unit = 1 << g.unit_bits
        if lo > first_unit:
            first = base + (first_unit << g.unit_bits)
            runs.insert(0, Run(RunKind.UNALLOCATED, first, guest_lo - first))
        if hi <= last_unit:
            runs.append(Run(RunKind.UNALLOCATED, base + hi * unit, (last_unit + 1 - hi) * unit))
        return clip_runs(runs, start, end)

    # ---- the synchronous fast path -----------------------------------------------------

    def peek_host(self, offset: int, length: int) -> int:
        """Host offset of [offset, +length) if it is plain allocated data in one cluster
        whose L2 table is cached; -1 otherwise (also for a range over several
        clusters: see peek_host_pieces).  Never blocks, never raises."""
        cmask = self._cluster_mask
        in_cluster = offset & cmask
        if in_cluster + length > cmask + 1:
            return -1
        l1i = offset >> self._span_bits
        l1 = self.l1
        if l1i >= len(l1):
            return -1
        # item(): a Python int without a numpy scalar in between
        l2_off: int = l1.item(l1i) & L1E_OFFSET_MASK
        if not l2_off or l2_off & cmask:
            return -1
        table = self.l2_cache.peek(l2_off)
        if table is None:
            return -1
        g = self.g
        idx = (offset >> self._cluster_bits) & self._l2_index_mask
        entry: int
        if g.extended_l2:
            entry = table.item(2 * idx)
            bitmap: int = table.item(2 * idx + 1)
            first = in_cluster >> g.unit_bits
            last = (in_cluster + length - 1) >> g.unit_bits
            want = ((1 << (last + 1)) - 1) ^ ((1 << first) - 1)
            if bitmap & want != want or (bitmap >> 32) & want:
                return -1
        else:
            entry = table.item(idx)
            if entry & 1:
                return -1
        if entry & QCOW_OFLAG_COMPRESSED:
            return -1
        host = entry & L2E_OFFSET_MASK
        if host & cmask:
            return -1
        if not host and not (g.external_data and entry & QCOW_OFLAG_COPIED):
            return -1
        limit = self.host_limit
        if limit is not None and host >= limit:
            return -1
        return host + in_cluster

    def peek_host_pieces(
        self, offset: int, length: int, *, copied: bool = False
    ) -> list[tuple[int, int]] | None:
        """Where [offset, +length) lies in the data file, as (host offset, length)
        pieces in guest order, when the range is plain data, fully allocated, inside
        one cached L2 table (and with ``copied``, every cluster has the COPIED flag:
        refcount 1, so it may be overwritten in place); None otherwise.
        Host-contiguous clusters make one piece, so a fragmented image costs a read
        per fragment, not per cluster."""
        hosts = self._peek_data_hosts(offset, length, copied)
        if hosts is None:
            return None
        cb = self._cluster_bits
        breaks = np.flatnonzero(hosts[1:] != hosts[:-1] + np.uint64(1 << cb)) + 1
        head = offset & self._cluster_mask
        pos = offset - head  # guest offset of the first cluster
        end = offset + length
        cuts = breaks.tolist()
        pieces = []
        for i, j in zip([0, *cuts], [*cuts, len(hosts)], strict=True):
            lo, hi = max(pos + (i << cb), offset), min(pos + (j << cb), end)
            pieces.append((int(hosts[i]) + lo - pos - (i << cb), hi - lo))
        return pieces

    def _peek_data_hosts(self, offset: int, length: int, copied: bool) -> np.ndarray | None:
        """Host offsets of the clusters under [offset, +length) when all of them are
        plain data, fully allocated, in one cached L2 table (and COPIED, with
        ``copied``); None otherwise."""
        g = self.g
        cb = g.cluster_bits
        span = g.l2_span_bits
        last = offset + length - 1
        l1i = offset >> span
        if last >> span != l1i or l1i >= len(self.l1):
            return None
        l2_off = int(self.l1[l1i]) & L1E_OFFSET_MASK
        if not l2_off or l2_off & ((1 << cb) - 1):
            return None
        table = self.l2_cache.peek(l2_off)
        if table is None:
            return None
        mask = g.l2_entries - 1
        first, n = (offset >> cb) & mask, (last >> cb) - (offset >> cb) + 1
        if g.extended_l2:
            pairs = table[2 * first : 2 * (first + n)]
            entries = pairs[0::2]
            if (pairs[1::2] != np.uint64(0xFFFFFFFF)).any():
                return None
        else:
            entries = table[first : first + n]
            if (entries & NP_ZERO).any():
                return None
        if (entries & NP_COMPRESSED).any():
            return None
        if copied and not (entries & NP_COPIED).all():
            return None
        hosts: np.ndarray = (entries & NP_L2E_OFFSET_MASK).astype(np.uint64)
        if (hosts & np.uint64((1 << cb) - 1)).any():
            return None
        # host 0 is data only in an external data file, with the COPIED flag
        if not hosts.all() and not (
            g.external_data and ((hosts != 0) | ((entries & NP_COPIED) != 0)).all()
        ):
            return None
        limit = self.host_limit
        if limit is not None and int(hosts.max()) >= limit:
            return None
        return hosts

    def peek_reads_zero(self, offset: int, length: int, *, no_backing: bool) -> bool:
        """True when [offset, +length) inside one cluster is known to read as zeros from
        cached metadata alone (zero flags, or unallocated without a backing file)."""
        g = self.g
        cb = g.cluster_bits
        in_cluster = offset & ((1 << cb) - 1)
        if in_cluster + length > (1 << cb):
            return False
        l1i = offset >> g.l2_span_bits
        if l1i >= len(self.l1):
            return False
        l2_off = int(self.l1[l1i]) & L1E_OFFSET_MASK
        if not l2_off:
            return no_backing
        table = self.l2_cache.peek(l2_off)
        if table is None:
            return False
        idx = (offset >> cb) & ((1 << g.l2_bits) - 1)
        if g.extended_l2:
            entry = int(table[2 * idx])
            if entry & QCOW_OFLAG_COMPRESSED:
                return False
            bitmap = int(table[2 * idx + 1])
            first = in_cluster >> g.unit_bits
            last = (in_cluster + length - 1) >> g.unit_bits
            want = ((1 << (last + 1)) - 1) ^ ((1 << first) - 1)
            if bitmap & want:  # some unit allocated
                return False
            return no_backing or (bitmap >> 32) & want == want
        entry = int(table[idx])
        if entry & QCOW_OFLAG_COMPRESSED:
            return False
        if g.has_zero_flag and entry & QCOW_OFLAG_ZERO:
            return True
        if entry & L2E_OFFSET_MASK or (g.external_data and entry & QCOW_OFLAG_COPIED):
            return False
        return no_backing

    def peek_all_unallocated(self, offset: int, length: int) -> bool:
        """True when cached metadata shows every cluster of [offset, +length), inside
        one L2 span, unallocated in this layer: no L2 table, or all-zero entries
        (no data, no zero flag, no compression in any variant of the format)."""
        span = self._span_bits
        l1i = offset >> span
        if (offset + length - 1) >> span != l1i:
            return False
        if not self._l1_mapped(l1i):
            return True
        l2_off = self.l1.item(l1i) & L1E_OFFSET_MASK
        if l2_off & self._cluster_mask:
            return False  # corrupt: the slow path reports it
        table = self.l2_cache.peek(l2_off)
        if table is None:
            return False
        g = self.g
        first = (offset >> g.unit_bits) & ((1 << (span - g.unit_bits)) - 1)
        last = ((offset + length - 1) >> g.unit_bits) & ((1 << (span - g.unit_bits)) - 1)
        return occupied_units(g, table, first, last + 1) is None

    def peek_unallocated(self, offset: int, length: int) -> bool:
        """True when cached metadata shows [offset, +length) wholly unallocated in this
        layer (so it reads from the backing file): either no L2 table covers it, or it
        lies in one cluster whose cached entry has no data, zero flag or compression."""
        g = self.g
        cb = g.cluster_bits
        l1i = offset >> g.l2_span_bits
        if (offset + length - 1) >> g.l2_span_bits != l1i:
            return False
        if l1i >= len(self.l1):
            return False
        l2_off = int(self.l1[l1i]) & L1E_OFFSET_MASK
        if not l2_off:
            return True
        in_cluster = offset & ((1 << cb) - 1)
        if in_cluster + length > (1 << cb):
            return False
        table = self.l2_cache.peek(l2_off)
        if table is None:
            return False
        idx = (offset >> cb) & ((1 << g.l2_bits) - 1)
        if g.extended_l2:
            entry = int(table[2 * idx])
            if entry & QCOW_OFLAG_COMPRESSED:
                return False
            bitmap = int(table[2 * idx + 1])
            first = in_cluster >> g.unit_bits
            last = (in_cluster + length - 1) >> g.unit_bits
            want = ((1 << (last + 1)) - 1) ^ ((1 << first) - 1)
            return not (bitmap & want or (bitmap >> 32) & want)
        entry = int(table[idx])
        if entry & (QCOW_OFLAG_COMPRESSED | L2E_OFFSET_MASK):
            return False
        if g.has_zero_flag and entry & QCOW_OFLAG_ZERO:
            return False
        return not (g.external_data and entry & QCOW_OFLAG_COPIED)
