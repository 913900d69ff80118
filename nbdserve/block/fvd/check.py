"""``nbdserve img check`` for FVD: header, journal, bitmap and table consistency.

What counts as what (qemu-img check's vocabulary):

* corruption: a journal record that cannot be parsed or applied, a table entry
  with bit 31 set or past what the store could hold, two chunks mapped to one
  physical chunk, bitmap bits past the last base block,
  ``base_img_fully_prefetched`` with blocks still missing, a missing data file;
* leak: a physical chunk below the highest used one that no entry references.

An unclean shutdown is not an error: the journal is replayed (in memory, or
for real with ``--repair``) before the checks, as an open would.

Repairs: ``leaks`` punches holes in leaked chunks and trims unused storage at
the end; ``all`` also unmaps bad table entries, gives each extra user of a
shared physical chunk its own copy, clears stray bits and a false
``base_img_fully_prefetched``, and always leaves the image cleanly closed.
"""

from __future__ import annotations

import os

import numpy as np

from nbdserve.block.check import CheckReport
from nbdserve.block.file import FileBackend
from nbdserve.block.fvd import apply_records, load_bitmap, load_table, read_header
from nbdserve.block.fvd.bitmap import Bitmap
from nbdserve.block.fvd.journal import Journal, read_journal
from nbdserve.block.fvd.structs import (
    TABLE_DTYPE,
    TABLE_ENTRY_RESERVED_BIT,
    TABLE_UNALLOCATED,
    FvdHeader,
    bitmap_bytes_needed,
)
from nbdserve.block.fvd.table import ChunkTable
from nbdserve.errors import InvalidImageError, NotSupportedError
from nbdserve.progress import part

_MAX_MESSAGES = 20


async def check_fvd(path: str, repair: str | None) -> CheckReport:
    report = CheckReport()
    file = FileBackend.open(path, read_only=repair is None)
    store: FileBackend | None = None
    try:
        header = await read_header(file)
        report.image_end_offset = file.size
        bitmap, table = await _load(file, header)
        unclean = not header.clean_shutdown
        if unclean:
            report.messages.append("image was not closed cleanly; journal replayed")
            await _replay(file, header, bitmap, table, report)
        store = _open_store(path, file, header, report, read_only=repair is None)
        changed = unclean and repair is not None
        if bitmap is not None:
            changed |= _check_bitmap(header, bitmap, report, repair)
            if header.base_img_fully_prefetched and bitmap.count_set() < bitmap.block_count:
                report.error(
                    f"base_img_fully_prefetched is set but "
                    f"{bitmap.block_count - bitmap.count_set()} blocks are not in the image"
                )
                if repair == "all":
                    header = header.replace(base_img_fully_prefetched=0)
                    report.corruptions_fixed += 1
                    changed = True
        if table is not None:
            report.total_clusters = table.chunk_count
            changed |= _check_entries(table, report, repair)
            changed |= await _check_duplicates(header, table, store, report, repair)
            report.allocated_clusters = table.allocated_count()
            await _check_leaks(header, table, store, report, repair)
        if repair is not None and changed:
            await _write_back(file, header, bitmap, table)
        return report
    finally:
        if store is not None and store is not file:
            await store.aclose()
        await file.aclose()


async def _load(file: FileBackend, header: FvdHeader) -> tuple[Bitmap | None, ChunkTable | None]:
    """Bitmap and table, with one progress bar over both regions.

    Loading them is the walk that grows with the disk (the table is read
    through: its unused entries are not zeros); the checks after it are vector
    work over what is allocated.
    """
    bitmap_bytes = bitmap_bytes_needed(header.base_block_count) if header.has_base else 0
    table_bytes = header.chunk_count * TABLE_DTYPE.itemsize if header.compact else 0
    total = bitmap_bytes + table_bytes
    bitmap = await load_bitmap(file, header, progress=part(0, bitmap_bytes, total))
    table = await load_table(file, header, progress=part(bitmap_bytes, table_bytes, total))
    return bitmap, table


async def _replay(
    file: FileBackend,
    header: FvdHeader,
    bitmap: Bitmap | None,
    table: ChunkTable | None,
    report: CheckReport,
) -> None:
    if not header.journal_size:
        return
    try:
        records, sectors = await read_journal(file, header.journal_offset, header.journal_size)
        applied = apply_records(header, records, bitmap, table)
        report.messages.append(f"journal: {sectors} sectors, {applied} records applied")
    except InvalidImageError as exc:
        report.error(f"journal: {exc}")


def _open_store(
    path: str, file: FileBackend, header: FvdHeader, report: CheckReport, *, read_only: bool
) -> FileBackend | None:
    if not header.data_file:
        return file
    ref = header.data_file
    real = ref if os.path.isabs(ref) else os.path.join(os.path.dirname(os.path.abspath(path)), ref)
    if not os.path.exists(real):
        report.error(f"data_file {ref} does not exist")
        return None
    return FileBackend.open(real, read_only=read_only)


def _check_bitmap(
    header: FvdHeader, bitmap: Bitmap, report: CheckReport, repair: str | None
) -> bool:
    stray = bitmap.stray_bits()
    if not stray:
        return False
    report.error(f"{stray} bitmap bits are set past the last base block")
    if repair == "all":
        bitmap.clear_stray_bits()
        report.corruptions_fixed += 1
        return True
    return False


def _check_entries(table: ChunkTable, report: CheckReport, repair: str | None) -> bool:
    index, entries = table.allocated()
    bad_at = np.flatnonzero(
        ((entries & np.uint32(TABLE_ENTRY_RESERVED_BIT)) != 0) | (entries >= table.chunk_count)
    )
    bad = index[bad_at]
    for i, value in zip(bad[:_MAX_MESSAGES].tolist(), entries[bad_at].tolist(), strict=False):
        report.error(f"table entry {i} holds invalid physical chunk {value:#x}")
    if bad.size > _MAX_MESSAGES:
        report.corruptions += int(bad.size) - _MAX_MESSAGES
    if bad.size and repair == "all":
        table.set_many(bad, TABLE_UNALLOCATED)
        report.corruptions_fixed += int(bad.size)
        return True
    return False


async def _check_duplicates(
    header: FvdHeader,
    table: ChunkTable,
    store: FileBackend | None,
    report: CheckReport,
    repair: str | None,
) -> bool:
    dupes = table.duplicates()
    if not dupes:
        return False
    changed = False
    free = table.physical_end()
    for p in dupes:
        chunks, entries = table.allocated()
        users = chunks[entries == p].tolist()
        report.error(f"physical chunk {p} is mapped by chunks {users}")
        if repair != "all" or store is None:
            continue
        cs = header.chunk_size
        base = header.data_offset if header.data_in_file else 0
        data = await store.pread(base + p * cs, cs)
        for index in users[1:]:
            if free >= table.chunk_count:
                break
            await store.pwrite(base + free * cs, data)
            table.set(index, free)
            free += 1
        report.corruptions_fixed += 1
        changed = True
    if changed and store is not None:
        await store.sync()
    return changed


async def _check_leaks(
    header: FvdHeader,
    table: ChunkTable,
    store: FileBackend | None,
    report: CheckReport,
    repair: str | None,
) -> None:
    leaked = table.leaked()
    for p in leaked[:_MAX_MESSAGES]:
        report.leak(f"physical chunk {p} is not referenced by any table entry")
    if len(leaked) > _MAX_MESSAGES:
        report.leaks += len(leaked) - _MAX_MESSAGES
    if repair is None or store is None:
        return
    cs = header.chunk_size
    base = header.data_offset if header.data_in_file else 0
    for p in leaked:
        try:
            await store.punch_hole(base + p * cs, cs)
        except NotSupportedError:
            pass
        report.leaks_fixed += 1
    end = base + table.physical_end() * cs
    if store.size > end and (store is not None):
        await store.truncate(end)
    await store.sync()


async def _write_back(
    file: FileBackend, header: FvdHeader, bitmap: Bitmap | None, table: ChunkTable | None
) -> None:
    if bitmap is not None:
        await file.pwrite(header.bitmap_offset, bitmap.snapshot())
    if table is not None:
        await file.pwrite(header.table_offset, table.snapshot())
    await file.sync()
    if header.journal_size:
        journal = Journal(file, header.journal_offset, header.journal_size, 0)
        await journal.zero()
    await file.pwrite(0, header.replace(clean_shutdown=1).to_bytes())
    await file.sync()
