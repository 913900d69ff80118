"""ParallelsDriver: Parallels expandable images (docs/interop/parallels.txt).

Design notes
------------
* **Mapping.** The BAT is held in memory as a sparse paged ``<u4`` table
  (``bat.py``, bounded by ``structs.MAX_BAT_ENTRIES``): pages of unallocated
  entries are not stored, so memory and open time follow the allocated
  clusters, not the virtual size.  Reads, writes and block status walk it in
  runs, so host-contiguous clusters are one I/O and unallocated stretches,
  however long, are one step.
* **Allocation** appends at ``_data_end``: a write over absent clusters
  reserves the whole run of absent clusters it covers at once, grows the file
  once for the run (plus ``prealloc_size`` ahead, as QEMU's ``prealloc-mode``
  / ``prealloc-size``), writes, and only then publishes the BAT entries.  While
  the data is in flight the clusters are *pending*: another write to them
  waits for the first and then writes into the allocated cluster, so a
  cluster is allocated once and both writes land; a read sees them as
  unallocated (NBD lets overlapping requests see either state).  Space past
  ``_data_end`` always reads as zeros (the tail is trimmed at open and only
  grows by truncate/fallocate), so a partial first or last cluster needs
  filling only from a backing layer.  Host space is never reused within the
  BAT once given out (discarded clusters become holes), which keeps stale
  pointers harmless.
* **Durability.** Published BAT entries mark their BAT page dirty; ``flush``
  syncs the data, writes the dirty pages, and syncs again, so a BAT entry on
  disk never points at data that was not yet durable when the flush began.
  Flushes are serialised so a second flush cannot return before an earlier
  one's pages are down.
* **The in-use flag.**  A writable open sets ``inuse`` (synced) and a clean
  close clears it after trimming the file to the real data end.  An image
  found in use, or whose BAT points outside the file, into its metadata or
  twice at one cluster, is refused for writing until ``nbdserve img check
  --repair all``; read-only it is served, and reading a cluster whose entry
  points outside the file fails with EIO.

Locks: ``_alloc_lock`` covers reserving host space (``_data_end``) and growing
the file; ``_flush_lock`` covers BAT write-back.  BAT lookups and updates are
synchronous, hence atomic between trio checkpoints, and need no lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from nbdserve.block.base import (
    ZERO_CHUNK,
    Capabilities,
    DriverStatistics,
    Extent,
    FormatDriver,
    Limits,
    Status,
    Support,
    ZeroCopy,
)
from nbdserve.block.parallels.bat import BatProblems, BatTable
from nbdserve.block.parallels.structs import (
    DEFAULT_CLUSTER_SIZE,
    HEADER_SIZE,
    INUSE_CLOSED,
    INUSE_MAGIC,
    Geometry,
    ParallelsHeader,
    geometry_of,
)
from nbdserve.block.parallels.structs import probe as _probe_header
from nbdserve.errors import (
    ConfigError,
    CorruptImageError,
    InvalidImageError,
    NoSpaceError,
    NotSupportedError,
)

if TYPE_CHECKING:
    from nbdserve.block.base import Buffer
    from nbdserve.block.check import CheckReport
    from nbdserve.block.file import FileBackend
    from nbdserve.block.formats import OpenOptions

LOGGER = logging.getLogger(__name__)

DEFAULT_PREALLOC_SIZE: Final = 128 << 20
PREALLOC_MODES: Final = ("falloc", "truncate", "off")
REPAIR_HINT: Final = "run `nbdserve img check --repair all` on it first"


@dataclass(frozen=True, slots=True)
class ParallelsSettings:
    """Per-export knobs, from ``[export.settings]`` in the TOML config.

    * ``prealloc_mode``: ``falloc`` (default; fallocate ahead), ``truncate``
      (grow sparse) or ``off`` (grow only as clusters are allocated);
    * ``prealloc_size``: bytes to grow ahead of need (default 128 MiB);
    * ``backing`` / ``backing_format``: a backing image for unallocated
      clusters (the format itself has no field for one), resolved and
      confined like any backing reference;
    * ``max_alloc_clusters``: cap on clusters per allocation (0 = whole run;
      1 reproduces per-cluster allocation, for benchmarks).
    """

    prealloc_mode: str = "falloc"
    prealloc_size: int = DEFAULT_PREALLOC_SIZE
    backing: str | None = None
    backing_format: str | None = None
    # clusters one allocation may take at most; 0 = the whole run (for benchmarks)
    max_alloc_clusters: int = 0

    @classmethod
    def from_mapping(cls, settings: Mapping[str, object]) -> ParallelsSettings:
        mode = str(settings.get("prealloc_mode", "falloc"))
        if mode not in PREALLOC_MODES:
            raise ConfigError(
                f"parallels prealloc_mode must be one of {', '.join(PREALLOC_MODES)}, not {mode!r}"
            )
        size = _int_setting(settings, "prealloc_size", DEFAULT_PREALLOC_SIZE)
        run = _int_setting(settings, "max_alloc_clusters", 0)
        backing = settings.get("backing")
        fmt = settings.get("backing_format")
        return cls(
            prealloc_mode=mode,
            prealloc_size=size,
            backing=None if backing is None else str(backing),
            backing_format=None if fmt is None else str(fmt),
            max_alloc_clusters=run,
        )


def _int_setting(settings: Mapping[str, object], key: str, default: int) -> int:
    value = settings.get(key, default)
    try:
        number = int(str(value))
    except ValueError:
        raise ConfigError(f"parallels {key} must be a whole number, not {value!r}") from None
    if number < 0:
        raise ConfigError(f"parallels {key} must not be negative")
    return number


@dataclass(slots=True)
class _Pending:
    """Clusters whose allocation is in flight; ``done`` fires when they are published."""

    first: int
    count: int
    done: trio.Event


class ParallelsDriver(FormatDriver):
    format_name = "parallels"

    def __init__(
        self,
        file: FileBackend,
        *,
        read_only: bool,
        header: ParallelsHeader,
        geometry: Geometry,
        bat: BatTable,
        problems: BatProblems,
        settings: ParallelsSettings,
    ) -> None:
        super().__init__(file, read_only=read_only)
        self.header = header
        self.geometry = geometry
        self.settings = settings
        self.size = geometry.size
        self.cluster_size = geometry.cluster_size
        self._bat = bat
        # indices whose entries point outside the file (read-only opens only)
        self._bad = frozenset(int(i) for i in problems.outside) if problems.outside.size else None
        # where the next allocation goes: past every referenced cluster
        self._data_end = _round_up(max(bat.data_end(), _ext_end(geometry)), geometry.bat_unit)
        self._pending: list[_Pending] = []
        self._alloc_lock = trio.Lock()
        self._flush_lock = trio.Lock()
        self._prealloc_mode = settings.prealloc_mode
        # without a growable regular file, fresh clusters may hold old bytes
        self._fresh_reads_zero = not file.is_block_device
        self._stats = DriverStatistics()
        self._stats.extra.update(
            allocations=0, clusters_allocated=0, file_grows=0, bat_writes=0, discarded=0
        )
        cs = self.cluster_size
        preferred = cs if cs & (cs - 1) == 0 and 512 <= cs <= (2 << 20) else 4096
        self.limits = Limits(request_alignment=1, preferred=preferred)
        writable = not read_only
        self.caps = Capabilities(
            writable=writable,
            flush=True,
            discard=writable,
            zero=Support.NATIVE if writable else Support.NONE,
            fast_zero=writable,
            fua=Support.EMULATE,
            cache=True,
            multi_conn=True,
            supports_backing=True,
        )

    # ---- identity -------------------------------------------------------------

    @property
    def backing_reference(self) -> tuple[str, str | None] | None:
        """A parallels image names no backing file; the export settings may."""
        if self.settings.backing is None:
            return None
        return self.settings.backing, self.settings.backing_format

    def describe(self) -> dict[str, object]:
        header = self.header
        return {
            "format": "parallels",
            "virtual-size": self.size,
            "cluster-size": self.cluster_size,
            "dirty-flag": header.unclean,
            "format-specific": {
                "type": "parallels",
                "data": {
                    "magic": header.magic.decode(),
                    "bat-entries": self.geometry.bat_entries,
                    "bat-offset-unit": self.geometry.bat_unit,
                    "data-offset": self.geometry.data_start,
                    "allocated-clusters": self._bat.allocated_count(),
                    "in-use": header.unclean,
                },
            },
        }

    def statistics(self) -> DriverStatistics:
        self._stats.extra.update(self._bat.statistics())
        return self._stats

    # ---- reads ------------------------------------------------------------------

    def fast_reader(self) -> Callable[[int, memoryview], bool]:
        """try_readinto with the common case first: a read inside one allocated
        cluster is one table lookup and one pread, without the run loop and its
        memoryview slices (~1 µs of a 4 KiB read's ~10)."""
        if self._bad is not None:
            return self.try_readinto
        cs = self.cluster_size
        get = self._bat.table.get
        unit = self._bat.unit
        pread = self._file.try_pread_into
        stats = self._stats
        general = self.try_readinto

        def read(offset: int, buf: memoryview) -> bool:
            index = offset // cs
            within = offset - index * cs
            n = len(buf)
            host = get(index) * unit if within + n <= cs else 0
            if not host or self._closed:
                return general(offset, buf)
            if not pread(host + within, buf):
                return False
            stats.reads += 1
            stats.bytes_read += n
            return True

        return read

    def zero_copy_region(self, offset: int, length: int) -> ZeroCopy | None:
        """The range's host stretches (one per run of clusters that follow each other
        on the host) when every cluster is allocated, every byte is in the page
        cache, and no BAT entry of it points outside the file; None otherwise (the
        copying path then serves it)."""
        if self._closed:
            return None
        cs = self.cluster_size
        end = offset + length
        pieces = []
        pos = offset
        while pos < end:
            index = pos // cs
            host, clusters = self._bat.run_at(index, (end - 1) // cs - index + 1)
            if not host or self._run_is_bad(index, clusters):
                return None
            n = min(end, (index + clusters) * cs) - pos
            pieces.append((host + pos - index * cs, n))
            pos += n
        return self._file.sendfile_pieces(pieces)

    def try_readinto(self, offset: int, buf: memoryview) -> bool:
        """Serve from the page cache when every run is allocated or reads zeros."""
        if self._closed:
            return False
        cs = self.cluster_size
        end = offset + len(buf)
        pos = offset
        while pos < end:
            index = pos // cs
            host, clusters = self._bat.run_at(index, (end - 1) // cs - index + 1)
            n = min(end, (index + clusters) * cs) - pos
            view = buf[pos - offset : pos - offset + n]
            if host:
                if self._bad is not None and self._run_is_bad(index, clusters):
                    return False
                if not self._file.try_pread_into(host + pos - index * cs, view):
                    return False
            elif not self._try_read_backing(pos, view):
                return False
            pos += n
        self._stats.reads += 1
        self._stats.bytes_read += len(buf)
        return True

    async def readinto(self, offset: int, buf: memoryview) -> None:
        self._check_open()
        cs = self.cluster_size
        end = offset + len(buf)
        pos = offset
        while pos < end:
            index = pos // cs
            host, clusters = self._bat.run_at(index, (end - 1) // cs - index + 1)
            n = min(end, (index + clusters) * cs) - pos
            view = buf[pos - offset : pos - offset + n]
            if host:
                self._refuse_bad(index, clusters)
                await self._file.pread_into(host + pos - index * cs, view)
            else:
                await self._read_backing(pos, view)
            pos += n
        self._stats.reads += 1
        self._stats.bytes_read += len(buf)

    def _run_is_bad(self, index: int, clusters: int) -> bool:
        bad = self._bad
        return bad is not None and any(i in bad for i in range(index, index + clusters))

    def _refuse_bad(self, index: int, clusters: int) -> None:
        bad = self._bad
        if bad is None:
            return
        for i in range(index, index + clusters):
            if i in bad:
                raise CorruptImageError(
                    f"{self._file.path}: BAT entry {i} points past the end of the file "
                    f"(host offset {self._bat.host_offset(i)}); {REPAIR_HINT}"
                )

    # ---- writes -----------------------------------------------------------------

    def try_write(self, offset: int, data: Buffer, *, fua: bool = False) -> bool:
        """Overwrite inside one allocated host run without leaving the event loop."""
        if fua or self._closed:
            return False
        cs = self.cluster_size
        n = memoryview(data).nbytes
        index = offset // cs
        host, clusters = self._bat.run_at(index, (offset + n - 1) // cs - index + 1)
        if not host or (index + clusters) * cs < offset + n:
            return False
        if not self._file.try_pwrite(host + offset - index * cs, data):
            return False
        self._stats.writes += 1
        self._stats.bytes_written += n
        return True

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        """Write ``data``; not atomic across clusters.  FUA is emulated by the front end."""
        self._check_open()
        mv = memoryview(data).cast("B")
        await self._write_range(offset, mv)
        self._stats.writes += 1
        self._stats.bytes_written += mv.nbytes

    async def _write_range(self, offset: int, mv: memoryview) -> None:
        cs = self.cluster_size
        end = offset + mv.nbytes
        pos = offset
        while pos < end:
            index = pos // cs
            wanted = (end - 1) // cs - index + 1
            pending = self._pending_at(index)
            if pending is not None:
                await pending.done.wait()
                continue
            host, clusters = self._bat.run_at(index, wanted)
            if host:
                n = min(end, (index + clusters) * cs) - pos
                view = mv[pos - offset : pos - offset + n]
                await self._file.pwrite(host + pos - index * cs, view)
            else:
                clusters = self._absent_run(index, clusters)
                n = min(end, (index + clusters) * cs) - pos
                await self._allocate_and_write(
                    index, clusters, pos, mv[pos - offset : pos - offset + n]
                )
            pos += n

    def _pending_at(self, index: int) -> _Pending | None:
        for p in self._pending:
            if p.first <= index < p.first + p.count:
                return p
        return None

    def _absent_run(self, index: int, clusters: int) -> int:
        """Shorten an unallocated run so it stops before any pending cluster."""
        for p in self._pending:
            if index < p.first < index + clusters:
                clusters = p.first - index
        limit = self.settings.max_alloc_clusters
        return min(clusters, limit) if limit else clusters

    async def _allocate_and_write(
        self, index: int, clusters: int, guest_offset: int, data: memoryview
    ) -> None:
        """Give ``clusters`` absent clusters from ``index`` host space, write, publish.

        ``data`` starts at ``guest_offset`` inside the first cluster and ends
        inside the last one; the rest of those clusters is filled from the
        backing layer (or left as the zeros fresh space reads as).
        """
        async with self._alloc_lock:
            # the lock wait was a checkpoint: someone may have taken these clusters
            allocated, absent = self._bat.run_at(index, clusters)
            taken = allocated != 0 or self._pending_at(index) is not None
            if not taken:
                clusters = self._absent_run(index, min(clusters, absent))
                host = self._data_end
                self._check_addressable(host + clusters * self.cluster_size)
                pending = _Pending(index, clusters, trio.Event())
                self._pending.append(pending)
                self._data_end = host + clusters * self.cluster_size
        if taken:
            await self._write_range(guest_offset, data)
            return
        try:
            await self._ensure_space(self._data_end)
            await self._write_new_clusters(index, clusters, host, guest_offset, data)
            self._bat.set_run(index, clusters, host)
            self._stats.extra["allocations"] += 1
            self._stats.extra["clusters_allocated"] += clusters
        finally:
            self._pending.remove(pending)
            pending.done.set()
        # the run may have been shortened under the lock: write what is left
        written_end = (index + clusters) * self.cluster_size
        consumed = min(len(data), written_end - guest_offset)
        if consumed < len(data):
            await self._write_range(guest_offset + consumed, data[consumed:])

    def _check_addressable(self, end: int) -> None:
        if end - self.cluster_size > self.geometry.max_host_offset:
            raise NoSpaceError(
                f"{self._file.path}: the BAT cannot address host offsets past "
                f"{self.geometry.max_host_offset}"
            )

    async def _write_new_clusters(
        self, index: int, clusters: int, host: int, guest_offset: int, data: memoryview
    ) -> None:
        cs = self.cluster_size
        run_start = index * cs
        run_end = run_start + clusters * cs
        n = min(len(data), run_end - guest_offset)
        head = guest_offset - run_start
        tail_start = guest_offset + n
        if head:
            await self._fill_fresh(host, run_start, head)
        await self._file.pwrite(host + head, data[:n])
        # only the last cluster can be partly written: fill the rest of it
        if tail_start < run_end:
            await self._fill_fresh(host + tail_start - run_start, tail_start, run_end - tail_start)

    async def _fill_fresh(self, host: int, guest_offset: int, length: int) -> None:
        """Make fresh host space show what the guest saw there before allocation."""
        if self.backing is None:
            if self._fresh_reads_zero:
                await trio.lowlevel.checkpoint()
                return
            pos = 0
            while pos < length:
                step = min(len(ZERO_CHUNK), length - pos)
                await self._file.pwrite(host + pos, memoryview(ZERO_CHUNK)[:step])
                pos += step
            return
        buf = bytearray(length)
        await self._read_backing(guest_offset, memoryview(buf))
        await self._file.pwrite(host, buf)

    async def _ensure_space(self, end: int) -> None:
        """Grow the file to hold ``end`` bytes, preallocating ahead (QEMU prealloc-mode)."""
        file = self._file
        if end <= file.size:
            await trio.lowlevel.checkpoint()
            return
        async with self._alloc_lock:
            if end <= file.size:
                return
            if file.is_block_device:
                raise NoSpaceError(f"{file.path}: no room for new clusters on the device")
            self._stats.extra["file_grows"] += 1
            if self._prealloc_mode == "off":
                # no room ahead, but every allocated cluster lies wholly in the file
                await file.truncate(end)
                return
            target = end + _round_up(self.settings.prealloc_size, self.cluster_size)
            if self._prealloc_mode == "falloc":
                try:
                    await file.preallocate(file.size, target - file.size)
                    return
                except NotSupportedError:
                    LOGGER.info(
                        "event=parallels-fallocate-unsupported path=%r action=truncate", file.path
                    )
                    self._prealloc_mode = "truncate"
            await file.truncate(target)

    # ---- zeroing and discard ----------------------------------------------------

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        """Zero by dropping whole clusters when nothing shows through; else write zeros.

        The format has no "zero" mark, so dropping a cluster is only zeroing
        without a backing layer (QEMU's parallels_co_pwrite_zeroes).
        """
        self._check_open()
        cs = self.cluster_size
        end = offset + length
        first, stop = self._whole_clusters(offset, end)
        lo, hi = first * cs, min(stop * cs, end)
        can_drop = self.backing is None and may_unmap and stop > first
        if fast and not (can_drop and lo == offset and hi == end):
            raise NotSupportedError("parallels can only zero whole clusters quickly")
        if not can_drop:
            await self._write_zero_data(offset, length)
            return
        if offset < lo:
            await self._write_zero_data(offset, lo - offset)
        await self._drop_clusters(first, stop - first)
        if hi < end:
            await self._write_zero_data(hi, end - hi)

    def _whole_clusters(self, offset: int, end: int) -> tuple[int, int]:
        """[first, stop) clusters wholly inside the guest range (a short last one counts)."""
        cs = self.cluster_size
        first = -(-offset // cs)
        stop = end // cs if end < self.size else -(-end // cs)
        return first, max(stop, first)

    async def _write_zero_data(self, offset: int, length: int) -> None:
        """Write zeros, skipping unallocated runs when they already read as zeros."""
        cs = self.cluster_size
        end = offset + length
        pos = offset
        while pos < end:
            index = pos // cs
            host, clusters = self._bat.run_at(index, (end - 1) // cs - index + 1)
            n = min(end, (index + clusters) * cs, pos + len(ZERO_CHUNK)) - pos
            if host or self.backing is not None or self._pending_at(index) is not None:
                await self._write_range(pos, memoryview(ZERO_CHUNK)[:n])
            else:
                await trio.lowlevel.checkpoint()
            pos += n

    async def discard(self, offset: int, length: int) -> None:
        """Free whole clusters (QEMU's parallels_co_pdiscard); nothing with a backing layer.

        With a backing file a dropped cluster would show stale backing data,
        and the format cannot mark a cluster as zero, so QEMU refuses; discard
        being advisory, we do nothing.
        """
        self._check_open()
        if self.backing is not None:
            await trio.lowlevel.checkpoint()
            return
        first, stop = self._whole_clusters(offset, offset + length)
        if stop <= first:
            await trio.lowlevel.checkpoint()
            return
        await self._drop_clusters(first, stop - first)

    async def _drop_clusters(self, first: int, count: int) -> None:
        index = first
        end = first + count
        while index < end:
            pending = self._pending_at(index)
            if pending is not None:
                await pending.done.wait()
                continue
            host, clusters = self._bat.run_at(index, end - index)
            if host:
                self._bat.clear_run(index, clusters)
                self._stats.extra["discarded"] += clusters
                try:
                    await self._file.punch_hole(host, clusters * self.cluster_size)
                except NotSupportedError:
                    await trio.lowlevel.checkpoint()
            index += clusters
        await trio.lowlevel.checkpoint()

    # ---- status -----------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        """Allocated clusters are DATA in this layer; the rest defer to the backing."""
        self._check_open()
        await trio.lowlevel.checkpoint()
        return self._status(offset, length)

    def try_block_status(self, offset: int, length: int) -> Sequence[Extent] | None:
        """The BAT is always in memory: block status never blocks."""
        if self._closed:
            return None
        return self._status(offset, length)

    def _status(self, offset: int, length: int) -> list[Extent]:
        cs = self.cluster_size
        first = offset // cs
        runs = self._bat.allocation_runs(first, (offset + length - 1) // cs - first + 1)
        out = []
        for start, clusters, allocated in runs:
            lo = max(offset, start * cs)
            hi = min(self.size, (start + clusters) * cs)
            status = Status.ALLOCATED | Status.DATA if allocated else Status.NONE
            out.append(Extent(lo, hi - lo, status))
        return out

    # ---- durability -------------------------------------------------------------

    async def flush(self) -> None:
        self._check_open()
        async with self._flush_lock:
            await self._flush_metadata()

    async def _flush_metadata(self) -> None:
        """Data first, then the dirty BAT pages, then sync again (caller holds _flush_lock)."""
        file = self._file
        if not self._bat.has_dirty():
            await file.sync()
            return
        await file.sync()
        chunks = self._bat.take_dirty()
        try:
            with trio.CancelScope(shield=True):
                for off, data in chunks:
                    await file.pwrite(off, data)
                await file.sync()
        except BaseException:
            self._bat.restore_dirty(chunks)
            raise
        self._stats.extra["bat_writes"] += len(chunks)

    async def mark_in_use(self) -> None:
        """Set the in-use flag on disk before the first write (QEMU parallels_open)."""
        self._set_inuse(INUSE_MAGIC)
        await self._file.pwrite(0, self.header.to_bytes())
        await self._file.sync()

    async def trim_tail(self) -> None:
        """Drop unreferenced bytes past the data end, so fresh space reads as zeros."""
        file = self._file
        if file.is_block_device or file.size <= self._data_end:
            await trio.lowlevel.checkpoint()
            return
        LOGGER.info(
            "event=parallels-trim-tail path=%r unreferenced_bytes=%d",
            file.path,
            file.size - self._data_end,
        )
        await file.truncate(self._data_end)

    def _set_inuse(self, value: int) -> None:
        self.header = self.header.replace(inuse=value)

    async def aclose(self) -> None:
        """Flush, trim the file to the real data end, clear the in-use flag; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self.read_only:
                with trio.CancelScope(shield=True):
                    await self._close_writable()
        finally:
            await self._file.aclose()

    async def _close_writable(self) -> None:
        file = self._file
        async with self._flush_lock:
            await self._flush_metadata()
        real_end = max(self._bat.data_end(), _ext_end(self.geometry))
        if not file.is_block_device and file.size != real_end:
            await file.truncate(real_end)
        self._set_inuse(INUSE_CLOSED)
        await file.pwrite(0, self.header.to_bytes())
        await file.sync()

    @property
    def _file(self) -> FileBackend:
        assert self.file is not None
        return self.file


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def ext_inside_file(geometry: Geometry, file_size: int) -> bool:
    """No format extension, or its cluster lies wholly inside the file."""
    return not geometry.ext_offset or geometry.ext_offset + geometry.cluster_size <= file_size


def _ext_end(geometry: Geometry) -> int:
    """End of the format extension cluster (kept, though not interpreted)."""
    if not geometry.ext_offset:
        return 0
    return geometry.ext_offset + geometry.cluster_size


# ---- registry entry points -------------------------------------------------------


def probe(header: bytes) -> bool:
    return _probe_header(header)


async def open_image(file: FileBackend, options: OpenOptions) -> ParallelsDriver:
    """Open and validate; a writable open marks the image in use."""
    settings = ParallelsSettings.from_mapping(options.settings)
    read_only = options.read_only or file.read_only
    header, geometry, bat = await read_metadata(file)
    problems = bat.problems(file.size)
    if not read_only:
        _refuse_unsafe_writes(file.path, header, geometry, problems, file.size)
    elif header.unclean:
        LOGGER.warning("event=parallels-unclean path=%r action=read-only", file.path)
    if geometry.ext_offset and not read_only:
        LOGGER.warning("event=parallels-extension-ignored path=%r mode=read-write", file.path)
    driver = ParallelsDriver(
        file,
        read_only=read_only,
        header=header,
        geometry=geometry,
        bat=bat,
        problems=problems,
        settings=settings,
    )
    if not read_only:
        await driver.mark_in_use()
        await driver.trim_tail()
    return driver


async def read_metadata(
    file: FileBackend, *, progress: Callable[[int, int], None] | None = None
) -> tuple[ParallelsHeader, Geometry, BatTable]:
    """Header, validated geometry and the BAT of an image (``progress`` follows the BAT)."""
    raw = bytes(await file.pread(0, HEADER_SIZE))
    if file.size < HEADER_SIZE:
        raise InvalidImageError(f"not a parallels image: file is only {file.size} bytes")
    header = ParallelsHeader.from_bytes(raw)
    geometry = geometry_of(header, file.size)
    return header, geometry, await BatTable.load(file, geometry, progress=progress)


def _refuse_unsafe_writes(
    path: str, header: ParallelsHeader, geometry: Geometry, problems: BatProblems, file_size: int
) -> None:
    if header.unclean:
        raise InvalidImageError(
            f"parallels image {path} was not closed cleanly (in-use flag set) and cannot "
            f"be opened read-write; {REPAIR_HINT}, or serve it read-only"
        )
    if not geometry.data_off_ok:
        raise InvalidImageError(
            f"parallels image {path} has an invalid data_off field and cannot be opened "
            f"read-write; {REPAIR_HINT}"
        )
    if problems.count:
        raise InvalidImageError(
            f"parallels image {path} is corrupt ({problems.describe()}) and cannot be "
            f"opened read-write; {REPAIR_HINT}"
        )
    if not ext_inside_file(geometry, file_size):
        # new clusters go after the extension cluster: one far past the end of the
        # file would make the first allocation fallocate up to it (filling the disk)
        raise InvalidImageError(
            f"parallels image {path}: the format extension cluster at "
            f"{geometry.ext_offset:#x} lies outside the file and it cannot be opened "
            f"read-write; {REPAIR_HINT}"
        )


async def create_image(
    path: str,
    size: int,
    options: dict[str, str],
    backing: str | None = None,
    backing_fmt: str | None = None,
) -> None:
    """``img create -f parallels [-o cluster_size=N] PATH SIZE``, as qemu-img makes it."""
    from nbdserve.block.parallels.create import create

    await create(path, size, options, backing, backing_fmt)


async def check_image(path: str, repair: str | None) -> CheckReport:
    """``img check [--repair leaks|all]`` (qemu-img check semantics)."""
    from nbdserve.block.parallels.check import check

    return await check(path, repair)


__all__ = [
    "DEFAULT_CLUSTER_SIZE",
    "ParallelsDriver",
    "ParallelsSettings",
    "check_image",
    "create_image",
    "open_image",
    "probe",
    "read_metadata",
]
