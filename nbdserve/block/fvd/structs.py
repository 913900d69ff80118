"""FVD on-disk layouts (shared/docs/fvd-format.md): header, journal records, dtypes.

Declarations are construct ``Struct``s; the driver sees only the frozen
dataclasses below.  Everything is little-endian.  The spec's sector fields
(journal BITMAP records) are converted to bytes here, so no other module
deals in sectors.

Validation is split in two: :meth:`FvdHeader.from_bytes` checks what the
header says about itself (magic, version, features, units, strings) and
:func:`validate_layout` checks the regions against each other and against the
file size.  Both raise :class:`~nbdserve.errors.InvalidImageError` with a
message naming the field.
"""

from __future__ import annotations

import dataclasses
import itertools
import struct
from dataclasses import dataclass
from typing import Final

import numpy as np
from construct import (
    Array,
    BitsSwapped,
    Bitwise,
    Bytes,
    ConstructError,
    Flag,
    Int32ul,
    Int64sl,
    Int64ul,
    Struct,
)

from nbdserve.errors import InvalidImageError

FVD_MAGIC: Final = 0x5143F5A9
FVD_VERSION: Final = 1
FVD_CREATE_VERSION: Final = 1
HEADER_SIZE: Final = 4096
SECTOR_SIZE: Final = 512
REGION_ALIGNMENT: Final = 4096

TABLE_UNALLOCATED: Final = 0xFFFFFFFF
TABLE_ENTRY_RESERVED_BIT: Final = 0x80000000
TABLE_DTYPE: Final = np.dtype("<u4")
BITMAP_DTYPE: Final = np.dtype(np.uint8)

JOURNAL_BITMAP_TYPE: Final = 0x3F2AB8ED
JOURNAL_TABLE_TYPE: Final = 0xB4E6F7AC
JOURNAL_BITMAP_RECORD_SIZE: Final = 16
JOURNAL_TABLE_HEADER_SIZE: Final = 20
MAX_TABLE_RECORD_ENTRIES: Final = 123
# one BITMAP record covers at most this many bytes (u32 sector count)
MAX_BITMAP_RECORD_LENGTH: Final = (0xFFFFFFFF // 8) * 8 * SECTOR_SIZE

# Sanity bounds on what an untrusted header may make us allocate.
MAX_BITMAP_BYTES: Final = 512 * 1024 * 1024
MAX_TABLE_ENTRIES: Final = 128 * 1024 * 1024
MAX_VIRTUAL_DISK_SIZE: Final = 1 << 62
MAX_JOURNAL_SIZE: Final = 1 << 30
STRING_FIELD_SIZE: Final = 1024
FORMAT_FIELD_SIZE: Final = 16

HEADER_STRUCT = Struct(
    "magic" / Int32ul,
    "version" / Int32ul,
    "create_version" / Int32ul,
    "header_size" / Int32ul,
    "incompatible_features" / Bytes(16),
    "compatible_features" / Bytes(16),
    "virtual_disk_size" / Int64ul,
    "data_offset" / Int64ul,
    "data_file" / Bytes(STRING_FIELD_SIZE),
    "data_file_fmt" / Bytes(FORMAT_FIELD_SIZE),
    "base_img" / Bytes(STRING_FIELD_SIZE),
    "base_img_fmt" / Bytes(FORMAT_FIELD_SIZE),
    "base_img_size" / Int64ul,
    "bitmap_offset" / Int64ul,
    "bitmap_size" / Int64ul,
    "block_size" / Int64ul,
    "table_offset" / Int64ul,
    "table_size" / Int64ul,
    "chunk_size" / Int64ul,
    "storage_grow_unit" / Int64ul,
    "add_storage_cmd" / Bytes(STRING_FIELD_SIZE),
    "chunks_relocated" / Int32ul,
    "clean_shutdown" / Int32ul,
    "journal_offset" / Int64ul,
    "journal_size" / Int64ul,
    "stable_journal_epoch" / Int64ul,
    "copy_on_read" / Int32ul,
    "base_img_fully_prefetched" / Int32ul,
    "max_outstanding_copy_on_read_data" / Int64ul,
    "prefetch_start_delay" / Int64sl,
    "num_prefetch_slots" / Int32ul,
    "need_zero_init" / Int32ul,
    "bytes_per_prefetch" / Int64ul,
    "prefetch_min_read_throughput" / Int64ul,
    "prefetch_max_read_throughput" / Int64ul,
    "prefetch_min_write_throughput" / Int64ul,
    "prefetch_max_write_throughput" / Int64ul,
    "prefetch_throttle_time" / Int64ul,
    "prefetch_read_throughput_measure_time" / Int64ul,
    "prefetch_write_throughput_measure_time" / Int64ul,
    "reserved" / Bytes(HEADER_SIZE - 3360),
)

# field name -> on-disk offset, for tests and error messages
HEADER_FIELD_OFFSETS: Final[dict[str, int]] = {}
_pos = 0
for _sub in HEADER_STRUCT.subcons:
    HEADER_FIELD_OFFSETS[str(_sub.name)] = _pos
    _pos += _sub.sizeof()
assert _pos == HEADER_SIZE

_STRING_FIELDS = {
    "data_file": STRING_FIELD_SIZE,
    "data_file_fmt": FORMAT_FIELD_SIZE,
    "base_img": STRING_FIELD_SIZE,
    "base_img_fmt": FORMAT_FIELD_SIZE,
    "add_storage_cmd": STRING_FIELD_SIZE,
}


@dataclass(frozen=True, slots=True)
class FvdHeader:
    """The 4096-byte header, decoded; strings are ``str``, sizes are bytes."""

    virtual_disk_size: int
    data_offset: int = 0
    data_file: str = ""
    data_file_fmt: str = ""
    base_img: str = ""
    base_img_fmt: str = ""
    base_img_size: int = 0
    bitmap_offset: int = 0
    bitmap_size: int = 0
    block_size: int = 64 * 1024
    table_offset: int = 0
    table_size: int = 0
    chunk_size: int = 1024 * 1024
    storage_grow_unit: int = 64 * 1024 * 1024
    add_storage_cmd: str = ""
    chunks_relocated: int = 0
    clean_shutdown: int = 1
    journal_offset: int = 0
    journal_size: int = 0
    stable_journal_epoch: int = 0
    copy_on_read: int = 0
    base_img_fully_prefetched: int = 0
    max_outstanding_copy_on_read_data: int = 64 * 1024 * 1024
    prefetch_start_delay: int = -1
    num_prefetch_slots: int = 2
    need_zero_init: int = 0
    bytes_per_prefetch: int = 1024 * 1024
    prefetch_min_read_throughput: int = 1024
    prefetch_max_read_throughput: int = 0
    prefetch_min_write_throughput: int = 1024
    prefetch_max_write_throughput: int = 0
    prefetch_throttle_time: int = 1000
    prefetch_read_throughput_measure_time: int = 1000
    prefetch_write_throughput_measure_time: int = 1000
    version: int = FVD_VERSION
    create_version: int = FVD_CREATE_VERSION
    header_size: int = HEADER_SIZE
    incompatible_features: bytes = bytes(16)
    compatible_features: bytes = bytes(16)

    # ---- derived facts ----------------------------------------------------

    @property
    def has_base(self) -> bool:
        return self.base_img != ""

    @property
    def compact(self) -> bool:
        return self.table_offset != 0

    @property
    def data_in_file(self) -> bool:
        return self.data_file == ""

    @property
    def base_block_count(self) -> int:
        """Blocks that have a bitmap bit (0 without a base)."""
        if not self.has_base:
            return 0
        return -(-self.base_img_size // self.block_size)

    @property
    def chunk_count(self) -> int:
        """Virtual chunks (table entries that matter); 0 when not compact."""
        if not self.compact:
            return 0
        return -(-self.virtual_disk_size // self.chunk_size)

    def replace(self, **changes: object) -> FvdHeader:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    # ---- encode / decode ----------------------------------------------------

    @classmethod
    def from_bytes(cls, raw: bytes) -> FvdHeader:
        """Parse and validate the header's own fields (not the layout)."""
        if len(raw) < HEADER_SIZE:
            raise InvalidImageError(f"FVD header truncated ({len(raw)} of {HEADER_SIZE} bytes)")
        try:
            c = HEADER_STRUCT.parse(raw[:HEADER_SIZE])
        except ConstructError as exc:  # pragma: no cover - fixed-size layout
            raise InvalidImageError(f"FVD header unreadable: {exc}") from None
        if c.magic != FVD_MAGIC:
            raise InvalidImageError(f"not an FVD image (magic {c.magic:#010x})")
        if c.version != FVD_VERSION:
            raise InvalidImageError(f"unsupported FVD version {c.version} (only 1)")
        if c.header_size != HEADER_SIZE:
            raise InvalidImageError(f"FVD header_size is {c.header_size}, expected 4096")
        for i, value in enumerate(c.incompatible_features):
            if value:
                raise InvalidImageError(
                    f"unknown incompatible feature byte {i} (value {value:#04x}) in FVD header"
                )
        fields: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            value = c[f.name]
            if f.name in _STRING_FIELDS:
                value = _decode_string(f.name, value)
            fields[f.name] = value
        header = cls(**fields)  # type: ignore[arg-type]
        header.check_units()
        return header

    def to_bytes(self) -> bytes:
        values: dict[str, object] = {"magic": FVD_MAGIC, "reserved": bytes(HEADER_SIZE - 3360)}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _STRING_FIELDS:
                value = _encode_string(f.name, value, _STRING_FIELDS[f.name])
            values[f.name] = value
        raw: bytes = HEADER_STRUCT.build(values)
        return raw

    # ---- validation -------------------------------------------------------

    def check_units(self) -> None:
        """Sizes are multiples of their units and within sane bounds."""
        _multiple("virtual_disk_size", self.virtual_disk_size, SECTOR_SIZE)
        if self.virtual_disk_size > MAX_VIRTUAL_DISK_SIZE:
            raise InvalidImageError(f"virtual_disk_size {self.virtual_disk_size} is too large")
        _multiple("data_offset", self.data_offset, REGION_ALIGNMENT)
        bs = self.block_size
        if bs < SECTOR_SIZE or bs & (bs - 1) or bs > (1 << 30):
            raise InvalidImageError(f"block_size {bs} is not a power of two between 512 and 1 GiB")
        _multiple("journal_size", self.journal_size, SECTOR_SIZE)
        if self.journal_size > MAX_JOURNAL_SIZE:
            raise InvalidImageError(f"journal_size {self.journal_size} is too large")
        if self.data_file_fmt not in ("", "raw"):
            raise InvalidImageError(
                f"data_file_fmt {self.data_file_fmt!r} is not supported (only raw)"
            )
        if self.data_file and self.data_offset != 0:
            raise InvalidImageError("data_offset must be 0 when data_file is set")
        if not self.data_file and self.data_offset < HEADER_SIZE:
            raise InvalidImageError(
                f"data_offset {self.data_offset} overlaps the header (data in the same file)"
            )
        if self.has_base:
            _multiple("base_img_size", self.base_img_size, SECTOR_SIZE)
            if self.base_img_size > self.virtual_disk_size:
                raise InvalidImageError(
                    f"base_img_size {self.base_img_size} exceeds virtual_disk_size "
                    f"{self.virtual_disk_size}"
                )
            _multiple("bitmap_size", self.bitmap_size, REGION_ALIGNMENT)
            needed = bitmap_bytes_needed(self.base_block_count)
            if needed > MAX_BITMAP_BYTES:
                raise InvalidImageError(f"bitmap of {needed} bytes is too large")
            if self.bitmap_size < align_up(needed, REGION_ALIGNMENT):
                raise InvalidImageError(
                    f"bitmap_size {self.bitmap_size} is too small for {self.base_block_count} "
                    f"blocks (needs {align_up(needed, REGION_ALIGNMENT)})"
                )
            _multiple("bytes_per_prefetch", self.bytes_per_prefetch, bs)
            if self.bytes_per_prefetch == 0:
                raise InvalidImageError("bytes_per_prefetch must not be 0")
            if self.num_prefetch_slots < 1:
                raise InvalidImageError("num_prefetch_slots must be at least 1")
        if self.compact:
            cs = self.chunk_size
            if cs == 0 or cs % REGION_ALIGNMENT or cs % bs:
                raise InvalidImageError(
                    f"chunk_size {cs} is not a multiple of 4096 and of block_size {bs}"
                )
            _multiple("table_size", self.table_size, REGION_ALIGNMENT)
            if self.chunk_count > MAX_TABLE_ENTRIES:
                raise InvalidImageError(f"table of {self.chunk_count} entries is too large")
            if self.table_size // 4 < self.chunk_count:
                raise InvalidImageError(
                    f"table_size {self.table_size} is too small for {self.chunk_count} chunks "
                    f"(needs {align_up(self.chunk_count * 4, REGION_ALIGNMENT)})"
                )


def validate_layout(header: FvdHeader, file_size: int) -> None:
    """Regions are aligned, disjoint, before ``data_offset`` and inside the file."""
    regions = [("header", 0, HEADER_SIZE)]
    if header.has_base:
        regions.append(("bitmap", header.bitmap_offset, header.bitmap_size))
    if header.compact:
        regions.append(("table", header.table_offset, header.table_size))
    if header.journal_size:
        regions.append(("journal", header.journal_offset, header.journal_size))
    for name, offset, size in regions[1:]:
        if offset % REGION_ALIGNMENT:
            raise InvalidImageError(f"{name} region at {offset} is not aligned to 4096")
        if offset + size > file_size:
            raise InvalidImageError(
                f"{name} region [{offset}, {offset + size}) lies past the end of the file "
                f"({file_size} bytes)"
            )
        if header.data_in_file and offset + size > header.data_offset:
            raise InvalidImageError(
                f"{name} region [{offset}, {offset + size}) runs past data_offset "
                f"{header.data_offset}"
            )
    ordered = sorted(regions, key=lambda r: r[1])
    for (a, a_off, a_size), (b, b_off, _) in itertools.pairwise(ordered):
        if a_off + a_size > b_off:
            raise InvalidImageError(f"{a} region overlaps {b} region")
    if header.data_in_file and header.data_offset > file_size:
        raise InvalidImageError(
            f"data_offset {header.data_offset} lies past the end of the file ({file_size} bytes)"
        )


def _multiple(name: str, value: int, unit: int) -> None:
    if value % unit:
        raise InvalidImageError(f"{name} {value} is not a multiple of {unit}")


def _decode_string(name: str, raw: bytes) -> str:
    end = raw.find(b"\0")
    if end < 0:
        raise InvalidImageError(f"FVD header field {name} is not NUL-terminated")
    try:
        return raw[:end].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidImageError(f"FVD header field {name} is not valid UTF-8") from None


def _encode_string(name: str, value: str, size: int) -> bytes:
    raw = value.encode("utf-8")
    if b"\0" in raw or len(raw) >= size:
        raise ValueError(f"{name} must be at most {size - 1} bytes without NUL")
    return raw.ljust(size, b"\0")


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def bitmap_bytes_needed(blocks: int) -> int:
    return -(-blocks // 8)


# ---- bitmap and table -----------------------------------------------------------
# The declarations say what the regions hold; the driver reads and writes them
# as numpy arrays (BITMAP_DTYPE packed LSB first, TABLE_DTYPE), which
# tests/unit/block/fvd/test_structs.py checks against these.


def bitmap_struct(nbytes: int) -> Struct:
    """``nbytes`` bytes of block bits; bit ``i % 8`` of byte ``i // 8`` is block ``i``."""
    return Struct("bits" / Array(nbytes, BitsSwapped(Bitwise(Array(8, Flag)))))


def table_struct(entries: int) -> Struct:
    """``entries`` u32: a physical chunk number or TABLE_UNALLOCATED."""
    return Struct("entries" / Array(entries, Int32ul))


# ---- journal records ---------------------------------------------------------

JOURNAL_BITMAP_RECORD = Struct(
    "type" / Int32ul,
    "num_dirty_sectors" / Int32ul,
    "dirty_sector_begin" / Int64ul,
)
JOURNAL_TABLE_RECORD_HEADER = Struct(
    "type" / Int32ul,
    "journal_epoch" / Int64ul,
    "num_entries" / Int32ul,
    "first_entry" / Int32ul,
)
# struct twins of the construct declarations, for the journal's hot loop;
# tests/unit/block/fvd/test_structs.py proves they agree
_BITMAP_REC = struct.Struct("<IIQ")
_TABLE_REC = struct.Struct("<IQII")


@dataclass(frozen=True, slots=True)
class JournalBitmapRecord:
    """Guest bytes ``[guest_offset, guest_offset + length)`` are now in the image."""

    guest_offset: int
    length: int

    @property
    def size(self) -> int:
        return JOURNAL_BITMAP_RECORD_SIZE

    def to_bytes(self) -> bytes:
        assert self.guest_offset % SECTOR_SIZE == 0
        assert self.length % SECTOR_SIZE == 0
        return _BITMAP_REC.pack(
            JOURNAL_BITMAP_TYPE, self.length // SECTOR_SIZE, self.guest_offset // SECTOR_SIZE
        )


@dataclass(frozen=True, slots=True)
class JournalTableRecord:
    """Table entries ``[first_index, first_index + len(entries))`` now hold ``entries``."""

    journal_epoch: int
    first_index: int
    entries: tuple[int, ...]

    @property
    def size(self) -> int:
        return JOURNAL_TABLE_HEADER_SIZE + 4 * len(self.entries)

    def to_bytes(self) -> bytes:
        n = len(self.entries)
        assert 0 < n <= MAX_TABLE_RECORD_ENTRIES
        head = _TABLE_REC.pack(JOURNAL_TABLE_TYPE, self.journal_epoch, n, self.first_index)
        return head + np.asarray(self.entries, dtype=TABLE_DTYPE).tobytes()


JournalRecord = JournalBitmapRecord | JournalTableRecord


def decode_journal_sector(raw: bytes, sector_index: int) -> list[JournalRecord]:
    """Records of one 512-byte sector; an empty list means the sector is unused.

    A type of 0, or fewer than 4 bytes left, ends the sector.  An unknown
    type or a record running past the sector is corruption.
    """
    out: list[JournalRecord] = []
    pos = 0
    where = f"FVD journal sector {sector_index}"
    while SECTOR_SIZE - pos >= 4:
        (rtype,) = struct.unpack_from("<I", raw, pos)
        if rtype == 0:
            break
        if rtype == JOURNAL_BITMAP_TYPE:
            if pos + JOURNAL_BITMAP_RECORD_SIZE > SECTOR_SIZE:
                raise InvalidImageError(f"{where}: BITMAP record runs past the sector")
            _, count, begin = _BITMAP_REC.unpack_from(raw, pos)
            out.append(JournalBitmapRecord(begin * SECTOR_SIZE, count * SECTOR_SIZE))
            pos += JOURNAL_BITMAP_RECORD_SIZE
        elif rtype == JOURNAL_TABLE_TYPE:
            if pos + JOURNAL_TABLE_HEADER_SIZE > SECTOR_SIZE:
                raise InvalidImageError(f"{where}: TABLE record runs past the sector")
            _, epoch, n, first = _TABLE_REC.unpack_from(raw, pos)
            end = pos + JOURNAL_TABLE_HEADER_SIZE + 4 * n
            if n == 0 or n > MAX_TABLE_RECORD_ENTRIES or end > SECTOR_SIZE:
                raise InvalidImageError(
                    f"{where}: TABLE record with {n} entries runs past the sector"
                )
            entries = np.frombuffer(
                raw, dtype=TABLE_DTYPE, count=n, offset=pos + JOURNAL_TABLE_HEADER_SIZE
            )
            out.append(JournalTableRecord(epoch, first, tuple(int(e) for e in entries)))
            pos = end
        else:
            raise InvalidImageError(f"{where}: unknown record type {rtype:#010x} at byte {pos}")
    return out


def encode_journal_sector(records: list[JournalRecord]) -> bytes:
    """Pack records into one sector (they must fit), zero padded."""
    raw = b"".join(r.to_bytes() for r in records)
    assert len(raw) <= SECTOR_SIZE
    return raw.ljust(SECTOR_SIZE, b"\0")


__all__ = [
    "FVD_MAGIC",
    "HEADER_SIZE",
    "FvdHeader",
    "JournalBitmapRecord",
    "JournalRecord",
    "JournalTableRecord",
    "decode_journal_sector",
    "encode_journal_sector",
    "validate_layout",
]
