"""FvdDriver: the FVD format (shared/docs/fvd-format.md).

Design notes
------------
Mapping.  A guest range splits into *segments* (:func:`FvdDriver._segments`):
``BASE`` (bitmap bit 0, below ``base_img_size``: read from the base),
``STORE`` (in the image: a host offset in the data store) and ``ZERO``
(compact image, chunk without storage, bit 1 or past the base).  Reads,
writes, block status and copy-on-read are loops over segments.  The bitmap
and the table are sparse paged tables (``block/pagedtable.py``): memory
follows what is allocated, and segments come from runs (stretches of
unallocated chunks or untouched blocks are one step, however long), so block
status over a huge, mostly empty image costs what it finds, not its size.
Only changed pages of the bitmap and table are written back.

Locks.  ``_range_lock`` (:class:`RangeLock`) covers guest ranges whose
bitmap bits or table entries may change: copy-on-write of partial blocks,
chunk allocation, copy-on-read and prefetch stores all hold it, at block
granularity, or chunk granularity in compact images.  Under it the writer
re-reads the bits: bits only go 0 -> 1 and only under the lock, so a write
that sees bit 1 without the lock may go straight to the store, and a store of
base data (copy-on-read, prefetch) writes only blocks still at 0, so a client
write always wins.  ``_commit_lock`` orders commits (data sync, journal
append or checkpoint), ``_grow_lock`` serialises growing the data store.
In-memory bitmap/table updates are synchronous (no await between data and
metadata publication), so they need no lock of their own in trio.

Durability (the ordering rule).  Bits and entries change in memory after
their data is written, and a journal record is queued (``_pending``).  A
commit (FLUSH, FUA, journal pressure, close) takes the queued records, syncs
the data store, then writes the records and syncs the journal.  A full
journal checkpoints instead: bitmap and table snapshots taken before the
data sync go to their regions, the epoch moves on.  Allocation is two-step
(reserve, write, publish) so a table entry never points at data that has not
landed, and reused or possibly stale chunks are zeroed first.

Guest activity.  The prefetcher must yield to clients, but the driver does not
see the ``BlockDevice``; so every guest entry point (``readinto``, ``write``,
``write_zeroes``, ``discard``, ``flush``) counts itself in ``_guest_inflight``
and :meth:`wait_guest_idle` waits for that count to reach zero.  Prefetch and
copy-on-read use internal paths that do not count.  The synchronous fast paths
finish before any other task runs, so they need no count.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Final, NamedTuple

import trio

from nbdserve.block.base import (
    Capabilities,
    Extent,
    FormatDriver,
    Limits,
    Status,
    Support,
    ZeroCopy,
    fill_zeros,
)
from nbdserve.block.file import FileBackend
from nbdserve.block.fvd.bitmap import Bitmap
from nbdserve.block.fvd.journal import Journal, PendingRecords, read_journal
from nbdserve.block.fvd.locks import RangeLock
from nbdserve.block.fvd.structs import (
    FVD_MAGIC,
    HEADER_SIZE,
    FvdHeader,
    JournalBitmapRecord,
    JournalRecord,
    validate_layout,
)
from nbdserve.block.fvd.table import ChunkTable
from nbdserve.block.prefetch import (
    Prefetcher,
    PrefetchSettings,
    PrefetchState,
    PrefetchStatistics,
)
from nbdserve.errors import (
    BlockError,
    CorruptImageError,
    InvalidImageError,
    NoSpaceError,
    NotSupportedError,
    ReadOnlyError,
)

if TYPE_CHECKING:
    from nbdserve.block.base import Buffer, DriverStatistics
    from nbdserve.block.check import CheckReport
    from nbdserve.block.formats import OpenOptions

LOGGER = logging.getLogger(__name__)

BASE: Final = 0
STORE: Final = 1
ZERO: Final = 2

# commit on our own once this many records wait in memory
_MAX_PENDING_RECORDS = 4096
# block status answers at most this many segments per call (a shorter answer is legal)
_STATUS_MAX_SEGMENTS = 1024


class Segment(NamedTuple):
    kind: int  # BASE, STORE or ZERO
    guest_offset: int
    length: int
    host_offset: int  # STORE only

    @property
    def end(self) -> int:
        return self.guest_offset + self.length


# (byte offset in a metadata region, bytes): pages to write back
Chunks = list[tuple[int, bytes]]


def probe(header: bytes) -> bool:
    return len(header) >= 4 and int.from_bytes(header[:4], "little") == FVD_MAGIC


# ---- opening ----------------------------------------------------------------------


async def read_header(file: FileBackend) -> FvdHeader:
    raw = bytes(await file.pread(0, HEADER_SIZE))
    header = FvdHeader.from_bytes(raw)
    validate_layout(header, file.size)
    return header


async def load_bitmap(
    file: FileBackend, header: FvdHeader, *, progress: Callable[[int, int], None] | None = None
) -> Bitmap | None:
    if not header.has_base:
        return None
    return await Bitmap.load(file, header.bitmap_offset, header.base_block_count, progress=progress)


async def load_table(
    file: FileBackend, header: FvdHeader, *, progress: Callable[[int, int], None] | None = None
) -> ChunkTable | None:
    if not header.compact:
        return None
    return await ChunkTable.load(file, header.table_offset, header.chunk_count, progress=progress)


def apply_records(
    header: FvdHeader,
    records: Sequence[JournalRecord],
    bitmap: Bitmap | None,
    table: ChunkTable | None,
) -> int:
    """Replay journal records into bitmap and table; returns the records applied.

    BITMAP records always apply (setting a set bit is harmless); TABLE
    records apply when ``journal_epoch >= stable_journal_epoch``.
    """
    applied = 0
    for record in records:
        if isinstance(record, JournalBitmapRecord):
            end = record.guest_offset + record.length
            if end > header.virtual_disk_size:
                raise InvalidImageError(
                    f"FVD journal BITMAP record covers [{record.guest_offset}, {end}), past "
                    f"the virtual disk ({header.virtual_disk_size} bytes)"
                )
            if bitmap is not None and record.length:
                bs = header.block_size
                bitmap.set_range(record.guest_offset // bs, -(-end // bs))
            applied += 1
        elif record.journal_epoch >= header.stable_journal_epoch:
            if table is None:
                raise InvalidImageError(
                    "FVD journal has a TABLE record but the image is not compact"
                )
            last = record.first_index + len(record.entries)
            if last > table.chunk_count:
                raise InvalidImageError(
                    f"FVD journal TABLE record covers entries [{record.first_index}, {last}), "
                    f"past the table ({table.chunk_count} entries)"
                )
            table.set_entries(record.first_index, record.entries)
            applied += 1
    return applied


def resolve_data_file(image_path: str, ref: str, allowed: Sequence[str]) -> str:
    """``data_file`` relative to the image's directory, confined like backing files."""
    base_dir = os.path.dirname(os.path.abspath(image_path))
    candidate = ref if os.path.isabs(ref) else os.path.join(base_dir, ref)
    real = os.path.realpath(candidate)
    if not any(real == d or real.startswith(d.rstrip("/") + "/") for d in allowed):
        raise InvalidImageError(
            f"data_file {ref!r} of {image_path} resolves to {real}, outside the allowed "
            f"directories ({', '.join(allowed)})"
        )
    if not os.path.exists(real):
        raise InvalidImageError(f"data_file {ref!r} of {image_path} does not exist")
    return real


def _allowed_dirs(file: FileBackend, options: OpenOptions) -> list[str]:
    if options.allowed_dirs is None:
        return [os.path.dirname(os.path.realpath(file.path))]
    return [os.path.realpath(d) for d in options.allowed_dirs]


async def open_image(file: FileBackend, options: OpenOptions) -> FvdDriver:
    header = await read_header(file)
    read_only = options.read_only or file.read_only
    store: FileBackend = file
    if header.data_file:
        path = resolve_data_file(file.path, header.data_file, _allowed_dirs(file, options))
        store = FileBackend.open(path, read_only=read_only, direct=file.direct)
    try:
        if header.need_zero_init and store.is_block_device:
            raise InvalidImageError(
                "need_zero_init is set but the data store is a block device, whose "
                "unwritten storage is not known to read as zeros"
            )
        driver = FvdDriver(
            file, header, store=store, read_only=read_only, settings=options.settings
        )
        await driver._load()
        return driver
    except BaseException:
        if store is not file:
            await store.aclose()
        raise


# ---- the driver -----------------------------------------------------------------------


class FvdDriver(FormatDriver):
    """An FVD image: copy-on-write bitmap, optional compact table, journal, prefetch."""

    format_name = "fvd"

    def __init__(
        self,
        file: FileBackend,
        header: FvdHeader,
        *,
        store: FileBackend,
        read_only: bool,
        settings: Mapping[str, object],
    ) -> None:
        super().__init__(file, read_only=read_only)
        self.header = header
        self.settings = settings
        self.size = header.virtual_disk_size
        self._store = store
        self._store_base = header.data_offset if store is file else 0
        self._block_size = header.block_size
        self._chunk_size = header.chunk_size
        self._compact = header.compact
        self._base_limit = header.base_img_size if header.has_base else 0
        # below this, a block may still read from the base; once every bit is
        # set (fully prefetched) reads skip the bitmap altogether
        self._cow_limit = 0 if header.base_img_fully_prefetched else self._base_limit
        self._bitmap: Bitmap | None = None
        self._table: ChunkTable | None = None
        self._journal = Journal(file, header.journal_offset, header.journal_size, 0)
        self._pending = PendingRecords()
        self._metadata_dirty = False  # no journal: bitmap/table differ from disk
        self._range_lock = RangeLock()
        self._commit_lock = trio.Lock()
        self._grow_lock = trio.Lock()
        self._failed = False
        self._recovered_records = 0
        self._fresh_from = 0  # store offsets at or past this held nothing at open
        # guest activity, for the prefetcher
        self._guest_inflight = 0
        self._guest_idle = trio.Event()
        self._guest_idle.set()
        # copy-on-read
        self._cor_outstanding = 0
        self._bg_nursery: trio.Nursery | None = None
        self.prefetcher: Prefetcher | None = None
        self._stats = {
            "cow_blocks": 0,
            "cor_bytes": 0,
            "cor_skipped": 0,
            "prefetch_bytes": 0,
            "commits": 0,
            "checkpoints": 0,
            "journal_records": 0,
        }
        self.limits = Limits(
            # any byte range works: partial blocks copy-on-write, and journal
            # records only ever cover whole blocks; 1 also keeps the server's
            # inline read path open
            request_alignment=1,
            max_transfer=32 * 1024 * 1024,
            preferred=max(4096, min(header.block_size, 64 * 1024)),
            discard_alignment=header.block_size,
        )
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

    # ---- open / close -------------------------------------------------------------

    async def _load(self) -> None:
        file = self._file
        h = self.header
        self._bitmap = await load_bitmap(file, h)
        self._table = await load_table(file, h)
        self._journal.epoch = h.stable_journal_epoch
        recovered = False
        if not h.clean_shutdown and h.journal_size:
            records, _ = await read_journal(file, h.journal_offset, h.journal_size)
            self._recovered_records = apply_records(h, records, self._bitmap, self._table)
            recovered = True
        if self._bitmap is not None and self._bitmap.stray_bits():
            self._bitmap.clear_stray_bits()
        if self._table is not None:
            self._table.check_entries()
            dupes = self._table.duplicates()
            if dupes and not self.read_only:
                raise InvalidImageError(
                    f"FVD table maps several chunks to physical chunk {dupes[0]} "
                    f"({len(dupes)} such); refusing to open for writing "
                    "(run 'nbdserve img check -r all')"
                )
            self._table.start_allocator()
        self._fresh_from = self._store_size()
        if self.read_only:
            return
        with trio.CancelScope(shield=True):
            if recovered:
                LOGGER.info(
                    "event=fvd-recovery path=%r records=%d", file.path, self._recovered_records
                )
                await self._write_metadata_regions(self._bitmap_bytes(), self._table_bytes())
                await file.sync()
                await self._journal.zero()
                await file.sync()
            await self._write_header(self.header.replace(clean_shutdown=0))
            await file.sync()

    async def aclose(self) -> None:
        """Graceful close: data, bitmap and table to disk, journal zeroed, clean flag."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self.read_only and not self._failed:
                with trio.CancelScope(shield=True):
                    await self._close_cleanly()
        finally:
            with trio.CancelScope(shield=True):
                if self._store is not self.file:
                    await self._store.aclose()
                await self._file.aclose()

    async def _close_cleanly(self) -> None:
        async with self._commit_lock:
            bitmap, table = self._bitmap_bytes(), self._table_bytes()
            self._pending.take()
            await self._store.sync()
            await self._write_metadata_regions(bitmap, table)
            await self._file.sync()
            if self._journal.high_water:
                await self._journal.zero(self._journal.high_water)
            await self._write_header(self.header.replace(clean_shutdown=1))
            await self._file.sync()

    @property
    def _file(self) -> FileBackend:
        assert self.file is not None
        return self.file

    @property
    def backing_reference(self) -> tuple[str, str | None] | None:
        h = self.header
        if not h.has_base or h.base_img_fully_prefetched:
            return None
        return h.base_img, h.base_img_fmt or None

    def _writable_check(self) -> None:
        self._check_open()
        if self.read_only:
            raise ReadOnlyError("FVD image is open read-only")
        if self._failed:
            raise CorruptImageError("FVD image was marked failed after a metadata error")

    # ---- metadata I/O ---------------------------------------------------------------

    def _bitmap_bytes(self) -> Chunks:
        """Changed bitmap pages since they were last written, snapshotted now."""
        return [] if self._bitmap is None else self._bitmap.table.take_dirty()

    def _table_bytes(self) -> Chunks:
        """Changed table pages since they were last written, snapshotted now."""
        return [] if self._table is None else self._table.table.take_dirty()

    def _restore_dirty(self, bitmap: Chunks, table: Chunks) -> None:
        """Snapshots that did not reach the disk are to be written again."""
        if self._bitmap is not None:
            self._bitmap.table.restore_dirty(bitmap)
        if self._table is not None:
            self._table.table.restore_dirty(table)

    async def _write_metadata_regions(self, bitmap: Chunks, table: Chunks) -> None:
        try:
            for off, data in bitmap:
                await self._file.pwrite(self.header.bitmap_offset + off, data)
            for off, data in table:
                await self._file.pwrite(self.header.table_offset + off, data)
        except BaseException:
            self._restore_dirty(bitmap, table)
            raise

    async def _write_header(self, header: FvdHeader) -> None:
        await self._file.pwrite(0, header.to_bytes())
        self.header = header

    def _store_size(self) -> int:
        return max(0, self._store.size - self._store_base)

    def _max_store_size(self) -> int:
        """Bytes of data store a compact image can ever use."""
        chunks = self._table.chunk_count if self._table is not None else 0
        return chunks * self._chunk_size

    # ---- mapping ----------------------------------------------------------------------

    def _segments(
        self,
        offset: int,
        length: int,
        overlay: Mapping[int, int] | None = None,
        max_segments: int = 0,
    ) -> list[Segment]:
        """Split a guest range into BASE / STORE / ZERO segments, in order.

        With ``max_segments`` the answer may stop early (it then covers a
        prefix of the range); block status uses that to bound its work.
        """
        end = offset + length
        out: list[Segment] = []
        pos = offset
        bitmap = self._bitmap
        if bitmap is not None and pos < self._cow_limit:
            base_end = min(end, self._cow_limit)
            bs = self._block_size
            runs = bitmap.runs(pos // bs, (base_end - 1) // bs + 1, max_segments)
            for b0, b1, is_set in runs:
                lo, hi = max(pos, b0 * bs), min(base_end, b1 * bs)
                if is_set:
                    self._image_segments(lo, hi, overlay, out, max_segments)
                    if max_segments and len(out) >= max_segments and out[-1].end < hi:
                        return out
                else:
                    out.append(Segment(BASE, lo, hi - lo, -1))
            covered = min(base_end, runs[-1][1] * bs) if runs else base_end
            if covered < base_end:
                return out
            pos = base_end
        if pos < end:
            self._image_segments(pos, end, overlay, out, max_segments)
        return out

    def _image_segments(
        self,
        lo: int,
        hi: int,
        overlay: Mapping[int, int] | None,
        out: list[Segment],
        max_segments: int = 0,
    ) -> None:
        """Segments of ``[lo, hi)``, which is in the image: one per run of chunks
        that are unallocated, or allocated to consecutive physical chunks."""
        table = self._table
        if table is None:
            _append_segment(out, Segment(STORE, lo, hi - lo, self._store_base + lo))
            return
        cs = self._chunk_size
        stop_index = (hi - 1) // cs + 1
        pos = lo
        while pos < hi:
            if max_segments and len(out) >= max_segments:
                return
            index = pos // cs
            p = overlay.get(index) if overlay else None
            if p is not None:
                chunks = 1
            else:
                p, chunks = table.run_at(index, stop_index)
                if overlay:  # reserved chunks inside the run end it
                    inside = [i for i in overlay if index < i < index + chunks]
                    chunks = min(inside) - index if inside else chunks
            stop = min(hi, (index + chunks) * cs)
            if p is None:
                _append_segment(out, Segment(ZERO, pos, stop - pos, -1))
            else:
                host = self._store_base + p * cs + (pos - index * cs)
                _append_segment(out, Segment(STORE, pos, stop - pos, host))
            pos = stop

    def _all_in_image(self, offset: int, end: int) -> bool:
        """Every block of the range has its bit set (or has none)."""
        bitmap = self._bitmap
        if bitmap is None or offset >= self._cow_limit:
            return True
        bs = self._block_size
        return bitmap.all_set(offset // bs, (min(end, self._cow_limit) - 1) // bs + 1)

    def _all_in_base(self, offset: int, end: int) -> bool:
        """Every block of the range still reads from the base (bit 0)."""
        bitmap = self._bitmap
        if bitmap is None or end > self._cow_limit:
            return False
        bs = self._block_size
        runs = bitmap.runs(offset // bs, (end - 1) // bs + 1, max_runs=2)
        return len(runs) == 1 and not runs[0][2]

    def _all_allocated(self, offset: int, end: int) -> bool:
        table = self._table
        if table is None:
            return True
        cs = self._chunk_size
        first, last = offset // cs, (end - 1) // cs
        if first == last:
            return table.lookup(first) is not None
        return table.all_allocated(first, last + 1)

    def _lock_range(self, offset: int, end: int) -> tuple[int, int]:
        unit = self._chunk_size if self._compact else self._block_size
        return offset - offset % unit, min(-(-end // unit) * unit, self.size)

    # ---- guest accounting -------------------------------------------------------------

    def _guest_begin(self) -> None:
        self._guest_inflight += 1
        if self._guest_idle.is_set():
            self._guest_idle = trio.Event()

    def _guest_end(self) -> None:
        self._guest_inflight -= 1
        if self._guest_inflight == 0:
            self._guest_idle.set()

    async def wait_guest_idle(self) -> None:
        await self._guest_idle.wait()

    # ---- reads ------------------------------------------------------------------------

    def try_readinto(self, offset: int, buf: memoryview) -> bool:
        if self._closed:
            return False
        end = offset + len(buf)
        if not self._all_in_image(offset, end):
            # wholly in the base: the base may answer inline (not with copy-on-read,
            # which must see the read)
            if self._copy_on_read_enabled() or not self._all_in_base(offset, end):
                return False
            return self._try_read_backing(offset, buf)
        table = self._table
        if table is None:
            return self._store.try_pread_into(self._store_base + offset, buf)
        cs = self._chunk_size
        index = offset // cs
        if (end - 1) // cs != index:
            return False
        p = table.lookup(index)
        if p is None:
            fill_zeros(buf)
            return True
        return self._store.try_pread_into(self._store_base + p * cs + offset - index * cs, buf)

    def zero_copy_region(self, offset: int, length: int) -> ZeroCopy | None:
        if self._closed or not self._all_in_image(offset, offset + length):
            return None
        table = self._table
        if table is None:
            host = self._store_base + offset
        else:
            cs = self._chunk_size
            index = offset // cs
            p = table.lookup(index) if (offset + length - 1) // cs == index else None
            if p is None:
                return None
            host = self._store_base + p * cs + offset - index * cs
        return self._store.sendfile_region(host, length)

    async def readinto(self, offset: int, buf: memoryview) -> None:
        self._check_open()
        self._guest_begin()
        try:
            segments = self._segments(offset, len(buf))
            await self._read_segments(offset, buf, segments)
            if self._copy_on_read_enabled() and any(s.kind == BASE for s in segments):
                await self._copy_on_read(offset, buf, segments)
        finally:
            self._guest_end()

    async def _read_internal(self, offset: int, buf: memoryview) -> None:
        await self._read_segments(offset, buf, self._segments(offset, len(buf)))

    async def _read_segments(
        self, offset: int, buf: memoryview, segments: Sequence[Segment]
    ) -> None:
        awaited = False
        for seg in segments:
            view = buf[seg.guest_offset - offset : seg.guest_offset - offset + seg.length]
            if seg.kind == STORE:
                await self._store.pread_into(seg.host_offset, view)
                awaited = True
            elif seg.kind == ZERO:
                fill_zeros(view)
            else:
                await self._read_backing(seg.guest_offset, view)
                awaited = True
        if not awaited:
            await trio.lowlevel.checkpoint()

    # ---- copy-on-read -----------------------------------------------------------------

    def _copy_on_read_enabled(self) -> bool:
        h = self.header
        return (
            bool(h.copy_on_read)
            and not self.read_only
            and not self._failed
            and h.has_base
            and not h.base_img_fully_prefetched
        )

    async def _copy_on_read(
        self, offset: int, buf: memoryview, segments: Sequence[Segment]
    ) -> None:
        """Save whole base blocks the guest just read into the image.

        The store runs in the background task when there is one (so the read
        is answered first), inline otherwise.  Above
        ``max_outstanding_copy_on_read_data`` unsaved bytes, copy-on-read pauses.
        """
        bs = self._block_size
        end = offset + len(buf)
        for seg in segments:
            if seg.kind != BASE:
                continue
            lo = -(-seg.guest_offset // bs) * bs
            hi = (seg.guest_offset + seg.length) // bs * bs
            last_block_end = min(-(-self._base_limit // bs) * bs, self.size)
            if seg.guest_offset + seg.length == self._base_limit and end >= last_block_end:
                hi = last_block_end  # the base's last block, partly image bytes, is whole
            limit = self.header.max_outstanding_copy_on_read_data
            step = max(bs, min(1 << 20, limit) // bs * bs)
            for piece in range(lo, hi, step):
                await self._copy_on_read_piece(piece, min(hi, piece + step), offset, buf)

    async def _copy_on_read_piece(self, lo: int, hi: int, offset: int, buf: memoryview) -> None:
        n = hi - lo
        if self._cor_outstanding + n > self.header.max_outstanding_copy_on_read_data:
            self._stats["cor_skipped"] += n
            return
        data = bytes(buf[lo - offset : hi - offset])
        self._cor_outstanding += n
        if self._bg_nursery is not None:
            self._bg_nursery.start_soon(self._store_copy_on_read, lo, data)
        else:
            await self._store_copy_on_read(lo, data)

    async def _store_copy_on_read(self, offset: int, data: bytes) -> None:
        try:
            stored = await self._store_missing(offset, memoryview(data))
            self._stats["cor_bytes"] += stored
        except (BlockError, trio.ClosedResourceError) as exc:
            # advisory: the data is still in the base; the guest already has it
            LOGGER.debug("event=fvd-copy-on-read-failed error=%r action=ignore", str(exc))
        finally:
            self._cor_outstanding -= len(data)

    # ---- writes -----------------------------------------------------------------------

    def try_write(self, offset: int, data: Buffer, *, fua: bool = False) -> bool:
        if fua or self._closed or self.read_only or self._failed:
            return False
        end = offset + memoryview(data).nbytes
        if not self._all_in_image(offset, end) or not self._all_allocated(offset, end):
            return False
        table = self._table
        if table is None:
            return self._store.try_pwrite(self._store_base + offset, data)
        cs = self._chunk_size
        index = offset // cs
        if (end - 1) // cs != index:
            return False
        p = table.lookup(index)
        assert p is not None
        return self._store.try_pwrite(self._store_base + p * cs + offset - index * cs, data)

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        """Write ``data``; not atomic across the range.  Durable on return with fua."""
        self._writable_check()
        self._guest_begin()
        try:
            mv = memoryview(data).cast("B")
            end = offset + mv.nbytes
            if self._all_in_image(offset, end) and self._all_allocated(offset, end):
                await self._pwrite_segments(offset, mv, self._segments(offset, mv.nbytes))
            else:
                await self._write_locked(offset, mv)
            await self._after_update(fua)
        finally:
            self._guest_end()

    async def _after_update(self, fua: bool) -> None:
        if fua or len(self._pending) > _MAX_PENDING_RECORDS:
            await self._commit()

    async def _pwrite_segments(
        self, offset: int, mv: memoryview, segments: Sequence[Segment]
    ) -> None:
        for seg in segments:
            if seg.kind != STORE:
                raise AssertionError(f"FVD write reached a {seg.kind} segment")  # a bug
            start = seg.guest_offset - offset
            await self._store.pwrite(seg.host_offset, mv[start : start + seg.length])

    async def _write_locked(self, offset: int, mv: memoryview) -> None:
        """A write that may copy-on-write partial blocks and allocate chunks."""
        bs = self._block_size
        end = offset + mv.nbytes
        block_lo = offset - offset % bs
        block_hi = min(-(-end // bs) * bs, self.size)
        lock_lo, lock_hi = self._lock_range(offset, end)
        async with self._range_lock.hold(lock_lo, lock_hi):
            bitmap = self._bitmap
            head_cow = bitmap is not None and offset > block_lo and not bitmap.is_set(offset // bs)
            tail_cow = bitmap is not None and end < block_hi and not bitmap.is_set((end - 1) // bs)
            w_lo = block_lo if head_cow else offset
            w_hi = block_hi if tail_cow else end
            if head_cow or tail_cow:
                buf = bytearray(w_hi - w_lo)
                view = memoryview(buf)
                if head_cow:
                    await self._read_internal(w_lo, view[: offset - w_lo])
                if tail_cow:
                    await self._read_internal(end, view[end - w_lo :])
                view[offset - w_lo : end - w_lo] = mv
                cow = {offset // bs} if head_cow else set()
                self._stats["cow_blocks"] += len(cow | ({(end - 1) // bs} if tail_cow else set()))
                data = view
            else:
                data = mv
            await self._store_range(w_lo, data)

    async def _store_range(self, offset: int, data: memoryview) -> None:
        """Write data to the image (caller holds the range lock), then publish metadata.

        Shielded: a cancelled allocation would leave a reserved chunk written
        but unpublished (a leak once later chunks are published), and the
        work is bounded by one request.
        """
        end = offset + data.nbytes
        with trio.CancelScope(shield=True):
            overlay = await self._allocate_chunks(offset, end)
            try:
                segments = self._segments_in_image(offset, end, overlay)
                await self._pwrite_segments(offset, data, segments)
            except BaseException:
                self._unreserve(overlay)
                raise
            self._publish(overlay)
            self._mark_in_image(offset, end)

    def _segments_in_image(
        self, offset: int, end: int, overlay: Mapping[int, int]
    ) -> list[Segment]:
        out: list[Segment] = []
        self._image_segments(offset, end, overlay, out)
        return out

    async def _store_missing(self, offset: int, data: memoryview) -> int:
        """Store base data for blocks still at bit 0 (copy-on-read, prefetch).

        ``offset`` and the length are block aligned (or end at the disk's
        end).  Blocks whose bit turned 1 meanwhile hold newer client data and
        are left alone.  Returns the bytes stored.
        """
        self._writable_check()
        bitmap = self._bitmap
        if bitmap is None:
            await trio.lowlevel.checkpoint()
            return 0
        bs = self._block_size
        end = offset + data.nbytes
        lock_lo, lock_hi = self._lock_range(offset, end)
        stored = 0
        async with self._range_lock.hold(lock_lo, lock_hi):
            for b0, b1, is_set in bitmap.runs(offset // bs, -(-end // bs)):
                if is_set:
                    continue
                lo, hi = max(offset, b0 * bs), min(end, b1 * bs)
                if hi <= lo:
                    continue
                await self._store_range(lo, data[lo - offset : hi - offset])
                stored += hi - lo
        await trio.lowlevel.checkpoint()
        return stored

    # ---- allocation -------------------------------------------------------------------

    async def _allocate_chunks(self, offset: int, end: int) -> dict[int, int]:
        """Reserve storage for unallocated chunks of the range (caller holds the lock)."""
        table = self._table
        if table is None:
            return {}
        cs = self._chunk_size
        overlay: dict[int, int] = {}
        try:
            for index in range(offset // cs, (end - 1) // cs + 1):
                if table.lookup(index) is not None:
                    continue
                p, reused = table.reserve()
                overlay[index] = p
                host = self._store_base + p * cs
                await self._ensure_capacity((p + 1) * cs)
                if reused or p * cs < self._fresh_from:
                    await self._zero_store(host, cs)
        except BaseException:
            self._unreserve(overlay)
            raise
        return overlay

    def _unreserve(self, overlay: Mapping[int, int]) -> None:
        if self._table is not None:
            for p in overlay.values():
                self._table.unreserve(p)

    async def _zero_store(self, host: int, length: int) -> None:
        try:
            await self._store.punch_hole(host, length)
        except NotSupportedError:
            await self._store.write_zeroes(host, length)

    async def _ensure_capacity(self, needed: int) -> None:
        """Grow the data store by storage_grow_unit when ``needed`` bytes do not fit."""
        if self._store_size() >= needed:
            return
        async with self._grow_lock:
            current = self._store_size()
            if current >= needed:
                return
            unit = max(self.header.storage_grow_unit, self._chunk_size)
            grow = max(unit, -(-(needed - current) // unit) * unit)
            # storage_grow_unit comes from the image: never grow past the largest
            # store the table can address (each virtual chunk stored once)
            grow = max(needed - current, min(grow, self._max_store_size() - current))
            cmd = self.header.add_storage_cmd
            if cmd and self.settings.get("allow_add_storage_cmd"):
                await self._run_add_storage_cmd(cmd, grow)
                self._store.refresh_size()
                if self._store_size() < needed:
                    raise NoSpaceError(f"add_storage_cmd did not grow {self._store.path}")
                return
            if self._store.is_block_device:
                hint = (
                    " (the image names an add_storage_cmd; the export's settings do not "
                    "allow running it: allow_add_storage_cmd)"
                    if cmd
                    else ""
                )
                raise NoSpaceError(f"FVD data store {self._store.path} is full{hint}")
            await self._store.truncate(self._store_base + current + grow)

    async def _run_add_storage_cmd(self, cmd: str, grow: int) -> None:
        argv = [*shlex.split(cmd), str(grow), self._store.path]
        LOGGER.info("event=fvd-add-storage cmd=%r grow=%d", argv[0], grow)
        try:
            result = await trio.run_process(
                argv, check=False, capture_stdout=True, capture_stderr=True
            )
        except OSError as exc:
            raise NoSpaceError(f"add_storage_cmd {argv[0]!r} could not run: {exc}") from exc
        if result.returncode != 0:
            raise NoSpaceError(
                f"add_storage_cmd {argv[0]!r} failed with status {result.returncode}"
            )

    # ---- metadata publication --------------------------------------------------------

    def _publish(self, overlay: Mapping[int, int]) -> None:
        table = self._table
        if table is None or not overlay:
            return
        for index in sorted(overlay):
            p = overlay[index]
            table.publish(index, p)
            self._queue_table_record(index, p)

    def _queue_table_record(self, index: int, value: int) -> None:
        if self._journal.enabled:
            self._pending.add_table(self._journal.epoch, index, value)
        else:
            self._metadata_dirty = True

    def _mark_in_image(self, offset: int, end: int) -> None:
        """Set bits of the blocks ``[offset, end)`` covers whole (the end of disk counts)."""
        bitmap = self._bitmap
        if bitmap is None or offset >= self._base_limit:
            return
        bs = self._block_size
        first = -(-offset // bs)
        last = end // bs if end < self.size else -(-end // bs)
        if last <= first:
            return
        for b0, b1, is_set in bitmap.runs(first, min(last, bitmap.block_count)):
            if is_set:
                continue
            bitmap.set_range(b0, b1)
            if self._journal.enabled:
                self._pending.add_bitmap(b0 * bs, min(b1 * bs, self.size) - b0 * bs)
            else:
                self._metadata_dirty = True

    # ---- commit (flush) --------------------------------------------------------------

    async def flush(self) -> None:
        self._check_open()
        self._guest_begin()
        try:
            await self._commit()
        finally:
            self._guest_end()

    async def _commit(self) -> None:
        """Make every completed write durable, metadata after data (the ordering rule)."""
        if self.read_only:
            await trio.lowlevel.checkpoint()
            return
        with trio.CancelScope(shield=True):
            async with self._commit_lock:
                records = self._pending.take()
                journal = self._journal
                checkpoint = bool(records) and not journal.fits(records)
                dirty = self._metadata_dirty
                self._metadata_dirty = False
                snapshots = (
                    (self._bitmap_bytes(), self._table_bytes()) if checkpoint or dirty else None
                )
                try:
                    await self._store.sync()
                    if snapshots is not None:
                        await self._checkpoint(*snapshots)
                    elif records:
                        await journal.append(records)
                        await self._file.sync()
                        self._stats["journal_records"] += len(records)
                except BaseException:
                    self._pending.restore(records)
                    self._metadata_dirty = self._metadata_dirty or dirty
                    if snapshots is not None:
                        self._restore_dirty(*snapshots)
                    raise
                self._stats["commits"] += 1

    async def _checkpoint(self, bitmap: Chunks, table: Chunks) -> None:
        """Full journal (or none): write bitmap and table, move the epoch on."""
        await self._write_metadata_regions(bitmap, table)
        await self._file.sync()
        if self._journal.enabled:
            epoch = self._journal.epoch + 1
            await self._write_header(self.header.replace(stable_journal_epoch=epoch))
            await self._file.sync()
            self._journal.restart(epoch)
            if self._journal.high_water:
                await self._journal.zero(self._journal.high_water)
        self._stats["checkpoints"] += 1

    # ---- zeroing and discard ---------------------------------------------------------

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        self._writable_check()
        self._guest_begin()
        try:
            await self._zero(offset, offset + length, may_unmap, fast)
            await self._after_update(fua)
        finally:
            self._guest_end()

    async def _zero(self, offset: int, end: int, may_unmap: bool, fast: bool) -> None:
        bs = self._block_size
        body_lo = -(-offset // bs) * bs
        body_hi = end if end == self.size else end - end % bs
        if body_hi <= body_lo:
            await self._zero_partial(offset, end, fast)
            return
        if offset < body_lo:
            await self._zero_partial(offset, body_lo, fast)
        lock_lo, lock_hi = self._lock_range(body_lo, body_hi)
        async with self._range_lock.hold(lock_lo, lock_hi):
            for seg in self._segments_in_image(body_lo, body_hi, {}):
                if seg.kind == STORE:
                    await self._zero_host(seg.host_offset, seg.length, may_unmap, fast)
            self._mark_in_image(body_lo, body_hi)
        if body_hi < end:
            await self._zero_partial(body_hi, end, fast)

    async def _zero_partial(self, offset: int, end: int, fast: bool) -> None:
        """Zero part of one block: cheap if the block is in the image, else a COW write."""
        if self._all_in_image(offset, end):
            segments = self._segments(offset, end - offset)
            for seg in segments:
                if seg.kind == STORE:
                    await self._zero_host(seg.host_offset, seg.length, False, fast)
            if segments and all(s.kind != STORE for s in segments):
                await trio.lowlevel.checkpoint()
            return
        if fast:
            raise NotSupportedError("zeroing part of a base block needs a copy-on-write")
        zeros = memoryview(bytes(end - offset))
        await self._write_locked(offset, zeros)

    async def _zero_host(self, host: int, length: int, may_unmap: bool, fast: bool) -> None:
        if may_unmap:
            try:
                await self._store.punch_hole(host, length)
                return
            except NotSupportedError:
                pass
        try:
            await self._store.zero_range(host, length)
        except NotSupportedError:
            if fast:
                raise
            await self._store.write_zeroes(host, length)

    async def discard(self, offset: int, length: int) -> None:
        """Punch holes under whole blocks that are in the image; metadata stays.

        Blocks still read from the base keep showing it (discard is advisory).
        """
        self._writable_check()
        self._guest_begin()
        try:
            bs = self._block_size
            lo = -(-offset // bs) * bs
            end = offset + length
            hi = end if end == self.size else end - end % bs
            if hi > lo:
                for seg in self._segments(lo, hi - lo):
                    if seg.kind == STORE:
                        try:
                            await self._store.punch_hole(seg.host_offset, seg.length)
                        except NotSupportedError:
                            break
            await trio.lowlevel.checkpoint()
        finally:
            self._guest_end()

    # ---- NBD_CMD_CACHE ----------------------------------------------------------------

    async def cache(self, offset: int, length: int) -> None:
        """Copy the base blocks of the range into the image now (a targeted prefetch)."""
        self._check_open()
        h = self.header
        if self.read_only or self._failed or not h.has_base or h.base_img_fully_prefetched:
            await trio.lowlevel.checkpoint()
            return
        bs = self._block_size
        pos = offset - offset % bs
        end = min(-(-(offset + length) // bs) * bs, self.size)
        while pos < end:
            n = min(1 << 20, end - pos)
            if not self._all_in_image(pos, pos + n):
                buf = memoryview(bytearray(n))
                await self._read_internal(pos, buf)
                await self._store_missing(pos, buf)
            pos += n
        await trio.lowlevel.checkpoint()

    # ---- block status -----------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        self._check_open()
        out = self._status(offset, length)
        await trio.lowlevel.checkpoint()
        return out

    def try_block_status(self, offset: int, length: int) -> Sequence[Extent] | None:
        """The bitmap and table are in memory: block status never waits for I/O."""
        if self._closed:
            return None
        return self._status(offset, length)

    def _status(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        for seg in self._segments(offset, length, max_segments=_STATUS_MAX_SEGMENTS):
            if seg.kind == BASE:
                _append_extent(out, Extent(seg.guest_offset, seg.length, Status.NONE))
            elif seg.kind == ZERO:
                _append_extent(
                    out, Extent(seg.guest_offset, seg.length, Status.ALLOCATED | Status.ZERO)
                )
            else:
                for host, n, is_data in self._store.data_extents(seg.host_offset, seg.length):
                    status = Status.ALLOCATED | (Status.DATA if is_data else Status.ZERO)
                    guest = seg.guest_offset + (host - seg.host_offset)
                    _append_extent(out, Extent(guest, n, status))
        return out

    # ---- background work: copy-on-read stores and prefetch ----------------------------

    def prefetch_settings(self) -> PrefetchSettings:
        h = self.header
        delay = self.settings.get("prefetch_start_delay", h.prefetch_start_delay)
        return PrefetchSettings(
            start_delay=float(str(delay)),
            slots=h.num_prefetch_slots,
            bytes_per_prefetch=h.bytes_per_prefetch,
            min_read_throughput=h.prefetch_min_read_throughput,
            max_read_throughput=h.prefetch_max_read_throughput,
            min_write_throughput=h.prefetch_min_write_throughput,
            max_write_throughput=h.prefetch_max_write_throughput,
            throttle_time=h.prefetch_throttle_time,
            read_measure_time=h.prefetch_read_throughput_measure_time,
            write_measure_time=h.prefetch_write_throughput_measure_time,
        )

    def _prefetch_wanted(self) -> bool:
        h = self.header
        return (
            h.has_base
            and not h.base_img_fully_prefetched
            and not self.read_only
            and self.prefetch_settings().start_delay >= 0
        )

    async def run_background(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the copy-on-read stores and the prefetcher for this export."""
        async with trio.open_nursery() as nursery:
            self._bg_nursery = nursery
            try:
                if self._prefetch_wanted():
                    self.prefetcher = Prefetcher(
                        self, self.prefetch_settings(), name=os.path.basename(self._file.path)
                    )
                    await nursery.start(self.prefetcher.run)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._bg_nursery = None

    async def prefetch_next(self, start: int, max_length: int) -> tuple[int, int] | None:
        await trio.lowlevel.checkpoint()
        bitmap = self._bitmap
        if bitmap is None or self._closed:
            return None
        bs = self._block_size
        first = bitmap.first_clear(start // bs)
        if first is None:
            return None
        count = max(1, max_length // bs)
        last = first + 1
        limit = min(first + count, bitmap.block_count)
        while last < limit and not bitmap.is_set(last):
            last += 1
        lo = first * bs
        hi = min(last * bs, self.size)
        return lo, hi - lo

    async def prefetch_read(self, offset: int, buf: memoryview) -> None:
        await self._read_internal(offset, buf)

    async def prefetch_store(self, offset: int, data: memoryview) -> int:
        stored = await self._store_missing(offset, data)
        self._stats["prefetch_bytes"] += stored
        return stored

    async def prefetch_checkpoint(self) -> None:
        self._writable_check()
        await self._commit()

    async def prefetch_complete(self) -> None:
        """Every base block is in the image: the base is never opened again."""
        self._writable_check()
        bitmap = self._bitmap
        if bitmap is None or bitmap.count_set() < bitmap.block_count:
            raise CorruptImageError("prefetch_complete with blocks still missing")  # a bug
        await self._commit()
        with trio.CancelScope(shield=True):
            async with self._commit_lock:
                await self._write_metadata_regions(self._bitmap_bytes(), [])
                await self._file.sync()
                await self._write_header(self.header.replace(base_img_fully_prefetched=1))
                await self._file.sync()
                self._cow_limit = 0
        LOGGER.info("event=fvd-fully-prefetched path=%r", self._file.path)

    def prefetch_progress(self) -> tuple[int, int]:
        """(bytes of base now in the image, bytes of base in total)."""
        bitmap = self._bitmap
        if bitmap is None:
            return 0, 0
        total = self._base_limit
        if self.header.base_img_fully_prefetched:
            return total, total
        done = bitmap.count_set() * self._block_size
        if bitmap.block_count and bitmap.is_set(bitmap.block_count - 1):
            done -= bitmap.block_count * self._block_size - total
        return min(done, total), total

    # ---- introspection ----------------------------------------------------------------

    def statistics(self) -> DriverStatistics:
        from nbdserve.block.base import DriverStatistics

        extra = dict(self._stats)
        for name, part in (("bitmap", self._bitmap), ("table", self._table)):
            if part is not None:  # work counters: they follow what is allocated
                extra[f"{name}_bytes_resident"] = part.table.memory_bytes
                extra[f"{name}_bytes_loaded"] = part.table.bytes_read
                extra[f"{name}_entries_scanned"] = part.table.entries_scanned
        extra["guest_inflight"] = self._guest_inflight
        extra["cor_outstanding"] = self._cor_outstanding
        if self.prefetcher is not None:
            extra["prefetch_copied"] = self.prefetcher.bytes_copied
            extra["prefetch_pauses"] = self.prefetcher.pauses
        return DriverStatistics(extra=extra, prefetch=self._prefetch_statistics())

    def _prefetch_statistics(self) -> PrefetchStatistics | None:
        """Progress of copying the base in, for every image that has one.

        Without a running prefetcher (not configured, opened read-only, or
        complete before this open) the bitmap still says how much is here:
        copy-on-read and guest writes fill it too.
        """
        if self.prefetcher is not None:
            return self.prefetcher.statistics()
        if self._bitmap is None:
            return None
        done, total = self.prefetch_progress()
        full = bool(self.header.base_img_fully_prefetched)
        state = PrefetchState.DONE if full else PrefetchState.DISABLED
        return PrefetchStatistics(state.value, 0, 0, done, total, 0.0, 0.0, 0, 0)

    def describe(self) -> dict[str, object]:
        h = self.header
        done, total = self.prefetch_progress()
        data: dict[str, object] = {
            "version": h.version,
            "block-size": h.block_size,
            "compact": h.compact,
            "journal-size": h.journal_size,
            "clean-shutdown": bool(h.clean_shutdown),
            "copy-on-read": bool(h.copy_on_read),
            "need-zero-init": bool(h.need_zero_init),
        }
        if h.compact:
            assert self._table is not None
            data["chunk-size"] = h.chunk_size
            data["allocated-chunks"] = self._table.allocated_count()
            data["storage-grow-unit"] = h.storage_grow_unit
        if h.data_file:
            data["data-file"] = h.data_file
        if h.has_base:
            data["base-img"] = h.base_img
            if h.base_img_fmt:
                data["base-img-fmt"] = h.base_img_fmt
            data["base-img-size"] = h.base_img_size
            data["base-img-fully-prefetched"] = bool(h.base_img_fully_prefetched)
            data["prefetch-bytes-copied"] = done
            data["prefetch-bytes-total"] = total
            data["prefetch-progress"] = f"{100.0 * done / total:.1f}%" if total else "100.0%"
            data["prefetch-start-delay"] = h.prefetch_start_delay
            data.update(self._describe_prefetch())
        doc: dict[str, object] = {
            "cluster-size": h.block_size,
            "dirty-flag": not h.clean_shutdown,
            "format-specific": {"type": "fvd", "data": data},
        }
        return doc

    def _describe_prefetch(self) -> dict[str, object]:
        """What is known of the copy, for ``img info``.

        The prefetcher's state and rates live only in the process that runs it
        (the header has no field for them): this process reports them; any
        other, e.g. ``img info`` next to a server, tells only whether a locking
        writer has the image open ("in-use-elsewhere": see that server's log
        and metrics) or not ("stopped"), the copied bytes coming from the
        bitmap and journal on disk.
        """
        if self.prefetcher is not None:
            s = self.prefetcher.statistics()
            return {
                "prefetch-state": s.state,
                "prefetch-read-kib-s": round(s.read_throughput),
                "prefetch-write-kib-s": round(s.write_throughput),
            }
        if self.header.base_img_fully_prefetched:
            return {"prefetch-state": "done"}
        busy = self._file.write_held_elsewhere()
        return {"prefetch-state": "in-use-elsewhere" if busy else "stopped"}


def _append_segment(out: list[Segment], seg: Segment) -> None:
    if out:
        last = out[-1]
        if (
            last.kind == seg.kind
            and last.guest_offset + last.length == seg.guest_offset
            and (seg.kind != STORE or last.host_offset + last.length == seg.host_offset)
        ):
            out[-1] = Segment(
                last.kind, last.guest_offset, last.length + seg.length, last.host_offset
            )
            return
    out.append(seg)


def _append_extent(out: list[Extent], e: Extent) -> None:
    if out and out[-1].status == e.status and out[-1].end == e.offset:
        out[-1] = Extent(out[-1].offset, out[-1].length + e.length, e.status)
    else:
        out.append(e)


async def create_image(
    path: str,
    size: int,
    options: dict[str, str],
    backing: str | None = None,
    backing_fmt: str | None = None,
) -> None:
    from nbdserve.block.fvd.create import create_fvd

    await create_fvd(path, size, options, backing, backing_fmt)


async def check_image(path: str, repair: str | None) -> CheckReport:
    from nbdserve.block.fvd.check import check_fvd

    return await check_fvd(path, repair)


__all__ = ["FvdDriver", "check_image", "create_image", "open_image", "probe"]
