"""qcow2 consistency check and repair (QEMU ``qcow2_check_refcounts`` / ``qemu-img check``).

Design notes
------------
* References are counted from scratch into a numpy array with one counter
  per host cluster of the file: the header, the active and snapshot L1
  tables, every L2 table they reference (once per L1 that references it, as
  QEMU counts), every data or compressed cluster in those L2 tables, the
  snapshot table, and (separately) the refcount table and blocks.
* The on-disk refcounts are then compared: a cluster whose stored refcount is
  below its references is a corruption, one above is a leak (QEMU's wording
  and rules).  Entries that cannot be followed (misaligned, past the end of
  the file, invalid subcluster bitmaps) are corruptions too, and so are
  COPIED flags in the active tables that disagree with the refcounts.
* Repair rebuilds the refcount structure instead of patching it: a new
  refcount table and blocks describing the computed counts (and themselves)
  are written past the end of the file and the header is switched to them in
  one write; the old structure becomes free space.  With ``leaks`` only
  excess counts are lowered; with ``all`` every count is set and broken
  entries and COPIED flags are fixed as well.  The dirty and corrupt bits are
  cleared afterwards.  Memory is bounded by the file size (one counter per
  host cluster), never by header numbers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from nbdserve.block.check import CheckReport
from nbdserve.block.qcow2.cluster import Geometry
from nbdserve.block.qcow2.structs import (
    BME_TABLE_ENTRY_OFFSET_MASK,
    HDR_INCOMPATIBLE_FEATURES,
    HDR_REFCOUNT_TABLE_OFFSET,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    NP_COMPRESSED,
    NP_COPIED,
    NP_L1E_OFFSET_MASK,
    NP_L2E_OFFSET_MASK,
    QCOW_MAX_BITMAP_DIRECTORY_SIZE,
    QCOW_MAX_L1_SIZE,
    QCOW_OFLAG_COPIED,
    REFT_OFFSET_MASK,
    decode_refcounts,
    encode_refcounts,
    pack_u64,
    parse_bitmap_directory,
)
from nbdserve.errors import ImageError
from nbdserve.progress import report as report_progress

if TYPE_CHECKING:
    from nbdserve.block.file import FileBackend
    from nbdserve.block.qcow2 import Qcow2Driver

MAX_MESSAGES = 200


@dataclass(slots=True)
class _Walk:
    """What one pass over the image found."""

    refs: np.ndarray  # references per host cluster, without the refcount structure
    struct_refs: np.ndarray  # references by the refcount table and blocks
    errors: list[str] = field(default_factory=list)
    # (l1 table offset, l1 index) of L1 entries that cannot be followed
    bad_l1: list[tuple[int, int]] = field(default_factory=list)
    # (l2 table offset, l2 index) of L2 entries that cannot be followed
    bad_l2: list[tuple[int, int]] = field(default_factory=list)
    allocated: int = 0
    compressed: int = 0
    fragmented: int = 0
    next_contiguous: int = 0


async def check_path(path: str, repair: str | None) -> CheckReport:
    from nbdserve.block.file import FileBackend

    file = FileBackend.open(path, read_only=repair is None)
    try:
        return await check_file(file, repair)
    finally:
        await file.aclose()


async def check_file(file: FileBackend, repair: str | None) -> CheckReport:
    """Check (and with ``repair`` = "leaks" or "all", repair) the image in ``file``."""
    if repair not in (None, "leaks", "all"):
        raise ValueError(f"repair must be leaks or all, not {repair!r}")
    try:
        driver = await _open_for_check(file, repair is not None)
    except ImageError as exc:
        report = CheckReport(check_errors=1)
        report.messages.append(f"qemu-img: Could not open image: {exc}")
        return report
    try:
        report = await _check(driver)
        if repair is None or not (report.leaks or report.corruptions or _flags_set(driver)):
            return report
        before = report
        await _repair(driver, repair)
        report = await _check(driver)
        report.leaks_fixed = max(0, before.leaks - report.leaks)
        report.corruptions_fixed = max(0, before.corruptions - report.corruptions)
        report.messages = before.messages + report.messages
        return report
    finally:
        await driver.aclose()


def _flags_set(driver: Qcow2Driver) -> bool:
    return bool(driver.header.incompatible_features & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT))


async def _open_for_check(file: FileBackend, writable: bool) -> Qcow2Driver:
    from nbdserve.block.qcow2 import Qcow2Driver

    driver = Qcow2Driver(file, read_only=not writable, owns_file=False)
    await driver.open({"_check": True})
    return driver


# ---- the walk -------------------------------------------------------------------------


class _Counter:
    def __init__(self, driver: Qcow2Driver, walk: _Walk) -> None:
        self.cs = driver.header.cluster_size
        self.cb = driver.header.cluster_bits
        self.file_size = driver._file.size
        self.walk = walk

    def add(self, target: np.ndarray, offset: int, length: int, what: str) -> bool:
        """Count a reference to every cluster of [offset, +length); False if outside the file."""
        if length <= 0:
            return True
        if offset + length - self.file_size >= self.cs or offset + length > len(target) * self.cs:
            self.walk.errors.append(
                f"ERROR: counting reference for region exceeding the end of the file by one "
                f"cluster or more: offset {offset:#x} size {length:#x} ({what})"
            )
            return False
        first = offset >> self.cb
        last = (offset + length - 1) >> self.cb
        target[first : last + 1] += 1
        return True

    def add_clusters(self, target: np.ndarray, hosts: np.ndarray) -> np.ndarray:
        """Count one reference per host offset; returns the mask of those outside the file."""
        idx = (hosts >> np.uint64(self.cb)).astype(np.int64)
        outside = idx >= len(target)
        np.add.at(target, idx[~outside], 1)
        return outside


async def _walk(driver: Qcow2Driver) -> _Walk:
    h = driver.header
    cs = h.cluster_size
    n_clusters = -(-driver._file.size // cs)
    # 4 bytes per host cluster and array: memory follows the file size, not header numbers
    walk = _Walk(np.zeros(n_clusters, dtype=np.uint32), np.zeros(n_clusters, dtype=np.uint32))
    counter = _Counter(driver, walk)
    counter.add(walk.refs, 0, cs, "header")
    counter.add(walk.refs, h.l1_table_offset, h.l1_size * 8, "L1 table")
    l1_tables: list[tuple[int, np.ndarray, bool]] = [(h.l1_table_offset, driver.cmap.l1, True)]
    for i, (offset, length) in enumerate(driver.snapshots):
        if i == 0:
            counter.add(walk.refs, offset, length, "snapshot table")
            continue
        if offset % cs or not counter.add(walk.refs, offset, length, "snapshot L1 table"):
            walk.errors.append(f"ERROR snapshot L1 table at {offset:#x} is invalid")
            continue
        raw = bytes(await driver._file.pread(offset, length))
        l1_tables.append((offset, np.frombuffer(raw, dtype=">u8").copy(), False))
    for l1_offset, l1, active in l1_tables:
        await _walk_l1(driver, counter, l1_offset, l1, active)
    await _walk_bitmaps(driver, counter)
    _walk_refcount_structure(driver, counter)
    return walk


async def _walk_l1(
    driver: Qcow2Driver, counter: _Counter, l1_offset: int, l1: np.ndarray, active: bool
) -> None:
    walk = counter.walk
    cs = counter.cs
    offsets = l1 & NP_L1E_OFFSET_MASK
    present = np.flatnonzero(offsets).tolist()
    for step, l1i in enumerate(present):
        report_progress(step, len(present))
        l2_offset = int(offsets[l1i])
        if l2_offset % cs:
            walk.errors.append(
                f"ERROR l2_offset={l2_offset:#x}: Table is not cluster aligned; L1 entry corrupted"
            )
            walk.bad_l1.append((l1_offset, l1i))
            continue
        if not counter.add(walk.refs, l2_offset, cs, "L2 table"):
            walk.bad_l1.append((l1_offset, l1i))
            continue
        table = np.frombuffer(bytes(await driver._file.pread(l2_offset, cs)), dtype=">u8")
        _walk_l2(driver, counter, l2_offset, table, active)


def _walk_l2(
    driver: Qcow2Driver, counter: _Counter, l2_offset: int, table: np.ndarray, active: bool
) -> None:
    g: Geometry = driver.g
    walk = counter.walk
    if g.extended_l2:
        pairs = table.astype(np.uint64).reshape(-1, 2)
        entries, bitmaps = pairs[:, 0], pairs[:, 1]
    else:
        entries = table.astype(np.uint64)
        bitmaps = np.zeros(len(entries), dtype=np.uint64)
    compressed = (entries & NP_COMPRESSED) != 0
    hosts = entries & NP_L2E_OFFSET_MASK
    present = ~compressed & (hosts != 0)
    if g.external_data:  # host offset 0 is valid there; COPIED marks allocation
        present |= ~compressed & ((entries & NP_COPIED) != 0)
    walk.next_contiguous = 0  # QEMU restarts the contiguity count per L2 table
    if g.extended_l2:
        both = (bitmaps & (bitmaps >> np.uint64(32)) & np.uint64(0xFFFFFFFF)) != 0
        for i in np.flatnonzero(both & ~compressed).tolist():
            walk.errors.append(f"ERROR invalid subcluster bitmap in L2 table {l2_offset:#x} [{i}]")
            walk.bad_l2.append((l2_offset, i))
    misaligned = present & ((hosts & np.uint64(counter.cs - 1)) != 0)
    for i in np.flatnonzero(misaligned).tolist():
        walk.errors.append(
            f"ERROR offset={int(hosts[i]):#x}: Cluster is not properly aligned; L2 entry corrupted"
        )
        walk.bad_l2.append((l2_offset, i))
    if driver.data_file is driver.file:
        for i in np.flatnonzero(misaligned).tolist():  # QEMU counts the bytes it points at
            counter.add(walk.refs, int(hosts[i]), counter.cs, "misaligned cluster")
    present &= ~misaligned
    if active:
        _count_fragmentation(walk, hosts, present, compressed, counter.cs)
    if driver.data_file is not driver.file:
        return  # data clusters live in the data file and have no refcounts
    outside = counter.add_clusters(walk.refs, hosts[present])
    for i in np.flatnonzero(present)[outside].tolist():
        walk.errors.append(
            f"ERROR: counting reference for region exceeding the end of the file by one "
            f"cluster or more: offset {int(hosts[i]):#x} (L2 table {l2_offset:#x})"
        )
        walk.bad_l2.append((l2_offset, i))
    for i in np.flatnonzero(compressed).tolist():
        start, length = g.compressed_clusters(int(entries[i]))
        if not counter.add(walk.refs, start, length, "compressed cluster"):
            walk.bad_l2.append((l2_offset, i))


async def _walk_bitmaps(driver: Qcow2Driver, counter: _Counter) -> None:
    """Persistent dirty bitmaps own clusters too: the directory, tables and data."""
    info = driver.extensions.bitmaps
    if info is None:
        return
    walk = counter.walk
    offset, size, count = info
    if size > QCOW_MAX_BITMAP_DIRECTORY_SIZE or offset % counter.cs:
        walk.errors.append("ERROR bitmap directory is invalid")
        return
    if not counter.add(walk.refs, offset, size, "bitmap directory"):
        return
    raw = bytes(await driver._file.pread(offset, size))
    try:
        tables = parse_bitmap_directory(raw, count)
    except ImageError as exc:
        walk.errors.append(f"ERROR {exc}")
        return
    for table_offset, entries in tables:
        length = entries * 8
        if table_offset % counter.cs or length > QCOW_MAX_L1_SIZE:
            walk.errors.append(f"ERROR bitmap table at {table_offset:#x} is invalid")
            continue
        if not counter.add(walk.refs, table_offset, length, "bitmap table"):
            continue
        table = np.frombuffer(bytes(await driver._file.pread(table_offset, length)), dtype=">u8")
        data = table & np.uint64(BME_TABLE_ENTRY_OFFSET_MASK)
        data = data[data != 0]
        outside = counter.add_clusters(walk.refs, data)
        if outside.any():
            walk.errors.append(f"ERROR bitmap data cluster past the end (table {table_offset:#x})")


def _count_fragmentation(
    walk: _Walk, hosts: np.ndarray, present: np.ndarray, compressed: np.ndarray, cs: int
) -> None:
    """QEMU's bfi counters: compressed clusters count as fragmented; a data cluster is
    fragmented when it does not follow the previous one (across L2 tables)."""
    walk.allocated += int(present.sum() + compressed.sum())
    walk.compressed += int(compressed.sum())
    walk.fragmented += int(compressed.sum())
    used = hosts[np.flatnonzero(present)].astype(np.int64)
    if not len(used):
        return
    expected = np.concatenate(([walk.next_contiguous], used[:-1] + cs))
    walk.fragmented += int(((used != expected) & (expected != 0)).sum())
    walk.next_contiguous = int(used[-1]) + cs


def _walk_refcount_structure(driver: Qcow2Driver, counter: _Counter) -> None:
    walk = counter.walk
    rc = driver.refcounts
    table_len = len(rc.reftable) * 8
    counter.add(walk.struct_refs, rc.reftable_offset, table_len, "refcount table")
    blocks = rc.reftable & np.uint64(REFT_OFFSET_MASK)
    for bi in np.flatnonzero(blocks).tolist():
        offset = int(blocks[bi])
        if offset % counter.cs:
            walk.errors.append(
                f"ERROR refcount block {bi} is not cluster aligned; refcount table entry corrupted"
            )
            continue
        counter.add(walk.struct_refs, offset, counter.cs, f"refcount block {bi}")


async def _on_disk_refcounts(driver: Qcow2Driver, n_clusters: int) -> np.ndarray:
    rc = driver.refcounts
    out = np.zeros(n_clusters, dtype=np.uint64)
    blocks = rc.reftable & np.uint64(REFT_OFFSET_MASK)
    for bi in np.flatnonzero(blocks).tolist():
        offset = int(blocks[bi])
        first = bi << rc.block_shift
        if first >= n_clusters or offset % driver.header.cluster_size:
            continue
        if offset + driver.header.cluster_size > driver._file.size:
            continue
        raw = await driver._file.pread(offset, driver.header.cluster_size)
        counts = decode_refcounts(raw, driver.header.refcount_order)
        n = min(len(counts), n_clusters - first)
        out[first : first + n] = counts[:n]
    return out


# ---- the check ---------------------------------------------------------------------------


async def _check(driver: Qcow2Driver) -> CheckReport:
    walk = await _walk(driver)
    h = driver.header
    report = CheckReport()
    for msg in walk.errors[:MAX_MESSAGES]:
        report.messages.append(msg)
    report.corruptions += len(walk.errors)
    refs = walk.refs + walk.struct_refs
    ondisk = await _on_disk_refcounts(driver, len(refs))
    _compare(report, ondisk, refs)
    report.corruptions += await _check_copied(driver, ondisk, report)
    report.total_clusters = -(-h.size // h.cluster_size)
    report.allocated_clusters = walk.allocated
    report.compressed_clusters = walk.compressed
    report.fragmented_clusters = walk.fragmented
    used = np.flatnonzero(refs)
    report.image_end_offset = (int(used[-1]) + 1) * h.cluster_size if len(used) else 0
    return report


def _compare(report: CheckReport, ondisk: np.ndarray, refs: np.ndarray) -> None:
    diff = np.flatnonzero(ondisk != refs)
    shown = 0
    for i in diff.tolist():
        a, b = int(ondisk[i]), int(refs[i])
        if a < b:
            report.corruptions += 1
            kind = "ERROR"
        else:
            report.leaks += 1
            kind = "Leaked"
        if shown < MAX_MESSAGES:
            report.messages.append(f"{kind} cluster {i} refcount={a} reference={b}")
            shown += 1
    if len(diff) > shown:
        report.messages.append(f"... and {len(diff) - shown} more refcount mismatches")


async def _check_copied(driver: Qcow2Driver, ondisk: np.ndarray, report: CheckReport) -> int:
    """COPIED flags of the active tables must say refcount == 1 (QEMU check_oflag_copied)."""
    errors = 0
    cs = driver.header.cluster_size
    l1 = driver.cmap.l1
    for l1i, off in await _active_l2_tables(driver):
        idx = off // cs
        if idx >= len(ondisk):
            continue
        entry = int(l1[l1i])
        if bool(entry & QCOW_OFLAG_COPIED) != (ondisk[idx] == 1):
            errors += 1
            _message(
                report,
                f"ERROR OFLAG_COPIED L2 cluster: l1_index={l1i} l1_entry={entry:x} "
                f"refcount={int(ondisk[idx])}",
            )
        table = np.frombuffer(bytes(await driver._file.pread(off, cs)), dtype=">u8")
        for i in _copied_mismatch(driver, table, ondisk).tolist():
            errors += 1
            _message(report, f"ERROR OFLAG_COPIED data cluster: l2 table {off:#x} index {i}")
    return errors


def _message(report: CheckReport, text: str) -> None:
    if len(report.messages) < MAX_MESSAGES:
        report.messages.append(text)


async def _active_l2_tables(driver: Qcow2Driver) -> list[tuple[int, int]]:
    cs = driver.header.cluster_size
    out = []
    offsets = driver.cmap.l1 & NP_L1E_OFFSET_MASK
    for l1i in np.flatnonzero(offsets).tolist():
        off = int(offsets[l1i])
        if off % cs == 0 and off + cs <= driver._file.size:
            out.append((l1i, off))
    return out


def _copied_mismatch(driver: Qcow2Driver, table: np.ndarray, ondisk: np.ndarray) -> np.ndarray:
    """Indexes of data entries whose COPIED flag disagrees with refcount == 1."""
    g = driver.g
    entries = (
        table.astype(np.uint64).reshape(-1, 2)[:, 0] if g.extended_l2 else table.astype(np.uint64)
    )
    compressed = (entries & NP_COMPRESSED) != 0
    hosts = entries & NP_L2E_OFFSET_MASK
    present = ~compressed & (hosts != 0) & ((hosts & np.uint64(g.cluster_size - 1)) == 0)
    idx = (hosts >> np.uint64(g.cluster_bits)).astype(np.int64)
    present &= idx < len(ondisk)
    want = np.zeros(len(entries), dtype=bool)
    want[present] = ondisk[idx[present]] == 1
    has = (entries & NP_COPIED) != 0
    return np.flatnonzero(present & (has != want))


# ---- repair ----------------------------------------------------------------------------


async def _repair(driver: Qcow2Driver, mode: str) -> None:
    """Rebuild the refcounts (and with "all", fix broken entries and COPIED flags)."""
    file = driver._file
    await driver.flush()
    if mode == "all":
        walk = await _walk(driver)
        await _clear_bad_entries(driver, walk)
    walk = await _walk(driver)
    ondisk = await _on_disk_refcounts(driver, len(walk.refs))
    refs = walk.refs.astype(np.uint64)
    targets = refs if mode == "all" else np.minimum(ondisk, refs)
    targets = np.minimum(targets, np.uint64(driver.refcounts.max_refcount))
    await _rebuild_refcounts(driver, targets)
    if mode == "all":
        await _fix_copied(driver, targets)
    flags = driver.header.incompatible_features & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
    if driver.header.version >= 3:
        await file.pwrite(HDR_INCOMPATIBLE_FEATURES, pack_u64(flags))
    await file.sync()
    await driver.reload()


async def _clear_bad_entries(driver: Qcow2Driver, walk: _Walk) -> None:
    """Entries that cannot be followed become zero clusters (v3) or unallocated (v2)."""
    file = driver._file
    for l1_offset, l1i in walk.bad_l1:
        await file.pwrite(l1_offset + 8 * l1i, pack_u64(0))
    g = driver.g
    zero = 1 if g.has_zero_flag and not g.extended_l2 else 0
    for l2_offset, idx in walk.bad_l2:
        if g.extended_l2:
            await file.pwrite(l2_offset + 16 * idx, struct.pack(">QQ", 0, 0xFFFFFFFF << 32))
        else:
            await file.pwrite(l2_offset + 8 * idx, pack_u64(zero))
    if walk.bad_l1 or walk.bad_l2:
        await file.sync()
        await driver.reload()


async def _rebuild_refcounts(driver: Qcow2Driver, targets: np.ndarray) -> None:
    """Write a fresh refcount table + blocks for ``targets`` past the end, then switch."""
    h = driver.header
    cs = h.cluster_size
    per_block = (cs * 8) >> h.refcount_order
    file = driver._file
    area = max(len(targets), -(-file.size // cs))
    blocks, table_clusters = 1, 1
    while True:
        total = area + blocks + table_clusters
        need_blocks = -(-total // per_block)
        need_table = max(1, -(-need_blocks * 8 // cs))
        if (need_blocks, need_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = need_blocks, need_table
    counts = np.zeros(blocks * per_block, dtype=np.uint64)
    counts[: len(targets)] = targets.astype(np.uint64)
    counts[area : area + blocks + table_clusters] = 1
    table = np.zeros(table_clusters * cs // 8, dtype=">u8")
    for bi in range(blocks):
        offset = (area + bi) * cs
        table[bi] = np.uint64(offset)
        chunk = counts[bi * per_block : (bi + 1) * per_block]
        await file.pwrite(offset, encode_refcounts(chunk, h.refcount_order))
    table_offset = (area + blocks) * cs
    await file.pwrite(table_offset, table.tobytes())
    await file.sync()
    await file.pwrite(HDR_REFCOUNT_TABLE_OFFSET, struct.pack(">QI", table_offset, table_clusters))
    await file.sync()
    await driver.reload()


async def _fix_copied(driver: Qcow2Driver, targets: np.ndarray) -> None:
    file = driver._file
    cs = driver.header.cluster_size
    l1 = driver.cmap.l1.copy()
    changed = False
    for l1i, off in await _active_l2_tables(driver):
        idx = off // cs
        want = idx < len(targets) and targets[idx] == 1
        entry = int(l1[l1i])
        new = (entry | QCOW_OFLAG_COPIED) if want else (entry & ~QCOW_OFLAG_COPIED)
        if new != entry:
            l1[l1i] = np.uint64(new)
            await file.pwrite(driver.cmap.l1_offset + 8 * l1i, pack_u64(new))
            changed = True
        table = np.frombuffer(bytes(await file.pread(off, cs)), dtype=">u8").copy()
        bad = _copied_mismatch(driver, table, targets)
        if len(bad):
            step = 2 if driver.g.extended_l2 else 1
            words = table[::step]
            words[bad] ^= NP_COPIED
            await file.pwrite(off, table.tobytes())
            changed = True
    if changed:
        await file.sync()
        await driver.reload()


__all__ = ["check_file", "check_path"]
