"""``nbdserve img check [--repair leaks|all]`` for parallels images.

reference: qemu block/parallels.c parallels_co_check and its helpers
(check_unclean, check_data_off, check_outside_image, check_leak,
check_duplicate, collect_statistics).  Differences, on purpose:

* an entry pointing into the header/BAT is a corruption too (repaired like
  one outside the file: the entry is dropped; its "data" is metadata);
* an image with no allocated cluster ends at its data offset, so a fresh
  image has no "leak" (QEMU 7.2 reports one);
* the format extension cluster, if any, counts as used space; one that lies
  outside the file is a corruption (repair forgets it: ext_off = 0).

After a repair the image is checked again and that second result is the
report, as ``qemu-img check -r`` does ("Double checking the fixed image").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from nbdserve.block.check import CheckReport
from nbdserve.block.file import FileBackend
from nbdserve.block.parallels import ext_inside_file, read_metadata
from nbdserve.block.parallels.bat import BatTable, duplicate_indices
from nbdserve.block.parallels.structs import INUSE_CLOSED, SECTOR_SIZE
from nbdserve.progress import report as report_progress

# more messages than this per kind are summarised
MAX_MESSAGES: Final = 50


@dataclass(slots=True)
class _Pass:
    fix_errors: bool
    fix_leaks: bool
    report: CheckReport

    def problem(self, text: str, *, leak: bool = False) -> bool:
        """Count one problem and say whether it is to be repaired."""
        fixing = self.fix_leaks if leak else self.fix_errors
        if not leak:  # leaks are counted by the caller, in clusters
            self.report.corruptions += 1
        self.report.messages.append(f"{'Repairing' if fixing else 'ERROR'} {text}")
        return fixing


async def check(path: str, repair: str | None) -> CheckReport:
    if repair not in (None, "leaks", "all"):
        raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
    file = FileBackend.open(path, read_only=repair is None)
    try:
        first = await _check_once(file, repair == "all", repair is not None)
        if not (first.corruptions_fixed or first.leaks_fixed):
            return first
        final = await _check_once(file, False, False)
        final.corruptions_fixed = first.corruptions_fixed
        final.leaks_fixed = first.leaks_fixed
        final.messages = [
            *first.messages,
            "Double checking the fixed image now...",
            *final.messages,
        ]
        return final
    finally:
        await file.aclose()


async def _check_once(file: FileBackend, fix_errors: bool, fix_leaks: bool) -> CheckReport:
    # reading the BAT is the walk that grows with the image (a 16 TiB image has
    # a 64 MiB BAT); what follows is vector work over the allocated entries
    header, geometry, bat = await read_metadata(file, progress=report_progress)
    p = _Pass(fix_errors, fix_leaks, CheckReport())
    report = p.report
    cs = geometry.cluster_size
    dirty = False
    if header.unclean and p.problem("image was not closed correctly"):
        header = header.replace(inuse=INUSE_CLOSED)
        report.corruptions_fixed += 1
        dirty = True
    if not geometry.data_off_ok and p.problem("data_off field has incorrect value"):
        header = header.replace(data_off=geometry.data_start // SECTOR_SIZE)
        report.corruptions_fixed += 1
        dirty = True
    dirty |= _check_entries(p, bat, file.size, geometry.data_start)
    if not ext_inside_file(geometry, file.size) and p.problem(
        f"format extension cluster at {geometry.ext_offset} is outside image"
    ):
        header = header.replace(ext_off=0)  # nothing of it is in the file to keep
        report.corruptions_fixed += 1
        dirty = True
    index, host = _allocated(bat)
    valid = (host + cs <= file.size) & (host >= geometry.data_start)
    end = int(host[valid].max()) + cs if valid.any() else geometry.data_start
    if geometry.ext_offset and ext_inside_file(geometry, file.size):
        end = max(end, geometry.ext_offset + cs)
    end = max(end, geometry.data_start)
    if file.size > end:
        count = -(-(file.size - end) // cs)
        report.leaks += count
        if p.problem(f"space leaked at the end of the image {file.size - end}", leak=True):
            await file.truncate(end)
            report.leaks_fixed += count
    end, moved = await _check_duplicates(p, file, bat, index[valid], host[valid], end)
    dirty |= moved
    if dirty:
        await file.pwrite(0, header.to_bytes())
        for offset, data in bat.take_dirty():
            await file.pwrite(offset, data)
        await file.sync()
    _collect_statistics(report, bat, end)
    report.image_end_offset = end
    return report


def _allocated(bat: BatTable) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64]]:
    return bat.allocated()


def _check_entries(p: _Pass, bat: BatTable, file_size: int, data_start: int) -> bool:
    """Entries pointing outside the file or into the metadata; repair drops them."""
    index, host = _allocated(bat)
    outside = host + bat.cluster_size > file_size
    inside_meta = host < data_start
    bad = index[outside | inside_meta]
    for n, i in enumerate(bad.tolist()):
        where = (
            "is outside image" if bat.host_offset(i) >= data_start else "is inside the header/BAT"
        )
        if n < MAX_MESSAGES:
            p.problem(f"cluster {i} {where}")
        else:
            p.report.corruptions += 1
    if bad.size > MAX_MESSAGES:
        p.report.messages.append(f"... and {bad.size - MAX_MESSAGES} more such clusters")
    if not (bad.size and p.fix_errors):
        return False
    bat.clear_many(bad)
    p.report.corruptions_fixed += int(bad.size)
    return True


async def _check_duplicates(
    p: _Pass,
    file: FileBackend,
    bat: BatTable,
    index: npt.NDArray[np.intp],
    host: npt.NDArray[np.int64],
    end: int,
) -> tuple[int, bool]:
    """Entries sharing a host cluster; repair gives each later one its own copy."""
    cs = bat.cluster_size
    moved = False
    for i in duplicate_indices(index, host).tolist():
        if not p.problem(f"duplicate offset in BAT entry {i}"):
            continue
        new_host = -(-end // bat.unit) * bat.unit
        data = await file.pread(bat.host_offset(i), cs)
        await file.pwrite(new_host, data)
        bat.set_entry(i, new_host // bat.unit)
        end = new_host + cs
        p.report.corruptions_fixed += 1
        moved = True
    return end, moved


def _collect_statistics(report: CheckReport, bat: BatTable, end: int) -> None:
    """Allocated and fragmented clusters (QEMU parallels_collect_statistics)."""
    report.total_clusters = bat.count
    index, host = _allocated(bat)
    inside = host + bat.cluster_size <= end
    index, host = index[inside], host[inside]
    report.allocated_clusters = int(index.size)
    neighbours = index[1:] == index[:-1] + 1
    jumps = host[1:] != host[:-1] + bat.cluster_size
    report.fragmented_clusters = int(np.count_nonzero(neighbours & jumps))
