"""The FVD metadata journal (fvd-format "Journal").

Design notes
------------
Metadata changes (bitmap bits, table entries) are first held in memory as
*pending* records (:class:`PendingRecords`).  They are written to the journal
only after the data they describe has been synced: the ordering rule, which
keeps a crash from leaving a bit or entry that points at data that never
landed.  The driver's commit does: take the pending records, sync the data
store, append them here, sync the journal.

The journal itself is a region of 512-byte sectors filled in order.  Records
are appended to the current, partly filled sector by rewriting that sector
(a 512-byte write is the unit a disk updates atomically); a record never spans
sectors.  When a commit's records no longer fit, the driver checkpoints:
writes the whole bitmap and table, bumps ``stable_journal_epoch`` and calls
:meth:`Journal.restart`.  Stale sectors from before a checkpoint are harmless:
their BITMAP records only set bits that are already set, and their TABLE
records carry an older epoch and are skipped on recovery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nbdserve.block.fvd.structs import (
    MAX_BITMAP_RECORD_LENGTH,
    MAX_TABLE_RECORD_ENTRIES,
    SECTOR_SIZE,
    JournalBitmapRecord,
    JournalRecord,
    JournalTableRecord,
    decode_journal_sector,
    encode_journal_sector,
)
from nbdserve.errors import NotSupportedError

if TYPE_CHECKING:
    from nbdserve.block.file import FileBackend

# read the journal in batches of this many bytes on recovery
_REPLAY_BATCH = 256 * 1024


class PendingRecords:
    """Records waiting for their data to be synced; adjacent ones are merged."""

    def __init__(self) -> None:
        self.records: list[JournalRecord] = []

    def __len__(self) -> int:
        return len(self.records)

    def add_bitmap(self, guest_offset: int, length: int) -> None:
        while length > 0:
            n = min(length, MAX_BITMAP_RECORD_LENGTH)
            last = self.records[-1] if self.records else None
            if (
                isinstance(last, JournalBitmapRecord)
                and last.guest_offset + last.length == guest_offset
                and last.length + n <= MAX_BITMAP_RECORD_LENGTH
            ):
                self.records[-1] = JournalBitmapRecord(last.guest_offset, last.length + n)
            else:
                self.records.append(JournalBitmapRecord(guest_offset, n))
            guest_offset += n
            length -= n

    def add_table(self, epoch: int, index: int, value: int) -> None:
        last = self.records[-1] if self.records else None
        if (
            isinstance(last, JournalTableRecord)
            and last.journal_epoch == epoch
            and last.first_index + len(last.entries) == index
            and len(last.entries) < MAX_TABLE_RECORD_ENTRIES
        ):
            self.records[-1] = JournalTableRecord(epoch, last.first_index, (*last.entries, value))
        else:
            self.records.append(JournalTableRecord(epoch, index, (value,)))

    def take(self) -> list[JournalRecord]:
        out, self.records = self.records, []
        return out

    def restore(self, records: list[JournalRecord]) -> None:
        """Put records back in front (a commit failed before writing them)."""
        self.records[:0] = records


def pack_sectors(
    records: list[JournalRecord], first: list[JournalRecord]
) -> list[list[JournalRecord]]:
    """Pack ``records`` after ``first`` (the current sector's records) into sectors."""
    sectors: list[list[JournalRecord]] = [list(first)]
    used = sum(r.size for r in first)
    for record in records:
        if used + record.size > SECTOR_SIZE:
            sectors.append([])
            used = 0
        sectors[-1].append(record)
        used += record.size
    return sectors


class Journal:
    """The on-disk journal region and the position of the next record."""

    def __init__(self, file: FileBackend, offset: int, size: int, epoch: int) -> None:
        self.file = file
        self.offset = offset
        self.sector_count = size // SECTOR_SIZE
        self.epoch = epoch
        self._sector = 0  # sector being filled
        self._current: list[JournalRecord] = []  # records already in that sector
        self.high_water = 0  # sectors written since the journal was last zeroed

    @property
    def enabled(self) -> bool:
        return self.sector_count > 0

    def fits(self, records: list[JournalRecord]) -> bool:
        if not self.enabled:
            return False
        sectors = pack_sectors(records, self._current)
        return self._sector + len(sectors) <= self.sector_count

    async def append(self, records: list[JournalRecord]) -> None:
        """Write ``records`` (they must fit); the caller syncs."""
        sectors = pack_sectors(records, self._current)
        assert self._sector + len(sectors) <= self.sector_count
        raw = b"".join(encode_journal_sector(s) for s in sectors)
        await self.file.pwrite(self.offset + self._sector * SECTOR_SIZE, raw)
        last = sectors[-1]
        self._sector += len(sectors) - 1
        self._current = last
        if sum(r.size for r in last) + 4 > SECTOR_SIZE:
            self._sector += 1
            self._current = []
        self.high_water = max(self.high_water, self._sector + (1 if self._current else 0))

    def restart(self, epoch: int) -> None:
        """Start again at sector 0 (after a checkpoint)."""
        self.epoch = epoch
        self._sector = 0
        self._current = []

    async def zero(self, sectors: int | None = None) -> None:
        """Zero the first ``sectors`` sectors (all by default); the caller syncs."""
        count = self.sector_count if sectors is None else min(sectors, self.sector_count)
        if count <= 0:
            return
        length = count * SECTOR_SIZE
        try:
            await self.file.zero_range(self.offset, length)
        except NotSupportedError:
            await self.file.write_zeroes(self.offset, length)
        self.high_water = 0


async def read_journal(
    file: FileBackend, offset: int, size: int
) -> tuple[list[JournalRecord], int]:
    """Every record in sector order up to the first empty sector, and the sector count read."""
    records: list[JournalRecord] = []
    sector_count = size // SECTOR_SIZE
    index = 0
    while index < sector_count:
        batch = min(_REPLAY_BATCH // SECTOR_SIZE, sector_count - index)
        raw = bytes(await file.pread(offset + index * SECTOR_SIZE, batch * SECTOR_SIZE))
        for i in range(batch):
            sector = raw[i * SECTOR_SIZE : (i + 1) * SECTOR_SIZE]
            decoded = decode_journal_sector(sector, index + i)
            if not decoded:
                return records, index + i
            records.extend(decoded)
        index += batch
    return records, index
