"""The FVD copy-on-write bitmap: one bit per base block, packed LSB first.

``fresh`` is the up-to-date bitmap in memory: a bit is set once the block's
data has landed in the image.  The *stale* bitmap is what the bitmap region on
disk says; it lags behind, and the journal carries the difference (fvd-format
"Journal").  Bits only ever go from 0 to 1, so a stale bitmap is always a
subset of the fresh one and replaying old records is harmless.

Cost scales with the blocks touched, not the base's size: the packed bytes
are a :class:`~nbdserve.block.pagedtable.PagedTable` whose all-zero pages are
not held (a 16 TiB base at 64 KiB blocks has a 32 MiB bitmap), queries unpack
only the bytes covering the requested blocks, and :meth:`Bitmap.runs` jumps
over stretches of 0x00 or 0xFF bytes without unpacking them.  Changed pages
are marked dirty, so write-back covers what changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from nbdserve.block.fvd.structs import bitmap_bytes_needed
from nbdserve.block.pagedtable import PagedTable

if TYPE_CHECKING:
    from nbdserve.block.file import FileBackend

# popcount of every byte value, for progress counts without unpacking
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
# bytes unpacked at a time where set and clear bits are mixed
_MIXED_WINDOW: Final = 512


class Bitmap:
    """Packed bits for blocks ``[0, block_count)``."""

    def __init__(
        self,
        block_count: int,
        raw: bytes | bytearray | None = None,
        *,
        table: PagedTable | None = None,
    ) -> None:
        self.block_count = block_count
        nbytes = bitmap_bytes_needed(block_count)
        if table is None:
            table = PagedTable.from_bytes(raw or b"", nbytes, np.uint8, 0)
        self.table = table
        self._nbytes = nbytes

    @classmethod
    async def load(
        cls,
        file: FileBackend,
        offset: int,
        block_count: int,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> Bitmap:
        """Read the bitmap region (host holes skipped), keeping pages with set bits."""
        nbytes = bitmap_bytes_needed(block_count)
        table = await PagedTable.load(file, offset, nbytes, np.uint8, 0, progress=progress)
        return cls(block_count, table=table)

    # ---- queries --------------------------------------------------------------

    def is_set(self, index: int) -> bool:
        """Whether block ``index`` is in the image (blocks past the base always are)."""
        if index >= self.block_count:
            return True
        return bool((self.table.get(index >> 3) >> (index & 7)) & 1)

    def bits(self, first: int, last: int) -> npt.NDArray[np.bool_]:
        """Bits of blocks ``[first, last)`` clipped to the bitmap, as bools."""
        last = min(last, self.block_count)
        if first >= last:
            return np.zeros(0, dtype=np.bool_)
        lo, hi = first >> 3, (last + 7) >> 3
        unpacked = np.unpackbits(np.asarray(self.table.window(lo, hi - lo)), bitorder="little")
        start = first - (lo << 3)
        return unpacked[start : start + (last - first)].astype(np.bool_)

    def all_set(self, first: int, last: int) -> bool:
        """True when every block in ``[first, last)`` is in the image."""
        last = min(last, self.block_count)
        if first >= last:
            return True
        if last - first == 1:
            return bool((self.table.get(first >> 3) >> (first & 7)) & 1)
        whole_lo, whole_hi = -(-first // 8), last // 8
        if whole_hi <= whole_lo:
            return bool(self.bits(first, last).all())
        if self.table.next_not(whole_lo, whole_hi, 0xFF) < whole_hi:
            return False
        head = self.bits(first, whole_lo * 8)
        tail = self.bits(whole_hi * 8, last)
        return bool(head.all() and tail.all())

    def runs(self, first: int, last: int, max_runs: int = 0) -> list[tuple[int, int, bool]]:
        """(first_block, end_block, is_set) runs covering ``[first, last)``.

        Blocks past the bitmap count as set.  With ``max_runs`` the answer may
        stop early: it then covers ``[first, x)`` for some ``x < last``.
        """
        out: list[tuple[int, int, bool]] = []
        inside = min(last, self.block_count)
        byte_end = (inside + 7) >> 3
        table = self.table
        pos = first
        while pos < inside:
            if max_runs and len(out) >= max_runs:
                return out
            b = pos >> 3
            byte = table.get(b)
            if byte in (0, 0xFF):
                # a stretch of uniform bytes, however long, in one step, from any bit
                # of the first (a map's requests start at unaligned blocks)
                stop = min(inside, table.next_not(b, byte_end, byte) << 3)
                _append_run(out, pos, stop, byte == 0xFF)
                pos = stop
                continue
            n = min(_MIXED_WINDOW, byte_end - b)
            window = np.unpackbits(np.asarray(table.window(b, n)), bitorder="little")
            seg = window[pos - (b << 3) : min(inside - (b << 3), n << 3)].astype(np.bool_)
            edges = np.flatnonzero(np.diff(seg.view(np.int8))) + 1
            starts = [0, *edges.tolist()]
            ends = [*edges.tolist(), len(seg)]
            for s, e in zip(starts, ends, strict=True):
                _append_run(out, pos + s, pos + e, bool(seg[s]))
            pos += len(seg)
        if last > max(first, inside):
            _append_run(out, max(first, inside), last, True)
        return out

    def first_clear(self, start: int) -> int | None:
        """The lowest block >= ``start`` whose bit is 0, or None.

        Stretches of 0xFF bytes are skipped page by page (never-set pages
        hold 0 and answer at once), so a call costs what it skips, not the
        whole bitmap.
        """
        if start >= self.block_count:
            return None
        b = start >> 3
        byte = self.table.get(b)
        for bit in range(start & 7, 8):
            index = (b << 3) + bit
            if index >= self.block_count:
                return None
            if not (byte >> bit) & 1:
                return index
        nxt = self.table.next_not(b + 1, self._nbytes, 0xFF)
        if nxt >= self._nbytes:
            return None
        byte = self.table.get(nxt)
        index = (nxt << 3) + ((~byte & (byte + 1)).bit_length() - 1)
        return index if index < self.block_count else None

    def count_set(self) -> int:
        """Blocks whose bit is 1."""
        _, values = self.table.items()
        total = int(_POPCOUNT[np.asarray(values, dtype=np.uint8)].sum(dtype=np.int64))
        return total - self.stray_bits()

    def stray_bits(self) -> int:
        """Bits set past ``block_count`` in the last byte (they mean nothing)."""
        spare = self._nbytes * 8 - self.block_count
        if not spare:
            return 0
        return bin(self.table.get(self._nbytes - 1) >> (8 - spare)).count("1")

    @property
    def memory_bytes(self) -> int:
        return self.table.memory_bytes

    # ---- updates --------------------------------------------------------------

    def set_range(self, first: int, last: int) -> None:
        """Set bits of blocks ``[first, last)`` (clipped to the bitmap)."""
        last = min(last, self.block_count)
        if first >= last:
            return
        table = self.table
        lo, hi = first >> 3, (last - 1) >> 3
        if lo == hi:
            mask = ((1 << (last - first)) - 1) << (first & 7)
            table.set(lo, table.get(lo) | mask)
            return
        table.set(lo, table.get(lo) | ((0xFF << (first & 7)) & 0xFF))
        if hi > lo + 1:
            table.fill_range(lo + 1, hi, 0xFF)
        table.set(hi, table.get(hi) | ((1 << ((last - 1) % 8 + 1)) - 1))

    def clear_stray_bits(self) -> None:
        spare = self._nbytes * 8 - self.block_count
        if spare:
            last = self._nbytes - 1
            value = self.table.get(last)
            if value >> (8 - spare):
                self.table.set(last, value & ((1 << (8 - spare)) - 1))

    def snapshot(self) -> bytes:
        """The packed bits as they are now (the whole region; tools and tests)."""
        return self.table.to_bytes()


def _append_run(out: list[tuple[int, int, bool]], lo: int, hi: int, is_set: bool) -> None:
    if hi <= lo:
        return
    if out and out[-1][2] == is_set and out[-1][1] == lo:
        out[-1] = (out[-1][0], hi, is_set)
    else:
        out.append((lo, hi, is_set))
