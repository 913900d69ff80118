"""The Block Allocation Table: guest cluster -> host offset, and its write-back.

Design notes
------------
* The header and the BAT live in one owned ``bytearray`` (``meta``), exactly
  as they sit at the start of the file, and the BAT array is a ``<u4`` numpy
  view into it.  A dirty BAT page is then written back as a plain slice of
  ``meta``, header bytes included when the page is the first one (QEMU keeps
  the same single buffer).
* Dirtiness is tracked per BAT page of :data:`BAT_PAGE_SIZE` bytes in a numpy
  bool array (QEMU's ``bat_dirty_bmap``); :meth:`BatTable.take_dirty` turns it
  into merged byte ranges and clears it.
* Lookups work on runs: :meth:`BatTable.run_at` says how many clusters from a
  given one are either all unallocated, or allocated and contiguous on the
  host, so one request becomes as few host I/Os as possible.  Scans look at a
  bounded window so a request never costs more than it touches.
* Nothing here does I/O or awaits: the driver calls these between awaits, so
  in trio each call is atomic with respect to other requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from nbdserve.block.parallels.structs import (
    BAT_DTYPE,
    HEADER_SIZE,
    Geometry,
    bat_entry_offset,
)

# QEMU writes the BAT back in blocks of 4 host pages.
BAT_PAGE_SIZE: Final = 16 * 1024
# Longest stretch of the BAT one lookup examines (clusters).
SCAN_WINDOW: Final = 1 << 16


@dataclass(frozen=True, slots=True)
class BatProblems:
    """Entries a writer must not trust (found at open; ``nbdserve img check`` repairs)."""

    outside: npt.NDArray[np.intp]  # cluster not wholly inside the file
    inside_metadata: npt.NDArray[np.intp]  # cluster overlaps the header/BAT
    duplicates: npt.NDArray[np.intp]  # same host cluster as an earlier entry

    @property
    def count(self) -> int:
        return int(self.outside.size + self.inside_metadata.size + self.duplicates.size)

    def describe(self) -> str:
        parts = []
        if self.outside.size:
            parts.append(
                f"{self.outside.size} BAT entries point outside the file "
                f"(first: cluster {int(self.outside[0])})"
            )
        if self.inside_metadata.size:
            parts.append(
                f"{self.inside_metadata.size} BAT entries point into the header/BAT "
                f"(first: cluster {int(self.inside_metadata[0])})"
            )
        if self.duplicates.size:
            parts.append(
                f"{self.duplicates.size} BAT entries share a host cluster "
                f"(first: cluster {int(self.duplicates[0])})"
            )
        return "; ".join(parts)


class BatTable:
    """The in-memory header + BAT, with run lookups and dirty-page tracking."""

    def __init__(self, meta: bytearray, geometry: Geometry) -> None:
        if len(meta) != geometry.bat_end:
            raise ValueError("meta must hold exactly the header and the BAT")
        self.meta = meta
        self.geometry = geometry
        self.cluster_size = geometry.cluster_size
        self.unit = geometry.bat_unit
        self.count = geometry.bat_entries
        self.entries: npt.NDArray[np.uint32] = np.frombuffer(
            meta, dtype=BAT_DTYPE, count=self.count, offset=HEADER_SIZE
        )
        pages = -(-len(meta) // BAT_PAGE_SIZE)
        self._dirty = np.zeros(pages, dtype=np.bool_)

    # ---- lookups ------------------------------------------------------------

    def host_offset(self, index: int) -> int:
        """Host offset of guest cluster ``index``; 0 when unallocated."""
        return int(self.entries[index]) * self.unit

    def run_at(self, first: int, count: int) -> tuple[int, int]:
        """(host offset or 0, clusters) of the run starting at cluster ``first``.

        The run is at most ``count`` clusters (and at most one scan window):
        either all unallocated (host 0), or allocated with each cluster right
        after the previous one on the host.
        """
        count = min(count, SCAN_WINDOW, self.count - first)
        seg = self.entries[first : first + count]
        head = int(seg[0])
        if head == 0:
            nonzero = np.flatnonzero(seg)
            return 0, int(nonzero[0]) if nonzero.size else count
        step = self.cluster_size // self.unit
        expected = head + step * np.arange(count, dtype=np.int64)
        breaks = np.flatnonzero(seg.astype(np.int64) != expected)
        return head * self.unit, int(breaks[0]) if breaks.size else count

    def allocation_runs(self, first: int, count: int) -> list[tuple[int, int, bool]]:
        """(first cluster, clusters, allocated) runs covering up to ``count`` clusters.

        Host contiguity is ignored: this is the block-status view.
        """
        count = min(count, SCAN_WINDOW, self.count - first)
        allocated = self.entries[first : first + count] != 0
        bounds = np.flatnonzero(np.diff(allocated)) + 1
        starts = np.concatenate(([0], bounds))
        ends = np.concatenate((bounds, [count]))
        return [
            (first + int(s), int(e - s), bool(allocated[s]))
            for s, e in zip(starts, ends, strict=True)
        ]

    def allocated_count(self) -> int:
        return int(np.count_nonzero(self.entries))

    def data_end(self) -> int:
        """End of the highest allocated host cluster, at least the data start."""
        if not self.count:
            return self.geometry.data_start
        top = int(self.entries.max())
        if top == 0:
            return self.geometry.data_start
        return max(self.geometry.data_start, top * self.unit + self.cluster_size)

    def problems(self, file_size: int) -> BatProblems:
        """Entries that point outside the file, into the metadata, or to a shared cluster.

        Works on the allocated entries only, so an empty BAT costs one scan.
        """
        index = np.flatnonzero(self.entries)
        host = self.entries[index].astype(np.int64) * self.unit
        outside = index[host + self.cluster_size > file_size]
        inside_meta = index[host < self.geometry.data_start]
        return BatProblems(outside, inside_meta, duplicate_indices(index, host))

    # ---- updates ------------------------------------------------------------

    def set_run(self, first: int, count: int, host_offset: int) -> None:
        """Map clusters ``first..first+count`` to consecutive host clusters."""
        assert host_offset > 0
        assert host_offset % self.unit == 0
        step = self.cluster_size // self.unit
        start = host_offset // self.unit
        values = start + step * np.arange(count, dtype=np.int64)
        if int(values[-1]) > 0xFFFFFFFF:
            raise OverflowError("host offset not representable in the BAT")
        self.entries[first : first + count] = values
        self._mark(first, count)

    def clear(self, index: int) -> None:
        self.entries[index] = 0
        self._mark(index, 1)

    def _mark(self, first: int, count: int) -> None:
        lo = bat_entry_offset(first) // BAT_PAGE_SIZE
        hi = (bat_entry_offset(first + count) - 1) // BAT_PAGE_SIZE
        self._dirty[lo : hi + 1] = True

    def mark_header_dirty(self) -> None:
        self._dirty[0] = True

    def has_dirty(self) -> bool:
        return bool(self._dirty.any())

    def take_dirty(self) -> list[tuple[int, int]]:
        """Merged (offset, length) byte ranges of dirty pages; clears the marks."""
        pages = np.flatnonzero(self._dirty)
        if not pages.size:
            return []
        self._dirty[:] = False
        bounds = np.flatnonzero(np.diff(pages) != 1) + 1
        out = []
        for run in np.split(pages, bounds):
            lo = int(run[0]) * BAT_PAGE_SIZE
            hi = min((int(run[-1]) + 1) * BAT_PAGE_SIZE, len(self.meta))
            out.append((lo, hi - lo))
        return out

    def restore_dirty(self, ranges: list[tuple[int, int]]) -> None:
        """Mark ranges dirty again after a failed write-back."""
        for off, length in ranges:
            self._dirty[off // BAT_PAGE_SIZE : -(-(off + length) // BAT_PAGE_SIZE)] = True


def duplicate_indices(
    index: npt.NDArray[np.intp], host: npt.NDArray[np.int64]
) -> npt.NDArray[np.intp]:
    """Those of ``index`` (ascending) whose ``host`` offset already appeared earlier."""
    if index.size < 2:
        return np.empty(0, dtype=np.intp)
    order = np.argsort(host, kind="stable")  # stable: lower index first among equals
    sorted_host = host[order]
    repeat = np.flatnonzero(sorted_host[1:] == sorted_host[:-1]) + 1
    return np.sort(index[order[repeat]])


__all__ = ["BAT_PAGE_SIZE", "SCAN_WINDOW", "BatProblems", "BatTable", "duplicate_indices"]
