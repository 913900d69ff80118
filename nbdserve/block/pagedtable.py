"""PagedTable: a large on-disk array of fixed-width entries, held sparsely by page.

Design notes
------------
* Some formats map the whole virtual disk with one table entry per cluster,
  with no directory above it: the Parallels BAT, the FVD lookup table and the
  FVD bitmap.  Such a table grows with the virtual size (a 16 TiB parallels
  image with 1 MiB clusters has a 64 MiB BAT) while most of it usually holds
  the "nothing here" value, ``fill``.  The table is cut into pages of
  :data:`PAGE_BYTES`; a page that is ``fill`` throughout is not stored.
  Memory then follows the allocated part of the disk, not its size.
* :meth:`PagedTable.load` streams the on-disk region once, in
  :data:`LOAD_CHUNK` pieces, keeping only the pages that differ from ``fill``.
  When ``fill`` is zero, host holes (SEEK_DATA/SEEK_HOLE) are skipped without
  being read: a fresh BAT made by ``qemu-img create`` costs nothing.  A table
  whose ``fill`` is not zero (FVD's 0xFFFFFFFF) must be read through, at
  memory speed; the format has no directory of used pages (qcow2's L1 table
  is one), so that part of opening is inherent.
* ``present`` (one bool per page) lets scans jump over absent pages with a
  single vector operation: finding the next used entry costs pages, not
  entries, and a block-status walk over an empty stretch is one step.
* Dirtiness is tracked per page (QEMU's ``bat_dirty_bmap``); dirty pages are
  handed out as merged byte runs, snapshotted, for write-back.
* Everything but :meth:`load` is synchronous, hence atomic between trio
  checkpoints.  Counters (``entries_scanned``, ``bytes_read``) feed the
  drivers' statistics, so tests can compare costs at two virtual sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from nbdserve.block.file import FileBackend

# bytes per page: small, so data scattered over a huge disk costs little memory
PAGE_BYTES: Final = 4096
# bytes read at a time while loading a table region
LOAD_CHUNK: Final = 4 << 20
# entries one run scan looks at, at most, in stretches that are not ``fill``
SCAN_WINDOW: Final = 1 << 16

Array = npt.NDArray[np.generic]


class PagedTable:
    """Entries ``[0, count)`` of one dtype; pages equal to ``fill`` are not stored."""

    def __init__(
        self, count: int, dtype: npt.DTypeLike, fill: int, *, page_bytes: int = PAGE_BYTES
    ) -> None:
        self.count = count
        self.dtype = np.dtype(dtype)
        self.fill = fill
        entries = max(1, page_bytes // self.dtype.itemsize)
        self.page_bits = entries.bit_length() - 1
        self.page_entries = 1 << self.page_bits
        self._mask = self.page_entries - 1
        self.page_count = -(-count // self.page_entries)
        self._pages: dict[int, Array] = {}
        self.present: npt.NDArray[np.bool_] = np.zeros(self.page_count, dtype=np.bool_)
        self._dirty: npt.NDArray[np.bool_] = np.zeros(self.page_count, dtype=np.bool_)
        fill_page = np.full(self.page_entries, fill, dtype=self.dtype)
        fill_page.setflags(write=False)
        self._fill_page = fill_page
        self._fill_is_zero = not fill_page.any()
        self.bytes_read = 0  # on-disk bytes read by load()
        self.entries_scanned = 0  # entries looked at by run scans and windows

    # ---- construction -------------------------------------------------------

    @classmethod
    def from_bytes(
        cls, raw: bytes | bytearray | memoryview, count: int, dtype: npt.DTypeLike, fill: int
    ) -> PagedTable:
        """A table from its on-disk bytes; short input counts as ``fill`` (tests, tools)."""
        table = cls(count, dtype, fill)
        table._absorb(0, memoryview(raw).cast("B")[: count * table.dtype.itemsize])
        return table

    @classmethod
    async def load(
        cls,
        file: FileBackend,
        offset: int,
        count: int,
        dtype: npt.DTypeLike,
        fill: int,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> PagedTable:
        """Stream the region at ``offset`` into a new table, keeping non-fill pages.

        ``progress(done, nbytes)`` follows the position in the region after each
        read (skipped holes count as done): loading is most of what a check of a
        huge parallels or FVD image spends, so that is where its bar moves.
        """
        table = cls(count, dtype, fill)
        page_size = table.page_entries * table.dtype.itemsize
        nbytes = count * table.dtype.itemsize
        for first, last in table._pages_to_read(file, offset, nbytes):
            pos = first
            while pos < last:
                stop = min(last, pos + max(1, LOAD_CHUNK // page_size))
                lo = pos * page_size
                hi = min(stop * page_size, nbytes)
                raw = await file.pread(offset + lo, hi - lo)
                table.bytes_read += hi - lo
                table._absorb(lo, memoryview(raw))
                pos = stop
                if progress is not None:
                    progress(hi, nbytes)
        return table

    def _pages_to_read(self, file: FileBackend, offset: int, nbytes: int) -> list[tuple[int, int]]:
        """[first, last) page ranges that may hold non-fill bytes."""
        if not nbytes:
            return []
        page_size = self.page_entries * self.dtype.itemsize
        if not self._fill_is_zero:
            return [(0, self.page_count)]
        out: list[tuple[int, int]] = []
        for host, length, is_data in file.data_extents(offset, nbytes):
            if not is_data:
                continue
            first = (host - offset) // page_size
            last = -(-(host + length - offset) // page_size)
            if out and first <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], last))
            else:
                out.append((first, last))
        return out

    def _absorb(self, byte_offset: int, raw: memoryview) -> None:
        """Keep the non-fill pages of ``raw``, which starts at a page boundary."""
        itemsize = self.dtype.itemsize
        n = len(raw) // itemsize
        if not n:
            return
        first_page = byte_offset // (self.page_entries * itemsize)
        entries = np.frombuffer(raw, dtype=self.dtype, count=n)
        full = n >> self.page_bits
        if full:
            grid = entries[: full << self.page_bits].reshape(full, self.page_entries)
            differs = np.asarray(
                grid.any(axis=1) if self._fill_is_zero else (grid != self.fill).any(axis=1)
            )
            keep = differs.nonzero()[0]
            for i in keep.tolist():
                self._store(first_page + i, grid[i].copy())
        rest = entries[full << self.page_bits :]
        if len(rest) and (rest != self.fill).any():
            page = self._fill_page.copy()
            page[: len(rest)] = rest
            self._store(first_page + full, page)

    def _store(self, page_index: int, page: Array) -> None:
        self._pages[page_index] = page
        self.present[page_index] = True

    # ---- reads --------------------------------------------------------------

    def get(self, index: int) -> int:
        page = self._pages.get(index >> self.page_bits)
        if page is None:
            return self.fill
        # item() gives a Python int without a numpy scalar in between (half the cost)
        return page.item(index & self._mask)  # type: ignore[no-any-return]

    def window(self, first: int, count: int) -> Array:
        """Entries ``[first, first+count)`` (clipped to the table); do not modify."""
        stop = min(first + count, self.count)
        if stop <= first:
            return self._fill_page[:0]
        self.entries_scanned += stop - first
        bits, mask = self.page_bits, self._mask
        p0, p1 = first >> bits, (stop - 1) >> bits
        if p0 == p1:
            page = self._pages.get(p0, self._fill_page)
            return page[first & mask : ((stop - 1) & mask) + 1]
        parts = [self._pages.get(p, self._fill_page) for p in range(p0, p1 + 1)]
        parts[0] = parts[0][first & mask :]
        parts[-1] = parts[-1][: ((stop - 1) & mask) + 1]
        return np.concatenate(parts)

    def next_not(self, first: int, stop: int, value: int) -> int:
        """The first index in ``[first, stop)`` whose entry is not ``value``, else ``stop``.

        Absent pages are judged as a whole, so a long stretch of them costs one
        vector operation over ``present``.
        """
        stop = min(stop, self.count)
        bits, mask = self.page_bits, self._mask
        fill_matches = value == self.fill
        pos = first
        while pos < stop:
            p = pos >> bits
            page = self._pages.get(p)
            if page is None:
                if not fill_matches:
                    return pos
                last = (stop - 1) >> bits
                later = self.present[p + 1 : last + 1].nonzero()[0]
                if not len(later):
                    return stop
                pos = (p + 1 + int(later[0])) << bits
                continue
            end = min(self.page_entries, stop - (p << bits))
            seg = page[pos & mask : end]
            self.entries_scanned += len(seg)
            hit = (seg != value).nonzero()[0]
            if len(hit):
                return pos + int(hit[0])
            pos = (p << bits) + end
        return stop

    def next_non_fill(self, first: int, stop: int) -> int:
        return self.next_not(first, stop, self.fill)

    def stored_end(self, first: int, stop: int) -> int:
        """Where the stretch of stored pages holding ``first`` ends (at most ``stop``):
        past it the entries are ``fill``, so scans of non-fill runs stop there."""
        stop = min(stop, self.count)
        p = first >> self.page_bits
        last = (stop - 1) >> self.page_bits
        gaps = (~self.present[p : last + 1]).nonzero()[0]
        if not len(gaps):
            return stop
        return min(stop, (p + int(gaps[0])) << self.page_bits)

    def run_length(self, first: int, stop: int, step: int) -> int:
        """Entries from ``first`` (before ``stop``) that are all ``fill``, or all not
        ``fill`` and each ``step`` above the previous (a host-contiguous run).

        A fill run may be as long as the table; a mapped run is examined one
        :data:`SCAN_WINDOW` at a time, so its length is capped there.
        """
        stop = min(stop, self.count)
        head = self.get(first)
        if head == self.fill:
            return self.next_not(first, stop, self.fill) - first
        n = min(self.stored_end(first, min(stop, first + SCAN_WINDOW)) - first, SCAN_WINDOW)
        if n <= 1:
            return 1
        seg = self.window(first, n).astype(np.int64)
        expected = head + step * np.arange(n, dtype=np.int64)
        breaks = (seg != expected).nonzero()[0]
        return int(breaks[0]) if len(breaks) else n

    def items(self) -> tuple[npt.NDArray[np.intp], Array]:
        """(indices, values) of every non-fill entry, ascending."""
        idx_parts: list[npt.NDArray[np.intp]] = []
        val_parts: list[Array] = []
        for p, page in self._present_pages():
            nz = (page != self.fill).nonzero()[0]
            if len(nz):
                idx = nz + (p << self.page_bits)
                keep = idx < self.count
                idx_parts.append(idx[keep])
                val_parts.append(page[nz[keep]])
        if not idx_parts:
            return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=self.dtype)
        return np.concatenate(idx_parts), np.concatenate(val_parts)

    def _present_pages(self) -> Iterator[tuple[int, Array]]:
        for p in self.present.nonzero()[0].tolist():
            yield p, self._pages[p]

    def dense(self) -> Array:
        """The whole table as one array (tools and tests; O(count))."""
        out = np.full(self.count, self.fill, dtype=self.dtype)
        for p, page in self._present_pages():
            lo = p << self.page_bits
            hi = min(lo + self.page_entries, self.count)
            out[lo:hi] = page[: hi - lo]
        return out

    def to_bytes(self) -> bytes:
        return self.dense().tobytes()

    @property
    def pages_present(self) -> int:
        return len(self._pages)

    @property
    def memory_bytes(self) -> int:
        """Bytes held by stored pages (the part that follows the data)."""
        return len(self._pages) * self.page_entries * self.dtype.itemsize

    # ---- updates ------------------------------------------------------------

    def _writable_page(self, p: int) -> Array:
        page = self._pages.get(p)
        if page is None:
            page = self._fill_page.copy()
            self._store(p, page)
        self._dirty[p] = True
        return page

    def set(self, index: int, value: int) -> None:
        self._writable_page(index >> self.page_bits)[index & self._mask] = value

    def set_range(self, first: int, values: Array) -> None:
        """Set the entries from ``first`` on to ``values`` (see :meth:`fill_range`
        for one value repeated)."""
        array = np.asarray(values, dtype=self.dtype)
        n = len(array)
        pos = 0
        while pos < n:
            index = first + pos
            p = index >> self.page_bits
            a = index & self._mask
            take = min(self.page_entries - a, n - pos)
            self._writable_page(p)[a : a + take] = array[pos : pos + take]
            pos += take

    def fill_range(self, first: int, stop: int, value: int) -> None:
        """Set entries ``[first, stop)`` to ``value``; setting ``fill`` over whole
        absent pages stores nothing."""
        pos = first
        while pos < stop:
            p = pos >> self.page_bits
            a = pos & self._mask
            take = min(self.page_entries - a, stop - pos)
            if value == self.fill and p not in self._pages:
                pos += take
                continue
            self._writable_page(p)[a : a + take] = value
            pos += take

    def set_many(self, indices: npt.NDArray[np.intp], value: int) -> None:
        for index in np.asarray(indices).tolist():
            self.set(int(index), value)

    # ---- write-back ---------------------------------------------------------

    def has_dirty(self) -> bool:
        return bool(self._dirty.any())

    def take_dirty(self) -> list[tuple[int, bytes]]:
        """(byte offset in the table, bytes) of merged runs of dirty pages, snapshotted
        now; the marks are cleared (``restore_dirty`` puts them back on failure)."""
        pages = self._dirty.nonzero()[0]
        if not len(pages):
            return []
        self._dirty[:] = False
        itemsize = self.dtype.itemsize
        page_size = self.page_entries * itemsize
        limit = self.count * itemsize
        out: list[tuple[int, bytes]] = []
        bounds = (np.diff(pages) != 1).nonzero()[0] + 1
        for run in np.split(pages, bounds):
            first, last = int(run[0]), int(run[-1])
            data = b"".join(
                self._pages.get(p, self._fill_page).tobytes() for p in range(first, last + 1)
            )
            lo = first * page_size
            out.append((lo, data[: min(len(data), limit - lo)]))
        return out

    def restore_dirty(self, chunks: list[tuple[int, bytes]]) -> None:
        """Mark the pages of chunks from :meth:`take_dirty` dirty again."""
        page_size = self.page_entries * self.dtype.itemsize
        for offset, data in chunks:
            self._dirty[offset // page_size : -(-(offset + len(data)) // page_size)] = True

    def mark_all_dirty(self) -> None:
        """Every stored page is to be written (e.g. after a repair)."""
        self._dirty[:] = self.present


__all__ = ["LOAD_CHUNK", "PAGE_BYTES", "SCAN_WINDOW", "PagedTable"]
