"""qcow2 on-disk layouts: header v2/v3, header extensions, snapshot table, masks.

Everything here is declarative: construct layouts, constants named as in
QEMU's ``block/qcow2.h``, and frozen dataclasses that decode and validate
untrusted bytes (``InvalidImageError``) and encode them back.  No I/O.

Reference: qemu docs/interop/qcow2.txt.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from typing import Any

import construct as cs
import numpy as np

from nbdserve.errors import InvalidImageError

QCOW_MAGIC = 0x514649FB  # "QFI\xfb"
QCOW_MAGIC_BYTES = b"QFI\xfb"

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
# QEMU's limits (qcow2.h): bound every table an image may make us load.
QCOW_MAX_L1_SIZE = 32 * 1024 * 1024  # bytes
QCOW_MAX_REFTABLE_SIZE = 8 * 1024 * 1024  # bytes
QCOW_MAX_SNAPSHOTS = 65536
QCOW_MAX_SNAPSHOTS_SIZE = 64 * 1024 * 1024
MAX_BACKING_FILE_NAME = 1023
MAX_DATA_FILE_NAME = 4096
# virtual sizes beyond this cannot be addressed by L2 entries (bits 9-55)
QCOW_MAX_VIRTUAL_SIZE = 1 << 56

# ---- entry masks (qcow2.h) -------------------------------------------------------

QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE

QCOW_L2_BITMAP_ALL_ALLOC = (1 << 32) - 1
QCOW_L2_BITMAP_ALL_ZEROES = QCOW_L2_BITMAP_ALL_ALLOC << 32
SUBCLUSTERS_PER_CLUSTER = 32
COMPRESSED_SECTOR_SIZE = 512

# numpy twins, so dtype promotion never surprises (architecture 2.8)
NP_COPIED = np.uint64(QCOW_OFLAG_COPIED)
NP_COMPRESSED = np.uint64(QCOW_OFLAG_COMPRESSED)
NP_ZERO = np.uint64(QCOW_OFLAG_ZERO)
NP_L1E_OFFSET_MASK = np.uint64(L1E_OFFSET_MASK)
NP_L2E_OFFSET_MASK = np.uint64(L2E_OFFSET_MASK)
NP_REFT_OFFSET_MASK = np.uint64(REFT_OFFSET_MASK)

# ---- feature bits ------------------------------------------------------------------

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

INCOMPAT_NAMES = {
    0: "dirty bit",
    1: "corrupt bit",
    2: "external data file",
    3: "compression type",
    4: "extended L2 entries",
}
COMPAT_NAMES = {0: "lazy refcounts"}
AUTOCLEAR_NAMES = {0: "bitmaps", 1: "raw external data"}

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# ---- header extensions ---------------------------------------------------------------

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# ---- header field offsets that the driver rewrites in place -------------------------

HDR_L1_SIZE = 36  # u32 l1_size, then u64 l1_table_offset at 40
HDR_L1_TABLE_OFFSET = 40
HDR_REFCOUNT_TABLE_OFFSET = 48  # u64, then u32 refcount_table_clusters at 56
HDR_INCOMPATIBLE_FEATURES = 72
HDR_AUTOCLEAR_FEATURES = 88

V2_HEADER_SIZE = 72
V3_HEADER_SIZE = 104
V3_HEADER_SIZE_WITH_COMPRESSION = 112

_HEADER_V2 = cs.Struct(
    "magic" / cs.Int32ub,
    "version" / cs.Int32ub,
    "backing_file_offset" / cs.Int64ub,
    "backing_file_size" / cs.Int32ub,
    "cluster_bits" / cs.Int32ub,
    "size" / cs.Int64ub,
    "crypt_method" / cs.Int32ub,
    "l1_size" / cs.Int32ub,
    "l1_table_offset" / cs.Int64ub,
    "refcount_table_offset" / cs.Int64ub,
    "refcount_table_clusters" / cs.Int32ub,
    "nb_snapshots" / cs.Int32ub,
    "snapshots_offset" / cs.Int64ub,
)

_HEADER_V3_TAIL = cs.Struct(
    "incompatible_features" / cs.Int64ub,
    "compatible_features" / cs.Int64ub,
    "autoclear_features" / cs.Int64ub,
    "refcount_order" / cs.Int32ub,
    "header_length" / cs.Int32ub,
)

_EXT_HEADER = cs.Struct("type" / cs.Int32ub, "length" / cs.Int32ub)

_FEATURE_ENTRY = cs.Struct(
    "type" / cs.Int8ub,
    "bit" / cs.Int8ub,
    # informative text: kept as bytes and decoded leniently, so a name that
    # is not ASCII cannot make an otherwise good image unreadable
    "name" / cs.Bytes(46),
)

_BITMAPS_EXT = cs.Struct(
    "nb_bitmaps" / cs.Int32ub,
    "reserved" / cs.Int32ub,
    "directory_size" / cs.Int64ub,
    "directory_offset" / cs.Int64ub,
)

_BITMAP_DIR_ENTRY = cs.Struct(
    "table_offset" / cs.Int64ub,
    "table_size" / cs.Int32ub,
    "flags" / cs.Int32ub,
    "type" / cs.Int8ub,
    "granularity_bits" / cs.Int8ub,
    "name_size" / cs.Int16ub,
    "extra_data_size" / cs.Int32ub,
)
BITMAP_DIR_ENTRY_SIZE = 24
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
QCOW_MAX_BITMAP_DIRECTORY_SIZE = 64 * 1024 * 1024

_SNAPSHOT_FIXED = cs.Struct(
    "l1_table_offset" / cs.Int64ub,
    "l1_size" / cs.Int32ub,
    "id_str_size" / cs.Int16ub,
    "name_size" / cs.Int16ub,
    "date_sec" / cs.Int32ub,
    "date_nsec" / cs.Int32ub,
    "vm_clock_nsec" / cs.Int64ub,
    "vm_state_size" / cs.Int32ub,
    "extra_data_size" / cs.Int32ub,
)
SNAPSHOT_FIXED_SIZE = 40


def _parse(layout: Any, raw: bytes, what: str) -> Any:
    try:
        return layout.parse(raw)
    except cs.ConstructError as exc:
        raise InvalidImageError(f"qcow2 {what} truncated or malformed: {exc}") from None


def _bit_names(bits: int, names: dict[int, str], table: dict[int, str]) -> str:
    out = []
    for bit in range(64):
        if bits & (1 << bit):
            name = table.get(bit) or names.get(bit) or "unknown"
            out.append(f"bit {bit} ({name})")
    return ", ".join(out)


@dataclass(frozen=True, slots=True)
class HeaderExtensions:
    """The extensions QEMU defines, plus the raw bytes of the ones we skip."""

    backing_format: str | None = None
    data_file: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    has_bitmaps: bool = False
    # (directory offset, directory size, number of bitmaps) from the bitmaps extension
    bitmaps: tuple[int, int, int] | None = None
    has_crypto: bool = False
    unknown: tuple[tuple[int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Qcow2Header:
    """The qcow2 header, validated against itself and the file size."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_SIZE
    compression_type: int = COMPRESSION_ZLIB

    # ---- derived -------------------------------------------------------------

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_bits(self) -> int:
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)

    # ---- codec -----------------------------------------------------------------

    @classmethod
    def from_bytes(cls, raw: bytes) -> Qcow2Header:
        """Decode the fixed header fields (no validation beyond magic/version)."""
        h = _parse(_HEADER_V2, raw[:V2_HEADER_SIZE], "header")
        if h.magic != QCOW_MAGIC:
            raise InvalidImageError("not a qcow2 image (bad magic)")
        if h.version not in (2, 3):
            raise InvalidImageError(f"unsupported qcow2 version {h.version}")
        fields = {k: v for k, v in h.items() if not k.startswith("_") and k != "magic"}
        if h.version == 3:
            t = _parse(_HEADER_V3_TAIL, raw[V2_HEADER_SIZE:V3_HEADER_SIZE], "v3 header")
            fields.update({k: v for k, v in t.items() if not k.startswith("_")})
            if t.header_length > V3_HEADER_SIZE and len(raw) > V3_HEADER_SIZE:
                fields["compression_type"] = raw[V3_HEADER_SIZE]
        return cls(**fields)

    def to_bytes(self) -> bytes:
        """Encode the header (fixed part, padded to ``header_length``)."""
        values = {
            "magic": QCOW_MAGIC,
            "version": self.version,
            "backing_file_offset": self.backing_file_offset,
            "backing_file_size": self.backing_file_size,
            "cluster_bits": self.cluster_bits,
            "size": self.size,
            "crypt_method": self.crypt_method,
            "l1_size": self.l1_size,
            "l1_table_offset": self.l1_table_offset,
            "refcount_table_offset": self.refcount_table_offset,
            "refcount_table_clusters": self.refcount_table_clusters,
            "nb_snapshots": self.nb_snapshots,
            "snapshots_offset": self.snapshots_offset,
        }
        out = bytearray(_HEADER_V2.build(values))
        if self.version == 3:
            out += _HEADER_V3_TAIL.build(
                {
                    "incompatible_features": self.incompatible_features,
                    "compatible_features": self.compatible_features,
                    "autoclear_features": self.autoclear_features,
                    "refcount_order": self.refcount_order,
                    "header_length": self.header_length,
                }
            )
            if self.header_length > V3_HEADER_SIZE:
                out.append(self.compression_type)
            out += bytes(max(0, self.header_length - len(out)))
        return bytes(out)

    def with_fields(self, **changes: int) -> Qcow2Header:
        return replace(self, **changes)

    # ---- validation ---------------------------------------------------------------

    def validate(self, file_size: int, feature_names: dict[tuple[int, int], str]) -> None:
        """Check every field against the spec, QEMU's limits and the file size."""
        if not MIN_CLUSTER_BITS <= self.cluster_bits <= MAX_CLUSTER_BITS:
            raise InvalidImageError(f"unsupported cluster size 2^{self.cluster_bits}")
        cluster = self.cluster_size
        if self.version == 3:
            if self.header_length < V3_HEADER_SIZE or self.header_length % 8:
                raise InvalidImageError(f"invalid header_length {self.header_length}")
            if self.header_length > cluster:
                raise InvalidImageError("header_length is larger than a cluster")
            if self.refcount_order > 6:
                raise InvalidImageError(f"invalid refcount_order {self.refcount_order}")
        elif self.refcount_order != 4:
            raise InvalidImageError("qcow2 v2 images have 16-bit refcounts")
        self._validate_features(feature_names)
        if self.size > QCOW_MAX_VIRTUAL_SIZE or self.size < 0:
            raise InvalidImageError(f"virtual size {self.size} is too large")
        self._validate_l1(file_size)
        self._validate_reftable(file_size)
        self._validate_snapshots(file_size)
        if self.backing_file_offset:
            if self.backing_file_size > MAX_BACKING_FILE_NAME:
                raise InvalidImageError("backing file name is too long")
            if self.backing_file_offset + self.backing_file_size > cluster:
                raise InvalidImageError("backing file name lies outside the header cluster")

    def _validate_features(self, names: dict[tuple[int, int], str]) -> None:
        incompat_names = {bit: n for (kind, bit), n in names.items() if kind == 0}
        unknown = self.incompatible_features & ~INCOMPAT_KNOWN
        if unknown:
            raise InvalidImageError(
                "unsupported qcow2 incompatible feature(s): "
                + _bit_names(unknown, INCOMPAT_NAMES, incompat_names)
            )
        if self.crypt_method != 0:
            raise InvalidImageError(
                f"encrypted qcow2 images are not supported (crypt_method {self.crypt_method})"
            )
        has_type_bit = bool(self.incompatible_features & INCOMPAT_COMPRESSION)
        if self.compression_type not in COMPRESSION_NAMES:
            raise InvalidImageError(f"unknown compression type {self.compression_type}")
        if has_type_bit != (self.compression_type != COMPRESSION_ZLIB):
            raise InvalidImageError(
                "compression type bit (incompatible bit 3) does not match compression_type"
            )
        if self.extended_l2 and self.cluster_bits < 14:
            raise InvalidImageError("extended L2 entries need clusters of at least 16 KiB")

    def _validate_table(self, what: str, offset: int, length: int, file_size: int) -> None:
        if offset % self.cluster_size:
            raise InvalidImageError(f"{what} offset {offset:#x} is not cluster aligned")
        if offset == 0 and length:
            raise InvalidImageError(f"{what} overlaps the header")
        if offset + length > file_size:
            raise InvalidImageError(
                f"{what} ({offset:#x}+{length:#x}) lies past the end of the file ({file_size:#x})"
            )

    def _validate_l1(self, file_size: int) -> None:
        if self.l1_size * 8 > QCOW_MAX_L1_SIZE:
            raise InvalidImageError(f"L1 table too large (l1_size {self.l1_size})")
        needed = l1_entries_needed(self.size, self.cluster_bits, self.l2_bits)
        if self.l1_size < needed:
            raise InvalidImageError(
                f"L1 table too small for the virtual size (l1_size {self.l1_size} < {needed})"
            )
        self._validate_table("L1 table", self.l1_table_offset, self.l1_size * 8, file_size)

    def _validate_reftable(self, file_size: int) -> None:
        length = self.refcount_table_clusters * self.cluster_size
        if self.refcount_table_clusters == 0:
            raise InvalidImageError("image has no refcount table")
        if length > QCOW_MAX_REFTABLE_SIZE:
            raise InvalidImageError("refcount table too large")
        self._validate_table("refcount table", self.refcount_table_offset, length, file_size)

    def _validate_snapshots(self, file_size: int) -> None:
        if self.nb_snapshots > QCOW_MAX_SNAPSHOTS:
            raise InvalidImageError(f"too many snapshots ({self.nb_snapshots})")
        if self.nb_snapshots:
            self._validate_table(
                "snapshot table",
                self.snapshots_offset,
                self.nb_snapshots * SNAPSHOT_FIXED_SIZE,
                file_size,
            )


def l1_entries_needed(size: int, cluster_bits: int, l2_bits: int) -> int:
    shift = cluster_bits + l2_bits
    return (size + (1 << shift) - 1) >> shift


# ---- extensions -----------------------------------------------------------------------


def extensions_start(header: Qcow2Header) -> int:
    return V2_HEADER_SIZE if header.version == 2 else header.header_length


def parse_extensions(header: Qcow2Header, raw: bytes) -> HeaderExtensions:
    """Walk the extension area of the header cluster ``raw`` (bounds-checked)."""
    pos = extensions_start(header)
    limit = header.backing_file_offset or len(raw)
    limit = min(limit, len(raw), header.cluster_size)
    backing_format = data_file = None
    names: dict[tuple[int, int], str] = {}
    unknown: list[tuple[int, bytes]] = []
    has_bitmaps = has_crypto = False
    bitmaps: tuple[int, int, int] | None = None
    while pos + 8 <= limit:
        ext = _EXT_HEADER.parse(raw[pos : pos + 8])
        pos += 8
        if ext.type == EXT_END:
            break
        end = pos + ext.length
        if end > limit:
            raise InvalidImageError(f"header extension {ext.type:#x} runs past the header area")
        data = raw[pos:end]
        if ext.type == EXT_BACKING_FORMAT:
            backing_format = _ascii(data, "backing format")
        elif ext.type == EXT_DATA_FILE:
            if ext.length > MAX_DATA_FILE_NAME:
                raise InvalidImageError("external data file name is too long")
            data_file = _ascii(data, "external data file name")
        elif ext.type == EXT_FEATURE_TABLE:
            names = _feature_names(data)
        elif ext.type == EXT_BITMAPS:
            has_bitmaps = True
            if len(data) >= 24:
                b = _BITMAPS_EXT.parse(data[:24])
                bitmaps = (b.directory_offset, b.directory_size, b.nb_bitmaps)
        elif ext.type == EXT_CRYPTO:
            has_crypto = True
        else:
            unknown.append((ext.type, bytes(data)))
        pos = end + (-ext.length % 8)
    return HeaderExtensions(
        backing_format=backing_format,
        data_file=data_file,
        feature_names=names,
        has_bitmaps=has_bitmaps,
        bitmaps=bitmaps,
        has_crypto=has_crypto,
        unknown=tuple(unknown),
    )


def _ascii(data: bytes, what: str) -> str:
    text = data.split(b"\0", 1)[0]
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidImageError(f"{what} is not valid UTF-8") from None


def _feature_names(data: bytes) -> dict[tuple[int, int], str]:
    out: dict[tuple[int, int], str] = {}
    for i in range(len(data) // 48):
        entry = _FEATURE_ENTRY.parse(data[i * 48 : i * 48 + 48])
        out[(entry.type, entry.bit)] = entry.name.rstrip(b"\0").decode("ascii", "replace")
    return out


def encode_extension(ext_type: int, data: bytes) -> bytes:
    return _EXT_HEADER.build({"type": ext_type, "length": len(data)}) + data + bytes(-len(data) % 8)


def encode_feature_table(entries: list[tuple[int, int, str]]) -> bytes:
    body = b"".join(
        _FEATURE_ENTRY.build({"type": t, "bit": b, "name": n.encode("ascii").ljust(46, b"\0")})
        for t, b, n in entries
    )
    return encode_extension(EXT_FEATURE_TABLE, body)


QEMU_FEATURE_TABLE: list[tuple[int, int, str]] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
]


# ---- snapshot table ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SnapshotEntry:
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    entry_size: int


def parse_snapshot_table(raw: bytes, count: int) -> list[SnapshotEntry]:
    """Decode ``count`` snapshot headers (only what the driver and check need)."""
    out: list[SnapshotEntry] = []
    pos = 0
    for _ in range(count):
        if pos + SNAPSHOT_FIXED_SIZE > len(raw):
            raise InvalidImageError("snapshot table truncated")
        fixed = _SNAPSHOT_FIXED.parse(raw[pos : pos + SNAPSHOT_FIXED_SIZE])
        var = fixed.extra_data_size + fixed.id_str_size + fixed.name_size
        end = pos + SNAPSHOT_FIXED_SIZE + var
        if end > len(raw):
            raise InvalidImageError("snapshot table truncated")
        id_at = pos + SNAPSHOT_FIXED_SIZE + fixed.extra_data_size
        id_str = raw[id_at : id_at + fixed.id_str_size].decode("utf-8", "replace")
        name_at = id_at + fixed.id_str_size
        name = raw[name_at : name_at + fixed.name_size].decode("utf-8", "replace")
        size = end - pos
        size += -size % 8
        out.append(SnapshotEntry(fixed.l1_table_offset, fixed.l1_size, id_str, name, size))
        pos += size
    return out


def parse_bitmap_directory(raw: bytes, count: int) -> list[tuple[int, int]]:
    """(bitmap table offset, entries) of each bitmap in a bitmap directory."""
    out: list[tuple[int, int]] = []
    pos = 0
    for _ in range(count):
        if pos + BITMAP_DIR_ENTRY_SIZE > len(raw):
            raise InvalidImageError("bitmap directory truncated")
        e = _BITMAP_DIR_ENTRY.parse(raw[pos : pos + BITMAP_DIR_ENTRY_SIZE])
        out.append((e.table_offset, e.table_size))
        size = BITMAP_DIR_ENTRY_SIZE + e.extra_data_size + e.name_size
        pos += size + (-size % 8)
    return out


def snapshot_table_max_size(count: int) -> int:
    """An upper bound to read before parsing: fixed part + 64 KiB of names/extra each."""
    return min(QCOW_MAX_SNAPSHOTS_SIZE, count * (SNAPSHOT_FIXED_SIZE + 65536 * 3))


# ---- refcount block codec ----------------------------------------------------------------


def decode_refcounts(raw: bytes | bytearray | memoryview, order: int) -> np.ndarray:
    """Unpack one refcount block to uint64 counts (sub-byte widths: LSB first)."""
    bits = 1 << order
    if bits >= 8:
        return np.frombuffer(raw, dtype=f">u{bits // 8}").astype(np.uint64)
    per = 8 // bits
    b = np.frombuffer(raw, dtype=np.uint8)
    shifts = np.arange(per, dtype=np.uint8) * np.uint8(bits)
    vals = (b[:, None] >> shifts) & np.uint8((1 << bits) - 1)
    return vals.reshape(-1).astype(np.uint64)


def encode_refcounts(counts: np.ndarray, order: int) -> bytes:
    bits = 1 << order
    if bits >= 8:
        return counts.astype(f">u{bits // 8}").tobytes()
    per = 8 // bits
    vals = counts.astype(np.uint8).reshape(-1, per)
    shifts = np.arange(per, dtype=np.uint8) * np.uint8(bits)
    packed = np.bitwise_or.reduce(vals << shifts, axis=1).astype(np.uint8)
    return bytes(packed.tobytes())


def pack_u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def pack_u32(value: int) -> bytes:
    return struct.pack(">I", value)
