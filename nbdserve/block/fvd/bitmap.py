"""The FVD copy-on-write bitmap: one bit per base block, packed LSB first.

``fresh`` is the up-to-date bitmap in memory: a bit is set once the block's
data has landed in the image.  The *stale* bitmap is what the bitmap region on
disk says; it lags behind, and the journal carries the difference (fvd-format
"Journal").  Bits only ever go from 0 to 1, so a stale bitmap is always a
subset of the fresh one and replaying old records is harmless.

Cost scales with the blocks touched: queries unpack only the bytes covering
the requested blocks.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from nbdserve.block.fvd.structs import bitmap_bytes_needed

# popcount of every byte value, for progress counts without unpacking
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


class Bitmap:
    """Packed bits for blocks ``[0, block_count)``."""

    def __init__(self, block_count: int, raw: bytes | None = None) -> None:
        self.block_count = block_count
        nbytes = bitmap_bytes_needed(block_count)
        if raw is None:
            self.fresh: npt.NDArray[np.uint8] = np.zeros(nbytes, dtype=np.uint8)
        else:
            self.fresh = np.frombuffer(raw, dtype=np.uint8, count=nbytes).copy()

    # ---- queries --------------------------------------------------------------

    def is_set(self, index: int) -> bool:
        """Whether block ``index`` is in the image (blocks past the base always are)."""
        if index >= self.block_count:
            return True
        return bool((int(self.fresh[index >> 3]) >> (index & 7)) & 1)

    def bits(self, first: int, last: int) -> npt.NDArray[np.bool_]:
        """Bits of blocks ``[first, last)`` clipped to the bitmap, as bools."""
        last = min(last, self.block_count)
        if first >= last:
            return np.zeros(0, dtype=np.bool_)
        lo, hi = first >> 3, (last + 7) >> 3
        unpacked = np.unpackbits(self.fresh[lo:hi], bitorder="little")
        start = first - (lo << 3)
        return unpacked[start : start + (last - first)].astype(np.bool_)

    def all_set(self, first: int, last: int) -> bool:
        """True when every block in ``[first, last)`` is in the image."""
        last = min(last, self.block_count)
        if first >= last:
            return True
        if last - first == 1:
            return bool((int(self.fresh[first >> 3]) >> (first & 7)) & 1)
        return bool(self.bits(first, last).all())

    def runs(self, first: int, last: int) -> list[tuple[int, int, bool]]:
        """(first_block, end_block, is_set) runs covering ``[first, last)``.

        Blocks past the bitmap count as set.
        """
        out: list[tuple[int, int, bool]] = []
        inside = min(last, self.block_count)
        if first < inside:
            bits = self.bits(first, inside)
            edges = np.flatnonzero(np.diff(bits.view(np.int8))) + 1
            starts = [0, *edges.tolist()]
            ends = [*edges.tolist(), len(bits)]
            out.extend(
                (first + s, first + e, bool(bits[s])) for s, e in zip(starts, ends, strict=True)
            )
        if last > max(first, inside):
            start = max(first, inside)
            if out and out[-1][2]:
                out[-1] = (out[-1][0], last, True)
            else:
                out.append((start, last, True))
        return out

    def first_clear(self, start: int) -> int | None:
        """The lowest block >= ``start`` whose bit is 0, or None.

        Scans in windows so a call costs what it skips, not the whole bitmap.
        """
        if start >= self.block_count:
            return None
        pos = start >> 3
        size = self.fresh.size
        window = 4096
        while pos < size:
            part = self.fresh[pos : pos + window]
            for c in np.flatnonzero(part != 0xFF).tolist():
                byte = int(part[c])
                base = (pos + c) << 3
                for bit in range(8):
                    index = base + bit
                    if index >= self.block_count:
                        return None
                    if index >= start and not (byte >> bit) & 1:
                        return index
            pos += window
        return None

    def count_set(self) -> int:
        """Blocks whose bit is 1."""
        total = int(_POPCOUNT[self.fresh].sum(dtype=np.int64))
        spare = self.fresh.size * 8 - self.block_count
        if spare:
            last = int(self.fresh[-1]) >> (8 - spare)
            total -= bin(last).count("1")
        return total

    def stray_bits(self) -> int:
        """Bits set past ``block_count`` in the last byte (they mean nothing)."""
        spare = self.fresh.size * 8 - self.block_count
        if not spare:
            return 0
        return bin(int(self.fresh[-1]) >> (8 - spare)).count("1")

    # ---- updates --------------------------------------------------------------

    def set_range(self, first: int, last: int) -> None:
        """Set bits of blocks ``[first, last)`` (clipped to the bitmap)."""
        last = min(last, self.block_count)
        if first >= last:
            return
        lo, hi = first >> 3, (last - 1) >> 3
        if lo == hi:
            mask = ((1 << (last - first)) - 1) << (first & 7)
            self.fresh[lo] |= np.uint8(mask)
            return
        self.fresh[lo] |= np.uint8((0xFF << (first & 7)) & 0xFF)
        if hi > lo + 1:
            self.fresh[lo + 1 : hi] = 0xFF
        self.fresh[hi] |= np.uint8((1 << ((last - 1) % 8 + 1)) - 1)

    def clear_stray_bits(self) -> None:
        spare = self.fresh.size * 8 - self.block_count
        if spare:
            self.fresh[-1] &= np.uint8((1 << (8 - spare)) - 1)

    def snapshot(self) -> bytes:
        """The packed bits as they are now (for writing the bitmap region)."""
        return self.fresh.tobytes()
