"""The Block Allocation Table: guest cluster -> host offset, and its write-back.

Design notes
------------
* The BAT is a :class:`~nbdserve.block.pagedtable.PagedTable` of ``<u4``
  entries: pages of zeros (unallocated clusters) are not held, so memory
  follows the allocated clusters, not the virtual size (a 16 TiB image with
  1 MiB clusters has a 64 MiB BAT).  Opening reads only the parts of the BAT
  region that hold data on the host (SEEK_DATA), so a fresh BAT made by
  ``qemu-img create`` costs nothing to load.
* The header is not part of this table; the driver writes it on its own.
  Dirty BAT pages are written back as merged runs of whole pages (QEMU's
  ``bat_dirty_bmap``), at ``HEADER_SIZE + byte offset in the table``.
* Lookups work on runs: :meth:`BatTable.run_at` says how many clusters from a
  given one are either all unallocated, or allocated and contiguous on the
  host, so one request becomes as few host I/Os as possible.  Unallocated
  stretches are found page by page (absent pages cost nothing); allocated
  ones are scanned at most a window at a time, so a request never costs more
  than it touches.
* Nothing here does I/O (but :meth:`BatTable.load`) or awaits: the driver
  calls these between awaits, so in trio each call is atomic with respect to
  other requests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from nbdserve.block.pagedtable import PagedTable
from nbdserve.block.parallels.structs import BAT_DTYPE, HEADER_SIZE, Geometry

if TYPE_CHECKING:
    from nbdserve.block.file import FileBackend

# Longest stretch of allocated BAT entries one lookup examines (clusters).
SCAN_WINDOW: Final = 1 << 16
# block status answers at most this many runs per call (a shorter answer is legal)
MAX_STATUS_RUNS: Final = 4096


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
    """The BAT held sparsely, with run lookups and dirty-page tracking."""

    def __init__(self, geometry: Geometry, table: PagedTable) -> None:
        if table.count != geometry.bat_entries:
            raise ValueError("table must hold exactly the BAT's entries")
        self.geometry = geometry
        self.cluster_size = geometry.cluster_size
        self.unit = geometry.bat_unit
        self.count = geometry.bat_entries
        self.table = table
        self._step = self.cluster_size // self.unit

    @classmethod
    async def load(
        cls,
        file: FileBackend,
        geometry: Geometry,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> BatTable:
        """Read the BAT region (holes skipped), keeping the pages that map clusters."""
        table = await PagedTable.load(
            file, HEADER_SIZE, geometry.bat_entries, BAT_DTYPE, 0, progress=progress
        )
        return cls(geometry, table)

    @classmethod
    def from_entries(cls, geometry: Geometry, entries: npt.ArrayLike) -> BatTable:
        """A BAT from a list of entries (tests)."""
        raw = np.asarray(entries, dtype=BAT_DTYPE).tobytes()
        return cls(geometry, PagedTable.from_bytes(raw, geometry.bat_entries, BAT_DTYPE, 0))

    # ---- lookups ------------------------------------------------------------

    def host_offset(self, index: int) -> int:
        """Host offset of guest cluster ``index``; 0 when unallocated."""
        return self.table.get(index) * self.unit

    def run_at(self, first: int, count: int) -> tuple[int, int]:
        """(host offset or 0, clusters) of the run starting at cluster ``first``.

        The run is at most ``count`` clusters: either all unallocated (host 0;
        any length, found page by page), or allocated with each cluster right
        after the previous one on the host (at most one scan window).
        """
        table = self.table
        if count == 1:  # the common small request: one lookup, no vector work
            return table.get(first) * self.unit, 1
        stop = min(first + count, self.count)
        n = table.run_length(first, stop, self._step)
        return table.get(first) * self.unit, n

    def allocation_runs(self, first: int, count: int) -> list[tuple[int, int, bool]]:
        """(first cluster, clusters, allocated) runs covering up to ``count`` clusters.

        Host contiguity is ignored: this is the block-status view.  Runs
        alternate; at most :data:`MAX_STATUS_RUNS` are returned, so the answer
        may cover less than asked.
        """
        table = self.table
        stop = min(first + count, self.count)
        out: list[tuple[int, int, bool]] = []
        pos = first
        while pos < stop and len(out) < MAX_STATUS_RUNS:
            mapped = table.next_non_fill(pos, stop)
            if mapped > pos:
                _append_run(out, pos, mapped - pos, False)
                pos = mapped
                continue
            # mapped entries live in stored pages: scan to the end of those, at most
            n = table.stored_end(pos, min(stop, pos + SCAN_WINDOW)) - pos
            allocated = table.window(pos, n) != 0
            bounds = (np.diff(allocated.view(np.int8)) != 0).nonzero()[0] + 1
            starts = [0, *bounds.tolist()]
            ends = [*bounds.tolist(), n]
            for s, e in zip(starts, ends, strict=True):
                _append_run(out, pos + s, e - s, bool(allocated[s]))
            pos += n
        return out

    def allocated(self) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64]]:
        """(guest cluster indices, host offsets) of every allocated cluster, ascending."""
        index, values = self.table.items()
        return index, values.astype(np.int64) * self.unit

    def allocated_count(self) -> int:
        return len(self.table.items()[0])

    def data_end(self) -> int:
        """End of the highest allocated host cluster, at least the data start."""
        _, host = self.allocated()
        if not len(host):
            return self.geometry.data_start
        return max(self.geometry.data_start, int(host.max()) + self.cluster_size)

    def problems(self, file_size: int) -> BatProblems:
        """Entries that point outside the file, into the metadata, or to a shared cluster.

        Works on the allocated entries only, so an empty BAT costs nothing.
        """
        index, host = self.allocated()
        outside = index[host + self.cluster_size > file_size]
        inside_meta = index[host < self.geometry.data_start]
        return BatProblems(outside, inside_meta, duplicate_indices(index, host))

    # ---- updates ------------------------------------------------------------

    def set_run(self, first: int, count: int, host_offset: int) -> None:
        """Map clusters ``first..first+count`` to consecutive host clusters."""
        assert host_offset > 0
        assert host_offset % self.unit == 0
        start = host_offset // self.unit
        values = start + self._step * np.arange(count, dtype=np.int64)
        if int(values[-1]) > 0xFFFFFFFF:
            raise OverflowError("host offset not representable in the BAT")
        self.table.set_range(first, values.astype(BAT_DTYPE))

    def set_entry(self, index: int, value: int) -> None:
        """Set one raw entry (in BAT units; the checker's repairs)."""
        self.table.set(index, value)

    def clear(self, index: int) -> None:
        self.table.set(index, 0)

    def clear_run(self, first: int, count: int) -> None:
        self.table.fill_range(first, first + count, 0)

    def clear_many(self, indices: npt.NDArray[np.intp]) -> None:
        self.table.set_many(indices, 0)

    def has_dirty(self) -> bool:
        return self.table.has_dirty()

    def take_dirty(self) -> list[tuple[int, bytes]]:
        """(host offset, bytes) of dirty BAT pages, snapshotted; clears the marks."""
        return [(HEADER_SIZE + off, data) for off, data in self.table.take_dirty()]

    def restore_dirty(self, chunks: list[tuple[int, bytes]]) -> None:
        """Mark chunks from :meth:`take_dirty` dirty again after a failed write-back."""
        self.table.restore_dirty([(off - HEADER_SIZE, data) for off, data in chunks])

    def statistics(self) -> dict[str, int]:
        t = self.table
        return {
            "bat_entries": self.count,
            "bat_pages_present": t.pages_present,
            "bat_bytes_resident": t.memory_bytes,
            "bat_bytes_loaded": t.bytes_read,
            "bat_entries_scanned": t.entries_scanned,
        }


def _append_run(out: list[tuple[int, int, bool]], start: int, n: int, allocated: bool) -> None:
    if out and out[-1][2] == allocated and out[-1][0] + out[-1][1] == start:
        out[-1] = (out[-1][0], out[-1][1] + n, allocated)
    else:
        out.append((start, n, allocated))


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


__all__ = ["MAX_STATUS_RUNS", "SCAN_WINDOW", "BatProblems", "BatTable", "duplicate_indices"]
