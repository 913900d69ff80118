"""The qcow2 format driver (QEMU's block/qcow2.c): open, read, write, status, close.

Design notes
------------
* Opening validates every header field against the spec, QEMU's limits and
  the file size (structs.py); tables are loaded lazily through bounded caches,
  so an image's size costs nothing until it is touched.
* ``_meta`` (a ``trio.Lock``) covers the active L1 table, the L2 cache, the
  refcount table and cache, the allocator and the header fields that change
  (refcount table location).  Data I/O runs outside it.
* ``_ranges`` (a :class:`RangeLock` over guest cluster indexes) serialises
  every request that may change the mapping of a cluster: writes, zeroing,
  discards.  Two writers of the same unallocated cluster therefore never both
  allocate it; reads take no range lock.
* A write either hits clusters it may overwrite in place (allocated, COPIED,
  not compressed), or it allocates: COW data is read through the normal read
  path (backing, zeros, old cluster, decompression), the full buffer is
  written to the new host clusters, and only then, in a shielded scope, the
  L2 entries are set and old references dropped.  Refcounts reach the file
  before the L2 entries using them (cache.py), L2 tables before the L1 entry
  pointing at them, and decrements after the L2 entries that dropped the
  references (refcount.py).  The image's refcounts are always exact, so the
  dirty bit is never set.
* Metadata found inconsistent raises ``CorruptImageError`` for the request;
  the driver is then marked failed and refuses further writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import trio

from nbdserve.block.base import (
    Capabilities,
    DriverStatistics,
    Extent,
    FormatDriver,
    Limits,
    Status,
    Support,
    ZeroCopy,
    fill_zeros,
)
from nbdserve.block.qcow2.cache import TableCache
from nbdserve.block.qcow2.cluster import (
    ClusterMap,
    Geometry,
    Run,
    RunKind,
)
from nbdserve.block.qcow2.locks import RangeLock
from nbdserve.block.qcow2.refcount import Refcounts
from nbdserve.block.qcow2.structs import (
    AUTOCLEAR_BITMAPS,
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    COMPRESSION_ZSTD,
    HDR_AUTOCLEAR_FEATURES,
    HDR_REFCOUNT_TABLE_OFFSET,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    L2E_OFFSET_MASK,
    QCOW_L2_BITMAP_ALL_ALLOC,
    QCOW_L2_BITMAP_ALL_ZEROES,
    QCOW_MAGIC_BYTES,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    HeaderExtensions,
    Qcow2Header,
    pack_u64,
    parse_extensions,
    parse_snapshot_table,
    snapshot_table_max_size,
)
from nbdserve.errors import (
    ConfigError,
    CorruptImageError,
    InvalidImageError,
    NotSupportedError,
    ReadOnlyError,
)

if TYPE_CHECKING:
    from nbdserve.block.base import Buffer
    from nbdserve.block.check import CheckReport
    from nbdserve.block.file import FileBackend
    from nbdserve.block.formats import OpenOptions
    from nbdserve.block.qcow2.compress import CompressedWriter

LOGGER = logging.getLogger(__name__)

DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024
DEFAULT_REFBLOCK_CACHE = 64
# decompressed clusters kept for sequential small reads of compressed images
COMPRESSED_CACHE_ENTRIES = 4
# block_status maps at most this many L2 tables per call (a shorter answer is legal)
STATUS_MAX_TABLES = 64
# decompress in a thread above this cluster size
INLINE_DECOMPRESS_MAX = 256 * 1024
# zstd window accepted for a compressed cluster larger than the cluster (see
# _zstd_decompress_bounded)
ZSTD_MAX_WINDOW = 8 * 1024 * 1024


def probe(header: bytes) -> bool:
    return header[:4] == QCOW_MAGIC_BYTES


async def open_image(file: FileBackend, options: OpenOptions) -> Qcow2Driver:
    driver = Qcow2Driver(file, read_only=options.read_only or file.read_only)
    driver.allowed_dirs = options.allowed_dirs
    try:
        await driver.open(dict(options.settings))
        if driver.needs_repair:
            await _repair_dirty(driver)
    except BaseException:
        await driver.close_files()
        raise
    return driver


def _zstd_decompress_bounded(raw: bytes, cluster_size: int) -> bytes:
    """The first zstd frame of ``raw``, at most ``cluster_size + 1`` bytes of it.

    An image is untrusted: a tiny frame may declare gigabytes of content, and
    ``decompressobj().decompress`` (or ``decompress(max_output_size=)``, which
    trusts the frame's content size) would allocate all of it.  A stream
    reader's ``read(n)`` never returns more than ``n`` bytes, and one byte
    beyond the cluster tells the caller the frame is too long (QEMU's
    qcow2_zstd_decompress fails such a cluster with EIO too).  It stops at the
    end of the frame, so the padding after it in the extent is not read.  The
    window limit bounds zstd's own buffer: a frame for one cluster never needs
    more than the cluster, or what a compressor writing without a known size
    uses (8 MiB up to level 19).
    """
    import zstandard

    window = max(cluster_size, ZSTD_MAX_WINDOW)
    reader = zstandard.ZstdDecompressor(max_window_size=window).stream_reader(raw)
    with reader:
        return bytes(reader.read(cluster_size + 1))


def _check_table_overlaps(header: Qcow2Header) -> None:
    """The L1 table, refcount table and snapshot table must not overlap each other."""
    cs = header.cluster_size
    tables = [
        ("L1 table", header.l1_table_offset, header.l1_size * 8),
        ("refcount table", header.refcount_table_offset, header.refcount_table_clusters * cs),
    ]
    if header.nb_snapshots:
        tables.append(("snapshot table", header.snapshots_offset, header.nb_snapshots * 40))
    tables = [(name, off, n) for name, off, n in tables if n]
    for i, (a, a_off, a_len) in enumerate(tables):
        for b, b_off, b_len in tables[i + 1 :]:
            if a_off < b_off + b_len and b_off < a_off + a_len:
                raise InvalidImageError(f"{a} and {b} overlap")


async def _repair_dirty(driver: Qcow2Driver) -> None:
    """Rebuild the refcounts of a dirty image before writing to it (QEMU does the same
    when it opens a dirty image read-write)."""
    from nbdserve.block.qcow2.check import check_file

    LOGGER.warning("event=qcow2-dirty path=%r action=rebuild-refcounts", driver._file.path)
    report = await check_file(driver._file, "all")
    if report.corruptions or report.check_errors:
        raise InvalidImageError(
            f"dirty image could not be repaired ({report.corruptions} corruptions remain)"
        )
    await driver.reload()
    if driver.needs_repair:
        raise InvalidImageError("dirty bit could not be cleared")


class Qcow2Driver(FormatDriver):
    """One qcow2 layer.  See the module docstring for the locking rules."""

    format_name = "qcow2"

    def __init__(self, file: FileBackend, *, read_only: bool, owns_file: bool = True) -> None:
        super().__init__(file, read_only=read_only)
        self._owns_file = owns_file
        self._settings: dict[str, object] = {}
        # where an external data file may resolve; None: the image's own directory
        self.allowed_dirs: tuple[str, ...] | None = None
        self.data_file: FileBackend = file
        self._own_data_file = False
        self._meta = trio.Lock()
        self._ranges = RangeLock()
        self._failed: str | None = None
        self._decompressed: OrderedDict[int, bytes] = OrderedDict()
        self._compress: CompressedWriter | None = None  # export setting compress = true
        # bumped whenever a compressed cluster is freed: a decompression that raced with
        # a free must not be cached (its L2 entry value may come back for new data)
        self.compressed_frees = 0
        self.header: Qcow2Header
        self.extensions: HeaderExtensions
        self.backing_file: str | None = None
        self._metadata_prealloc: bool | None = None
        self.needs_repair = False

    # ---- open ---------------------------------------------------------------------

    async def open(self, settings: dict[str, object]) -> None:
        self._settings = settings
        file = self._file
        file_size = file.refresh_size()
        if file_size < 72:
            raise InvalidImageError(f"qcow2 image is truncated ({file_size} bytes)")
        head = bytes(await file.pread(0, min(file_size, 4096)))
        header = Qcow2Header.from_bytes(head)
        if not 9 <= header.cluster_bits <= 21:
            raise InvalidImageError(f"unsupported cluster size 2^{header.cluster_bits}")
        cluster0 = bytes(await file.pread(0, min(file_size, header.cluster_size)))
        if header.version == 3 and header.header_length > len(cluster0):
            raise InvalidImageError("qcow2 header is truncated")
        self.extensions = parse_extensions(header, cluster0)
        header.validate(file_size, self.extensions.feature_names)
        _check_table_overlaps(header)
        self.header = header
        if header.backing_file_offset:
            raw = cluster0[
                header.backing_file_offset : header.backing_file_offset + header.backing_file_size
            ]
            self.backing_file = raw.decode("utf-8", "replace") or None
        if not settings.get("_check"):  # the checker opens anything it can read
            self._check_open_mode(header)
            header = self.header = await self._clear_unknown_autoclear(header)
        if header.incompatible_features & INCOMPAT_DATA_FILE:
            await self._open_data_file()
        self.size = header.size
        g = Geometry(
            header.cluster_bits,
            header.extended_l2,
            header.version >= 3,
            external_data=self.data_file is not self.file,
        )
        self.g = g
        l1 = np.frombuffer(
            bytes(await file.pread(header.l1_table_offset, header.l1_size * 8)), dtype=">u8"
        ).copy()
        reftable_len = header.refcount_table_clusters * header.cluster_size // 8
        reftable = np.frombuffer(
            bytes(await file.pread(header.refcount_table_offset, reftable_len * 8)), dtype=">u8"
        ).copy()
        cache_bytes = int(str(settings.get("l2_cache_size", DEFAULT_L2_CACHE_BYTES)))
        l2_cache = TableCache(
            file,
            header.cluster_size,
            max(2, cache_bytes // header.cluster_size),
            lambda raw: np.frombuffer(raw, dtype=">u8").copy(),
            lambda t: t.data.cast("B"),
            "l2",
        )
        self.cmap = ClusterMap(g, l1, header.l1_table_offset, l2_cache, header.size, 0)
        self.refcounts = Refcounts(
            file,
            cluster_bits=header.cluster_bits,
            refcount_order=header.refcount_order,
            reftable_offset=header.refcount_table_offset,
            reftable=reftable,
            cache_capacity=DEFAULT_REFBLOCK_CACHE,
        )
        self.snapshots = await self._load_snapshots(header)
        self._compress = self._compressed_writer(settings)
        self._wire_ordering()
        self._update_limits()
        self._setup_capabilities()

    def _check_open_mode(self, header: Qcow2Header) -> None:
        if self.read_only:
            return
        if header.incompatible_features & INCOMPAT_CORRUPT:
            raise InvalidImageError(
                "image is marked corrupt (incompatible bit 1); it can only be opened read-only "
                "until repaired (nbdserve img check -r all)"
            )
        # a dirty image (lazy refcounts, not closed cleanly) is repaired by open_image
        self.needs_repair = bool(header.incompatible_features & INCOMPAT_DIRTY)
        if self.extensions.has_bitmaps:
            raise InvalidImageError(
                "images with persistent dirty bitmaps can only be opened read-only"
            )

    async def _clear_unknown_autoclear(self, header: Qcow2Header) -> Qcow2Header:
        """A writer that does not maintain what an autoclear bit vouches for must clear
        the bit (qcow2.txt), e.g. the bitmaps bit without a bitmaps extension."""
        if self.read_only or header.version < 3:
            return header
        known = AUTOCLEAR_DATA_FILE_RAW | (AUTOCLEAR_BITMAPS if self.extensions.has_bitmaps else 0)
        kept = header.autoclear_features & known
        if kept == header.autoclear_features:
            return header
        await self._file.pwrite(HDR_AUTOCLEAR_FEATURES, pack_u64(kept))
        await self._file.sync()
        return header.with_fields(autoclear_features=kept)

    async def _open_data_file(self) -> None:
        from nbdserve.block.chain import resolve_backing_path
        from nbdserve.block.file import FileBackend

        name = self.extensions.data_file
        if not name:
            raise InvalidImageError("image needs an external data file but does not name one")
        dirs = self.allowed_dirs
        allowed = (
            [os.path.dirname(os.path.realpath(self._file.path))]
            if dirs is None
            else [os.path.realpath(d) for d in dirs]
        )
        try:
            path = resolve_backing_path(self._file.path, name, allowed)
        except Exception as exc:
            raise InvalidImageError(f"external data file: {exc}") from exc
        # the export's cache mode applies to the data file too (cache=none: O_DIRECT)
        self.data_file = FileBackend.open(path, read_only=self.read_only, direct=self._file.direct)
        self._own_data_file = True

    async def _load_snapshots(self, header: Qcow2Header) -> list[tuple[int, int]]:
        """(offset, byte length) of the snapshot table and each snapshot's L1 table."""
        if not header.nb_snapshots:
            return []
        want = min(
            snapshot_table_max_size(header.nb_snapshots), self._file.size - header.snapshots_offset
        )
        raw = bytes(await self._file.pread(header.snapshots_offset, want))
        entries = parse_snapshot_table(raw, header.nb_snapshots)
        out = [(header.snapshots_offset, sum(e.entry_size for e in entries))]
        out.extend((e.l1_table_offset, e.l1_size * 8) for e in entries)
        return out

    def _compressed_writer(self, settings: dict[str, object]) -> CompressedWriter | None:
        from nbdserve.block.qcow2.compress import CompressedWriter, parse_settings

        wanted = parse_settings(settings)
        if wanted is None or self.read_only:
            return None
        if self.data_file is not self.file:
            raise ConfigError("compress = true needs an image without an external data file")
        return CompressedWriter(
            self._file, self.refcounts, self.g, self.header.compression_type, wanted
        )

    def _wire_ordering(self) -> None:
        """Express the write-ordering rules of the module docstring as cache hooks."""
        refcounts = self.refcounts
        l2_cache = self.cmap.l2_cache
        l2_cache.before_write = self._before_l2_write
        refcounts.before_decrement = l2_cache.flush
        refcounts.on_reftable_moved = self._write_reftable_location
        refcounts.protected = self._metadata_ranges
        refcounts.l2_offsets = lambda: self.cmap.l1

    async def _before_l2_write(self) -> None:
        """Compressed extents still in the write cache (an L2 entry may point at them),
        then refcounts, reach the file before any L2 table does."""
        if self._compress is not None:
            await self._compress.flush_data()
        await self.refcounts.flush()

    def _metadata_ranges(self) -> list[tuple[int, int]]:
        h = self.header
        cs = h.cluster_size
        out = [
            (0, cs),
            (self.cmap.l1_offset, self.cmap.l1_offset + len(self.cmap.l1) * 8),
            (
                self.refcounts.reftable_offset,
                self.refcounts.reftable_offset + len(self.refcounts.reftable) * 8,
            ),
        ]
        out.extend((off, off + length) for off, length in self.snapshots if length)
        return out

    async def _write_reftable_location(self, offset: int, clusters: int) -> None:
        await self._file.pwrite(HDR_REFCOUNT_TABLE_OFFSET, struct.pack(">QI", offset, clusters))
        self.header = self.header.with_fields(
            refcount_table_offset=offset, refcount_table_clusters=clusters
        )

    def _update_limits(self) -> None:
        """Host offsets at or past the file's last cluster are corrupt metadata."""
        cs = self.header.cluster_size
        limit = -(-self._file.size // cs) * cs
        self.cmap.l2_limit = limit
        self.cmap.host_limit = None if self.data_file is not self.file else limit

    def _setup_capabilities(self) -> None:
        cs = self.header.cluster_size
        self.limits = Limits(
            request_alignment=1,
            max_transfer=32 * 1024 * 1024,
            preferred=max(4096, min(cs, 2 * 1024 * 1024)),
            discard_alignment=cs,
        )
        writable = not self.read_only
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

    # ---- identity -------------------------------------------------------------------

    @property
    def backing_reference(self) -> tuple[str, str | None] | None:
        if not self.backing_file:
            return None
        return self.backing_file, self.extensions.backing_format

    @property
    def _file(self) -> FileBackend:
        assert self.file is not None
        return self.file

    @property
    def _raw_data_file(self) -> bool:
        return self.data_file is not self.file and bool(
            self.header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW
        )

    def describe(self) -> dict[str, object]:
        h = self.header
        data: dict[str, object] = {
            "compat": "1.1" if h.version >= 3 else "0.10",
            "compression-type": COMPRESSION_NAMES[h.compression_type],
            "refcount-bits": h.refcount_bits,
        }
        if h.version >= 3:
            data["lazy-refcounts"] = bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS)
            data["corrupt"] = bool(h.incompatible_features & INCOMPAT_CORRUPT)
            data["extended-l2"] = h.extended_l2
        if self.extensions.data_file:
            data["data-file"] = self.extensions.data_file
            data["data-file-raw"] = self._raw_data_file
        return {
            "format": "qcow2",
            "virtual-size": self.size,
            "cluster-size": h.cluster_size,
            "dirty-flag": bool(h.incompatible_features & INCOMPAT_DIRTY),
            "snapshot-count": h.nb_snapshots,
            "format-specific": {"type": "qcow2", "data": data},
        }

    def statistics(self) -> DriverStatistics:
        stats = DriverStatistics()
        stats.extra.update(self.cmap.l2_cache.statistics())
        stats.extra.update(self.refcounts.cache.statistics())
        cmap = self.cmap
        stats.extra.update(
            l1_entries=len(cmap.l1),
            l2_tables_mapped=cmap.tables_mapped,
            l2_units_classified=cmap.units_classified,
            l1_gaps_skipped=cmap.l1_gaps_skipped,
        )
        if self._compress is not None:
            stats.extra.update(self._compress.statistics())
        return stats

    # ---- mapping ---------------------------------------------------------------------

    async def _map(self, offset: int, length: int, *, hosts_matter: bool = True) -> list[Run]:
        """This layer's runs for [offset, +length) (QEMU qcow2_get_host_offset)."""
        async with self._meta:
            return await self.cmap.map_runs(offset, length, hosts_matter=hosts_matter)

    # ---- reads -------------------------------------------------------------------------

    def try_readinto(self, offset: int, buf: memoryview) -> bool:
        if self.backing is not None and self.cmap.unmapped(offset, len(buf)):
            # no L2 table here: one L1 lookup per layer of a deep chain
            return self._try_read_backing(offset, buf)
        host = self.cmap.peek_host(offset, len(buf))
        if host >= 0:
            return self.data_file.try_pread_into(host, buf)
        if self._spans_clusters(offset, len(buf)):
            pieces = self.cmap.peek_host_pieces(offset, len(buf))
            if pieces is not None:
                return self.data_file.try_pread_pieces_into(pieces, buf)
        if self.cmap.peek_reads_zero(offset, len(buf), no_backing=self.backing is None):
            fill_zeros(buf)
            return True
        # unallocated here: the backing layer may answer inline too, so a read through
        # a deep chain costs one cached lookup per layer, not a task switch per layer
        if self.backing is not None and self.cmap.peek_unallocated(offset, len(buf)):
            return self._try_read_backing(offset, buf)
        return False

    def zero_copy_region(self, offset: int, length: int) -> ZeroCopy | None:
        if self._closed:
            return None
        host = self.cmap.peek_host(offset, length)
        if host >= 0:
            return self.data_file.sendfile_region(host, length)
        if self._spans_clusters(offset, length):
            # contiguous, or scattered over the file (written in random order): one
            # sendfile per stretch still beats copying them through a buffer
            pieces = self.cmap.peek_host_pieces(offset, length)
            if pieces is not None:
                return self.data_file.sendfile_pieces(pieces)
        if self.backing is not None and self.cmap.peek_all_unallocated(offset, length):
            return self._backing_zero_copy(offset, length)  # e.g. an overlay's base
        return None

    def _spans_clusters(self, offset: int, length: int) -> bool:
        cs = self.header.cluster_size
        return (offset & (cs - 1)) + length > cs

    async def readinto(self, offset: int, buf: memoryview) -> None:
        self._check_open()
        pieces = self.cmap.peek_host_pieces(offset, len(buf))
        if pieces is not None:
            if self.data_file.try_pread_pieces_into(pieces, buf):
                await trio.lowlevel.checkpoint()
            else:  # from the disk: one thread hand-off, not one per cluster
                await self.data_file.pread_pieces_into(pieces, buf)
            return
        with self._failing_on_corruption():
            runs = await self._map(offset, len(buf))
        try_pread = self.data_file.try_pread_into
        for run in runs:
            view = buf[run.guest_offset - offset : run.end - offset]
            if run.kind == RunKind.NORMAL and try_pread(run.host_offset, view):
                continue  # page-cached: no trip through the scheduler per fragment
            await self._read_run(run, view)

    async def _read_run(self, run: Run, view: memoryview) -> None:
        kind = run.kind
        if kind == RunKind.NORMAL:
            await self.data_file.pread_into(run.host_offset, view)
        elif kind == RunKind.UNALLOCATED:
            await self._read_backing(run.guest_offset, view)
        elif kind == RunKind.COMPRESSED:
            data = await self._decompress(run.l2_entry)
            start = run.guest_offset & (self.header.cluster_size - 1)
            view[:] = data[start : start + len(view)]
        else:
            fill_zeros(view)
            await trio.lowlevel.checkpoint()

    async def _decompress(self, l2_entry: int) -> bytes:
        cached = self._decompressed.get(l2_entry)
        if cached is not None:
            self._decompressed.move_to_end(l2_entry)
            await trio.lowlevel.checkpoint()
            return cached
        host, nbytes = self.g.compressed_extent(l2_entry)
        cs = self.header.cluster_size
        frees = self.compressed_frees
        raw = await self._read_compressed(host, nbytes)
        if cs > INLINE_DECOMPRESS_MAX:
            data = await trio.to_thread.run_sync(self._decompress_sync, raw, host)
        else:
            data = self._decompress_sync(raw, host)
        if frees != self.compressed_frees:
            return data
        self._decompressed[l2_entry] = data
        while len(self._decompressed) > COMPRESSED_CACHE_ENTRIES:
            self._decompressed.popitem(last=False)
        return data

    async def _read_compressed(self, host: int, nbytes: int) -> bytes:
        """A compressed extent's bytes: from the compressed-write cache while they are
        not on disk yet, else from the file."""
        if self._compress is not None:
            cached = await self._compress.read_raw(self._file, host, nbytes)
            if cached is not None:
                return cached
        if host + nbytes > self._file.size + 512 or nbytes > 2 * self.header.cluster_size + 512:
            raise CorruptImageError(
                f"compressed cluster at {host:#x} lies past the end of the file"
            )
        return bytes(await self._file.pread(host, nbytes))

    def _decompress_sync(self, raw: bytes, host: int) -> bytes:
        cs = self.header.cluster_size
        try:
            if self.header.compression_type == COMPRESSION_ZSTD:
                data = _zstd_decompress_bounded(raw, cs)
            else:
                d = zlib.decompressobj(-12)
                data = d.decompress(raw, cs)
        except (zlib.error, Exception) as exc:
            raise CorruptImageError(
                f"compressed cluster at {host:#x} does not decompress: {exc}"
            ) from None
        if len(data) != cs:
            more = "more than" if len(data) > cs else f"{len(data)} bytes, not"
            raise CorruptImageError(
                f"compressed cluster at {host:#x} decompresses to {more} {cs} bytes"
            )
        return data

    # ---- block status ---------------------------------------------------------------------

    def try_block_status(self, offset: int, length: int) -> Sequence[Extent] | None:
        """block_status from cached metadata alone, or None (then call block_status)."""
        if self._closed or self._metadata_prealloc is not False:
            return None  # preallocated images ask the host file about holes
        cap = min(length, self.size - offset)
        if self.cmap.unmapped(offset, cap):  # e.g. an empty layer of a chain: one lookup
            return [Extent(offset, cap, Status.NONE)]
        limit_end = self._status_limit(offset, offset + cap)
        try:
            runs = self.cmap.peek_runs(
                offset, min(cap, max(1, limit_end - offset)), hosts_matter=False
            )
        except CorruptImageError:
            return None  # the async path reports it (and marks the image failed)
        if runs is None:
            return None
        return self._runs_to_extents(runs)

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        self._check_open()
        cap = min(length, self.size - offset)
        # bound the work per call by the number of L2 tables that may be mapped
        limit_end = self._status_limit(offset, offset + cap)
        # a preallocated image's status asks the host file about each data run
        hosts_matter = self._metadata_prealloc is not False
        with self._failing_on_corruption():
            runs = await self._map(
                offset, min(cap, max(1, limit_end - offset)), hosts_matter=hosts_matter
            )
            if self._metadata_prealloc is None:
                self._metadata_prealloc = await self._detect_metadata_preallocation()
        return self._runs_to_extents(runs)

    def _runs_to_extents(self, runs: list[Run]) -> list[Extent]:
        out: list[Extent] = []
        for run in runs:
            for ext in self._run_status(run):
                if out and out[-1].status == ext.status and out[-1].end == ext.offset:
                    out[-1] = Extent(out[-1].offset, out[-1].length + ext.length, ext.status)
                else:
                    out.append(ext)
        return out

    def _status_limit(self, offset: int, end: int) -> int:
        """End of the range one block_status call maps: STATUS_MAX_TABLES allocated L2
        tables from ``offset``; stretches without tables cost nothing, however long.
        Only the L1 entries of [offset, end) are looked at."""
        span_bits = self.g.l2_span_bits
        start = offset >> span_bits
        stop = ((end - 1) >> span_bits) + 1
        if stop - start <= STATUS_MAX_TABLES:
            return self.size
        allocated = (self.cmap.l1[start:stop] & np.uint64(L2E_OFFSET_MASK)).nonzero()[0]
        if len(allocated) <= STATUS_MAX_TABLES:
            return self.size
        return (start + int(allocated[STATUS_MAX_TABLES])) << span_bits

    def _run_status(self, run: Run) -> list[Extent]:
        kind = run.kind
        if kind == RunKind.UNALLOCATED:
            return [Extent(run.guest_offset, run.length, Status.NONE)]
        if kind in (RunKind.ZERO_PLAIN, RunKind.ZERO_ALLOC):
            return [Extent(run.guest_offset, run.length, Status.ALLOCATED | Status.ZERO)]
        if kind == RunKind.COMPRESSED:
            return [Extent(run.guest_offset, run.length, Status.ALLOCATED | Status.DATA)]
        if not self._metadata_prealloc:
            return [Extent(run.guest_offset, run.length, Status.ALLOCATED | Status.DATA)]
        # like QEMU, in preallocated images data clusters over host holes read as zeros
        out = []
        for host, n, is_data in self.data_file.data_extents(run.host_offset, run.length):
            status = Status.ALLOCATED | Status.DATA | (Status.NONE if is_data else Status.ZERO)
            out.append(Extent(run.guest_offset + host - run.host_offset, n, status))
        return out

    async def _detect_metadata_preallocation(self) -> bool:
        """QEMU's heuristic (qcow2_detect_metadata_preallocation): the host file holds
        clearly fewer clusters than the refcounts claim, so data clusters may be holes.

        The same threshold as QEMU (a tenth more, and at least two clusters): a
        file's block count moves a little with writeback and file-system metadata,
        and without the margin a freshly written image flipped between the two
        answers (and its map between QEMU's and another)."""
        cs = self.header.cluster_size
        real = os.fstat(self._file.fd).st_blocks * 512 // cs
        threshold = max(real * 10 // 9, real + 2)
        async with self._meta:
            used = await self._count_used_clusters(threshold)
        return used >= threshold

    async def _count_used_clusters(self, limit: int) -> int:
        """Clusters of the file with a nonzero refcount, counted up to ``limit``."""
        refcounts = self.refcounts
        file_clusters = -(-self._file.size // self.header.cluster_size)
        blocks = np.flatnonzero(refcounts.reftable & np.uint64(0xFFFFFFFFFFFFFE00))
        count = 0
        for bi in blocks.tolist():
            first = bi << refcounts.block_shift
            if first >= file_clusters or count >= limit:
                break
            counts = await refcounts.get_range(
                first, min(refcounts.entries_per_block, file_clusters - first)
            )
            count += int(np.count_nonzero(counts))
        return count

    # ---- writes --------------------------------------------------------------------------

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise ReadOnlyError("qcow2 image is open read-only")
        if self._failed is not None:
            raise CorruptImageError(f"image is marked failed: {self._failed}")

    def _cluster_range(self, offset: int, length: int) -> tuple[int, int]:
        cb = self.header.cluster_bits
        return offset >> cb, ((offset + length - 1) >> cb) + 1

    def try_write(self, offset: int, data: Buffer, *, fua: bool = False) -> bool:
        if fua or self.read_only or self._failed is not None or self._closed:
            return False
        n = memoryview(data).nbytes
        c0, c1 = self._cluster_range(offset, n)
        if not self._ranges.is_free(c0, c1):
            return False
        if c1 - c0 != 1:
            return self._try_write_clusters(offset, data)
        if self._compress is not None and self._compress.is_full_cluster(offset, n, self.size):
            return False  # whole clusters are stored compressed
        host = self.cmap.peek_host(offset, n)
        if host < 0 or not self._in_place_ok(offset):
            return False
        return self.data_file.try_pwrite(host, data)

    def _try_write_clusters(self, offset: int, data: Buffer) -> bool:
        """``try_write`` over several clusters: only when every one of them may be
        overwritten in place (what ``_in_place_ok`` decides for one), in one
        ``pwrite`` per stretch of the file; nothing is written otherwise.
        Sequential writes of 1 MiB span 16 clusters of 64 KiB."""
        if self._compress is not None:
            return False  # whole clusters inside are stored compressed
        pieces = self.cmap.peek_host_pieces(
            offset, memoryview(data).nbytes, copied=self.data_file is self.file
        )
        return pieces is not None and self.data_file.try_pwrite_pieces(pieces, data)

    def _in_place_ok(self, offset: int) -> bool:
        """Whether the (cached, allocated) cluster at ``offset`` may be overwritten."""
        if self.data_file is not self.file:
            return True
        g = self.g
        table = self.cmap.l2_cache.peek(
            int(self.cmap.l1[offset >> g.l2_span_bits]) & L2E_OFFSET_MASK
        )
        if table is None:
            return False
        idx = (offset >> g.cluster_bits) & (g.l2_entries - 1)
        entry = int(table[2 * idx] if g.extended_l2 else table[idx])
        return bool(entry & QCOW_OFLAG_COPIED)

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        self._check_writable()
        mv = memoryview(data).cast("B")
        c0, c1 = self._cluster_range(offset, mv.nbytes)
        with self._failing_on_corruption():
            async with self._ranges.hold(c0, c1):
                await self._write_locked(offset, mv)
        if fua:
            await self.flush()

    async def _write_locked(self, offset: int, mv: memoryview) -> None:
        """Write with the range lock held, one L2 table's span at a time."""
        from nbdserve.block.qcow2 import compress
        from nbdserve.block.qcow2.write import write_span as normal_write_span

        write_span = normal_write_span if self._compress is None else compress.write_span
        span_bits = self.g.l2_span_bits
        pos = 0
        n = mv.nbytes
        while pos < n:
            guest = offset + pos
            span_end = ((guest >> span_bits) + 1) << span_bits
            step = min(n - pos, span_end - guest)
            await write_span(self, guest, mv[pos : pos + step])
            pos += step

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        from nbdserve.block.qcow2.write import zero_range

        self._check_writable()
        if self._raw_data_file:
            # the raw data file must hold the guest's bytes, so zeros are written as data
            raise NotSupportedError("zeroing images with a raw external data file writes data")
        c0, c1 = self._cluster_range(offset, length)
        with self._failing_on_corruption():
            async with self._ranges.hold(c0, c1):
                await zero_range(self, offset, length, may_unmap=may_unmap, fast=fast)
        if fua:
            await self.flush()

    async def discard(self, offset: int, length: int) -> None:
        from nbdserve.block.qcow2.write import discard_range

        self._check_writable()
        if self._raw_data_file:
            await trio.lowlevel.checkpoint()
            return
        c0, c1 = self._cluster_range(offset, length)
        with self._failing_on_corruption():
            async with self._ranges.hold(c0, c1):
                await discard_range(self, offset, length)

    # ---- flush and close -------------------------------------------------------------------

    async def _flush_metadata(self) -> None:
        """Write cached metadata in dependency order (refcounts, then L2)."""
        with trio.CancelScope(shield=True):
            async with self._meta:
                if self._compress is not None:  # data L2 entries may point at comes first
                    await self._compress.flush_data()
                await self.refcounts.flush()
                await self.cmap.l2_cache.flush()

    async def flush(self) -> None:
        self._check_open()
        if self.read_only:
            await trio.lowlevel.checkpoint()
            return
        await self._flush_metadata()
        if self.data_file is not self.file:
            await self.data_file.sync()
        await self._file.sync()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if not self.read_only and hasattr(self, "cmap"):
                await self._flush_metadata()
                if self.data_file is not self.file:
                    await self.data_file.sync()
                await self._file.sync()
        finally:
            await self.close_files()

    async def close_files(self) -> None:
        self._closed = True
        try:
            if self._own_data_file:
                self._own_data_file = False
                await self.data_file.aclose()
        finally:
            if self._owns_file:
                await self._file.aclose()

    async def reload(self) -> None:
        """Re-read everything from the file (after check/repair rewrote metadata)."""
        if self._own_data_file:
            self._own_data_file = False
            await self.data_file.aclose()
        self.data_file = self._file
        self._decompressed.clear()
        self._metadata_prealloc = None
        await self.open(self._settings)

    # ---- helpers used by write.py -----------------------------------------------------------

    @contextlib.contextmanager
    def _failing_on_corruption(self) -> Iterator[None]:
        """Corrupt metadata fails this request and marks the driver failed
        (QEMU qcow2_signal_corruption): later writes are refused, reads go on."""
        try:
            yield
        except CorruptImageError as exc:
            self.mark_failed(str(exc))
            raise

    def mark_failed(self, reason: str) -> None:
        if self._failed is None:
            LOGGER.error(
                "event=qcow2-failed path=%r error=%r action=refuse-writes",
                self._file.path,
                str(reason),
            )
            self._failed = reason

    async def write_l1_entry(self, l1_index: int, value: int) -> None:
        self.cmap.l1[l1_index] = np.uint64(value)
        await self._file.pwrite(self.cmap.l1_offset + 8 * l1_index, pack_u64(value))


async def create_image(
    path: str,
    size: int,
    options: dict[str, str],
    backing: str | None = None,
    backing_fmt: str | None = None,
) -> None:
    from nbdserve.block.qcow2.create import create

    await create(path, size, options, backing, backing_fmt)


async def check_image(path: str, repair: str | None) -> CheckReport:
    """``qemu-img check`` for qcow2: leaks, corruptions, optional repair."""
    from nbdserve.block.qcow2.check import check_path

    return await check_path(path, repair)


__all__ = [
    "check_image",
    "QCOW_L2_BITMAP_ALL_ALLOC",
    "QCOW_L2_BITMAP_ALL_ZEROES",
    "QCOW_OFLAG_COMPRESSED",
    "QCOW_OFLAG_ZERO",
    "Qcow2Driver",
    "create_image",
    "open_image",
    "probe",
]
