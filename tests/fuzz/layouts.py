"""Where the metadata of a seed image lives, read from the specs, not from nbdserve.

The fuzzer mutates *named* things (header fields, table entries, metadata
regions) so that a corpus entry keeps its meaning when a tool lays a seed out
slightly differently.  These parsers are deliberately independent of the
drivers' ``structs.py`` (written from qemu's docs/interop/qcow2.txt and
parallels.txt and from fvd-format.md), and they are lenient: a seed is always
a valid image, and a mutation is described relative to the *unmutated* seed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Literal

MAX_TABLES = 64  # per kind: enough for the tiny seeds, bounded for big ones


@dataclass(frozen=True)
class Field:
    """An integer at ``offset``; ``endian`` is ``<`` or ``>``."""

    offset: int
    size: int
    endian: str

    def read(self, data: bytes | bytearray) -> int:
        return int.from_bytes(data[self.offset : self.offset + self.size], _order(self.endian))


@dataclass(frozen=True)
class Table:
    """``count`` entries of ``entry_size`` bytes from ``offset``."""

    offset: int
    entry_size: int
    count: int
    endian: str

    def entry(self, index: int) -> Field:
        return Field(self.offset + index * self.entry_size, self.entry_size, self.endian)

    @property
    def length(self) -> int:
        return self.entry_size * self.count


@dataclass
class Layout:
    fields: dict[str, Field] = field(default_factory=dict)
    tables: dict[str, Table] = field(default_factory=dict)
    # metadata byte ranges for bit flips: the tables plus headers and extensions
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)

    def add_table(self, name: str, table: Table, file_size: int) -> None:
        if table.count <= 0 or table.offset >= file_size:
            return
        count = min(table.count, (file_size - table.offset) // table.entry_size)
        if count <= 0:
            return
        t = Table(table.offset, table.entry_size, count, table.endian)
        self.tables[name] = t
        self.regions[name] = (t.offset, t.length)


def _order(endian: str) -> Literal["little", "big"]:
    return "little" if endian == "<" else "big"


def _u(data: bytes, fmt: str, offset: int) -> int:
    return int(struct.unpack_from(fmt, data, offset)[0])


# ---- qcow2 (docs/interop/qcow2.txt) -----------------------------------------

_QCOW2_V2 = [
    ("magic", 0, 4),
    ("version", 4, 4),
    ("backing_file_offset", 8, 8),
    ("backing_file_size", 16, 4),
    ("cluster_bits", 20, 4),
    ("size", 24, 8),
    ("crypt_method", 32, 4),
    ("l1_size", 36, 4),
    ("l1_table_offset", 40, 8),
    ("refcount_table_offset", 48, 8),
    ("refcount_table_clusters", 56, 4),
    ("nb_snapshots", 60, 4),
    ("snapshots_offset", 64, 8),
]
_QCOW2_V3 = [
    ("incompatible_features", 72, 8),
    ("compatible_features", 80, 8),
    ("autoclear_features", 88, 8),
    ("refcount_order", 96, 4),
    ("header_length", 100, 4),
    ("compression_type", 104, 1),
]
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00


def qcow2_layout(data: bytes) -> Layout:
    lay = Layout()
    version = _u(data, ">I", 4)
    for name, off, size in _QCOW2_V2 + (_QCOW2_V3 if version >= 3 else []):
        lay.fields[name] = Field(off, size, ">")
    cluster = 1 << _u(data, ">I", 20)
    n = len(data)
    lay.regions["header"] = (0, min(cluster, n))
    header_length = _u(data, ">I", 100) if version >= 3 else 72
    _qcow2_extensions(data, lay, header_length, cluster)
    l1 = Table(_u(data, ">Q", 40), 8, _u(data, ">I", 36), ">")
    lay.add_table("l1", l1, n)
    _qcow2_l2_tables(data, lay, "l1", "l2", cluster)
    reftable = Table(_u(data, ">Q", 48), 8, _u(data, ">I", 56) * cluster // 8, ">")
    lay.add_table("reftable", reftable, n)
    refcount_bits = 1 << (_u(data, ">I", 96) if version >= 3 else 4)
    if "reftable" in lay.tables:
        offsets = _nonzero_entries(data, lay.tables["reftable"], REFT_OFFSET_MASK)
        for i, off in enumerate(offsets[:MAX_TABLES]):
            if refcount_bits >= 8:
                t = Table(off, refcount_bits // 8, cluster * 8 // refcount_bits, ">")
            else:  # sub-byte refcounts: mutate whole bytes
                t = Table(off, 1, cluster, ">")
            lay.add_table(f"refblock{i}", t, n)
    _qcow2_snapshots(data, lay, cluster)
    return lay


def _nonzero_entries(data: bytes, table: Table, mask: int) -> list[int]:
    out = []
    for i in range(table.count):
        value = table.entry(i).read(data) & mask
        if value and value < len(data):
            out.append(value)
    return out


def _qcow2_l2_tables(data: bytes, lay: Layout, l1_name: str, prefix: str, cluster: int) -> None:
    l1 = lay.tables.get(l1_name)
    if l1 is None:
        return
    # an extended L2 entry is two u64 (mapping, subcluster bitmap): mutate each u64
    words = cluster // 8
    for i, off in enumerate(_nonzero_entries(data, l1, L2_OFFSET_MASK)[:MAX_TABLES]):
        lay.add_table(f"{prefix}_{i}", Table(off, 8, words, ">"), len(data))


def _qcow2_extensions(data: bytes, lay: Layout, start: int, cluster: int) -> None:
    pos, end, i = start, min(cluster, len(data)), 0
    while pos + 8 <= end and i < 16:
        ext_type, length = struct.unpack_from(">II", data, pos)
        lay.fields[f"ext{i}.type"] = Field(pos, 4, ">")
        lay.fields[f"ext{i}.length"] = Field(pos + 4, 4, ">")
        if ext_type == 0:
            break
        lay.regions[f"ext{i}"] = (pos, 8 + length)
        if ext_type == 0x23852875 and length >= 24:  # bitmaps: nb, reserved, size, offset
            lay.fields[f"ext{i}.nb_bitmaps"] = Field(pos + 8, 4, ">")
            lay.fields[f"ext{i}.bitmap_directory_size"] = Field(pos + 16, 8, ">")
            lay.fields[f"ext{i}.bitmap_directory_offset"] = Field(pos + 24, 8, ">")
        pos += 8 + (length + 7) // 8 * 8
        i += 1


def _qcow2_snapshots(data: bytes, lay: Layout, cluster: int) -> None:
    count = _u(data, ">I", 60)
    pos = _u(data, ">Q", 64)
    if not count or not pos or pos >= len(data):
        return
    start = pos
    for i in range(min(count, 8)):
        if pos + 40 > len(data):
            break
        for name, off, size in [
            ("l1_table_offset", 0, 8),
            ("l1_size", 8, 4),
            ("id_str_size", 12, 2),
            ("name_size", 14, 2),
            ("vm_state_size", 32, 4),
            ("extra_data_size", 36, 4),
        ]:
            lay.fields[f"snap{i}.{name}"] = Field(pos + off, size, ">")
        l1_off, l1_size = struct.unpack_from(">QI", data, pos)
        lay.add_table(f"snap{i}_l1", Table(l1_off, 8, l1_size, ">"), len(data))
        _qcow2_l2_tables(data, lay, f"snap{i}_l1", f"snap{i}_l2", cluster)
        id_size, name_size = struct.unpack_from(">HH", data, pos + 12)
        (extra,) = struct.unpack_from(">I", data, pos + 36)
        pos += 40 + extra + id_size + name_size
        pos = (pos + 7) // 8 * 8
    lay.regions["snapshots"] = (start, pos - start)


# ---- parallels (docs/interop/parallels.txt) ---------------------------------

_PARALLELS = [
    ("version", 16, 4),
    ("heads", 20, 4),
    ("cylinders", 24, 4),
    ("tracks", 28, 4),
    ("bat_entries", 32, 4),
    ("nb_sectors", 36, 8),
    ("inuse", 44, 4),
    ("data_off", 48, 4),
    ("flags", 52, 4),
    ("ext_off", 56, 8),
]


def parallels_layout(data: bytes) -> Layout:
    lay = Layout()
    for name, off, size in _PARALLELS:
        lay.fields[name] = Field(off, size, "<")
    lay.regions["header"] = (0, 64)
    lay.add_table("bat", Table(64, 4, _u(data, "<I", 32), "<"), len(data))
    ext = _u(data, "<Q", 56) * 512
    if ext and ext + 32 <= len(data):
        lay.fields["ext.magic"] = Field(ext, 8, "<")
        lay.fields["ext.checksum"] = Field(ext, 8, "<")
        lay.regions["ext"] = (ext, min(4096, len(data) - ext))
    return lay


# ---- FVD (fvd-format.md) ----------------------------------------------------

_FVD = [
    ("magic", 0, 4),
    ("version", 4, 4),
    ("header_size", 12, 4),
    ("incompatible_features", 16, 8),
    ("virtual_disk_size", 48, 8),
    ("data_offset", 56, 8),
    ("base_img_size", 2144, 8),
    ("bitmap_offset", 2152, 8),
    ("bitmap_size", 2160, 8),
    ("block_size", 2168, 8),
    ("table_offset", 2176, 8),
    ("table_size", 2184, 8),
    ("chunk_size", 2192, 8),
    ("storage_grow_unit", 2200, 8),
    ("chunks_relocated", 3232, 4),
    ("clean_shutdown", 3236, 4),
    ("journal_offset", 3240, 8),
    ("journal_size", 3248, 8),
    ("stable_journal_epoch", 3256, 8),
    ("copy_on_read", 3264, 4),
    ("base_img_fully_prefetched", 3268, 4),
    ("max_outstanding_copy_on_read_data", 3272, 8),
    ("prefetch_start_delay", 3280, 8),
    ("num_prefetch_slots", 3288, 4),
    ("need_zero_init", 3292, 4),
    ("bytes_per_prefetch", 3296, 8),
]
# strings: their first and last bytes matter (NUL termination)
_FVD_STRINGS = [("data_file", 64, 1024), ("base_img", 1104, 1024), ("base_img_fmt", 2128, 16)]


def fvd_layout(data: bytes) -> Layout:
    lay = Layout()
    for name, off, size in _FVD:
        lay.fields[name] = Field(off, size, "<")
    for name, off, size in _FVD_STRINGS:
        lay.regions[name] = (off, size)
    lay.regions["header"] = (0, 3360)
    n = len(data)
    bitmap_off, bitmap_size = _u(data, "<Q", 2152), _u(data, "<Q", 2160)
    if bitmap_size:
        lay.add_table("bitmap", Table(bitmap_off, 1, min(bitmap_size, 1 << 16), "<"), n)
    table_off, table_size = _u(data, "<Q", 2176), _u(data, "<Q", 2184)
    if table_off:
        lay.add_table("table", Table(table_off, 4, min(table_size, 1 << 16) // 4, "<"), n)
    journal_off, journal_size = _u(data, "<Q", 3240), _u(data, "<Q", 3248)
    if journal_size:
        # only the used start of the journal is interesting: records are packed from sector 0
        lay.add_table("journal", Table(journal_off, 4, min(journal_size, 4096) // 4, "<"), n)
    return lay


LAYOUTS = {"qcow2": qcow2_layout, "parallels": parallels_layout, "fvd": fvd_layout}
