"""On-disk layout of Parallels expandable images (docs/interop/parallels.txt).

A file is: a 64-byte header, the BAT (little-endian u32 per guest cluster),
then the data area.  Two header magics exist:

* ``WithoutFreeSpace`` ("old"): BAT entries are offsets in 512-byte sectors,
  only the low 32 bits of ``nb_sectors`` count, ``data_off`` may be zero
  (then the data area starts at the sector after the BAT).
* ``WithouFreSpacExt`` ("ext", what QEMU creates): BAT entries are offsets in
  clusters, ``data_off`` is non-zero and cluster aligned.

Everything here is declaration, pure arithmetic and validation; no I/O.
Sizes and offsets leave this module in bytes (architecture 2.9: no sectors
beyond the decode step).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final

import numpy as np
from construct import Bytes, ConstructError, Int32ul, Int64ul, Struct

from nbdserve.errors import InvalidImageError

SECTOR_SIZE: Final = 512
HEADER_SIZE: Final = 64
MAGIC_OLD: Final = b"WithoutFreeSpace"
MAGIC_EXT: Final = b"WithouFreSpacExt"
VERSION: Final = 2
# in_use: set while a writer has the image open; anything else reads as closed
# (the spec's "closed" value 0x312e3276 and QEMU's 0 both do)
INUSE_MAGIC: Final = 0x746F6E59
INUSE_CLOSED: Final = 0
# QEMU's creation defaults (block/parallels.h)
DEFAULT_CLUSTER_SIZE: Final = 1 << 20
HEADS_NUMBER: Final = 16
SEC_IN_CYL: Final = 32

BAT_ENTRY_SIZE: Final = 4
BAT_DTYPE: Final = np.dtype("<u4")

# Limits on untrusted header numbers.  A cluster bigger than this makes
# every partial-cluster fill a huge buffer; QEMU's images use 1 MiB and the
# historical Parallels sizes are 31.5/252/256 KiB.
MAX_CLUSTER_SIZE: Final = 64 << 20
# The BAT is held in memory: 2^27 entries is 512 MiB (a 128 TiB disk with
# 1 MiB clusters, a 512 GiB one with 4 KiB clusters).
MAX_BAT_ENTRIES: Final = 1 << 27

_HEADER = Struct(
    "magic" / Bytes(16),
    "version" / Int32ul,
    "heads" / Int32ul,
    "cylinders" / Int32ul,
    "tracks" / Int32ul,
    "bat_entries" / Int32ul,
    "nb_sectors" / Int64ul,
    "inuse" / Int32ul,
    "data_off" / Int32ul,
    "flags" / Int32ul,
    "ext_off" / Int64ul,
)
assert _HEADER.sizeof() == HEADER_SIZE


@dataclass(frozen=True, slots=True)
class ParallelsHeader:
    """The 64-byte header, fields as stored (sector units where the spec has them)."""

    magic: bytes
    version: int
    heads: int
    cylinders: int
    tracks: int  # cluster size in sectors
    bat_entries: int
    nb_sectors: int
    inuse: int
    data_off: int  # sectors; 0 allowed for the old magic
    flags: int
    ext_off: int  # sectors

    @classmethod
    def from_bytes(cls, raw: bytes) -> ParallelsHeader:
        """Parse and check magic and version; other checks are in :func:`geometry_of`."""
        if len(raw) < HEADER_SIZE:
            raise InvalidImageError(
                f"not a parallels image: file too short for a header ({len(raw)} bytes)"
            )
        try:
            c = _HEADER.parse(raw[:HEADER_SIZE])
        except ConstructError as exc:  # pragma: no cover - fixed-size fields
            raise InvalidImageError(f"not a parallels image: {exc}") from None
        if c.magic not in (MAGIC_OLD, MAGIC_EXT):
            raise InvalidImageError(
                f"not a parallels image: magic {bytes(c.magic)!r} is neither "
                f"{MAGIC_OLD.decode()!r} nor {MAGIC_EXT.decode()!r}"
            )
        if c.version != VERSION:
            raise InvalidImageError(
                f"unsupported parallels version {c.version} (only {VERSION} is defined)"
            )
        return cls(
            magic=bytes(c.magic),
            version=c.version,
            heads=c.heads,
            cylinders=c.cylinders,
            tracks=c.tracks,
            bat_entries=c.bat_entries,
            nb_sectors=c.nb_sectors,
            inuse=c.inuse,
            data_off=c.data_off,
            flags=c.flags,
            ext_off=c.ext_off,
        )

    def to_bytes(self) -> bytes:
        return bytes(_HEADER.build(dataclasses.asdict(self)))

    def replace(self, **changes: int) -> ParallelsHeader:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def is_ext(self) -> bool:
        return self.magic == MAGIC_EXT

    @property
    def unclean(self) -> bool:
        return self.inuse == INUSE_MAGIC


def probe(raw: bytes) -> bool:
    """QEMU's parallels_probe: either magic and version 2."""
    return (
        len(raw) >= HEADER_SIZE
        and raw[:16] in (MAGIC_OLD, MAGIC_EXT)
        and int.from_bytes(raw[16:20], "little") == VERSION
    )


def bat_entry_offset(index: int) -> int:
    """Host offset of BAT entry ``index`` (the BAT follows the header)."""
    return HEADER_SIZE + BAT_ENTRY_SIZE * index


def min_data_offset(bat_entries: int, cluster_size: int, *, ext: bool) -> int:
    """The lowest legal start of the data area, in bytes.

    reference: qemu block/parallels.c parallels_test_data_off (min_off)
    """
    end = -(-bat_entry_offset(bat_entries) // SECTOR_SIZE) * SECTOR_SIZE
    if ext:
        end = -(-end // cluster_size) * cluster_size
    return end


@dataclass(frozen=True, slots=True)
class Geometry:
    """What the driver needs from a validated header, in bytes."""

    cluster_size: int
    bat_unit: int  # bytes per BAT entry unit: 512 (old magic) or cluster_size (ext)
    bat_entries: int
    size: int  # virtual disk size
    data_start: int  # start of the data area
    data_off_ok: bool  # False: data_off is wrong and data_start is the corrected value
    ext_offset: int  # format extension cluster, 0 if none

    @property
    def bat_end(self) -> int:
        return bat_entry_offset(self.bat_entries)

    @property
    def max_host_offset(self) -> int:
        """The largest offset a BAT entry can express (entry 0xffffffff)."""
        return 0xFFFFFFFF * self.bat_unit


def geometry_of(header: ParallelsHeader, file_size: int) -> Geometry:
    """Validate the header's numbers against each other and the file.

    Raises InvalidImageError for what makes the image unusable: zero or
    oversized clusters, a BAT too large to hold or longer than the file, a
    virtual size the BAT cannot map.  A wrong ``data_off`` is not fatal (QEMU
    repairs it at check); ``data_off_ok`` says so and ``data_start`` is the
    corrected value.
    """
    if header.tracks == 0:
        raise InvalidImageError("invalid parallels image: zero sectors per track (cluster size 0)")
    cluster_size = header.tracks * SECTOR_SIZE
    if cluster_size > MAX_CLUSTER_SIZE:
        raise InvalidImageError(
            f"invalid parallels image: cluster size {cluster_size} is larger than the "
            f"supported maximum {MAX_CLUSTER_SIZE}"
        )
    if header.bat_entries > MAX_BAT_ENTRIES:
        raise InvalidImageError(
            f"invalid parallels image: BAT of {header.bat_entries} entries is larger "
            f"than the supported maximum {MAX_BAT_ENTRIES}"
        )
    bat_end = bat_entry_offset(header.bat_entries)
    if bat_end > file_size:
        raise InvalidImageError(
            f"invalid parallels image: BAT of {header.bat_entries} entries ends at "
            f"{bat_end}, past the end of the file ({file_size} bytes)"
        )
    nb_sectors = header.nb_sectors if header.is_ext else header.nb_sectors & 0xFFFFFFFF
    size = nb_sectors * SECTOR_SIZE
    if size > header.bat_entries * cluster_size:
        raise InvalidImageError(
            f"invalid parallels image: virtual size {size} needs more than the "
            f"{header.bat_entries} clusters the BAT maps"
        )
    if header.ext_off >= (1 << 63) // SECTOR_SIZE:
        raise InvalidImageError("invalid parallels image: format extension offset too large")
    data_start, ok = _data_start(header, cluster_size, file_size)
    return Geometry(
        cluster_size=cluster_size,
        bat_unit=cluster_size if header.is_ext else SECTOR_SIZE,
        bat_entries=header.bat_entries,
        size=size,
        data_start=data_start,
        data_off_ok=ok,
        ext_offset=header.ext_off * SECTOR_SIZE,
    )


def _data_start(header: ParallelsHeader, cluster_size: int, file_size: int) -> tuple[int, bool]:
    """(start of the data area, whether data_off says so correctly).

    reference: qemu block/parallels.c parallels_test_data_off
    """
    min_off = min_data_offset(header.bat_entries, cluster_size, ext=header.is_ext)
    if header.data_off == 0 and not header.is_ext:
        return min_off, True
    data_off = header.data_off * SECTOR_SIZE
    if data_off < min_off or data_off > file_size:
        return min_off, False
    return data_off, True


def new_header(size: int, cluster_size: int) -> ParallelsHeader:
    """The header qemu-img creates (ext magic) for ``size`` bytes.

    reference: qemu block/parallels.c parallels_co_create
    """
    bat_entries = -(-size // cluster_size)
    data_off = min_data_offset(bat_entries, cluster_size, ext=True)
    return ParallelsHeader(
        magic=MAGIC_EXT,
        version=VERSION,
        heads=HEADS_NUMBER,
        cylinders=size // SECTOR_SIZE // HEADS_NUMBER // SEC_IN_CYL,
        tracks=cluster_size // SECTOR_SIZE,
        bat_entries=bat_entries,
        nb_sectors=-(-size // SECTOR_SIZE),
        inuse=INUSE_CLOSED,
        data_off=data_off // SECTOR_SIZE,
        flags=0,
        ext_off=0,
    )


def decode_bat(raw: bytes | bytearray) -> np.ndarray[tuple[int], np.dtype[np.uint32]]:
    """The BAT as an owned, writable ``<u4`` array."""
    return np.frombuffer(raw, dtype=BAT_DTYPE).copy()


__all__ = [
    "BAT_DTYPE",
    "DEFAULT_CLUSTER_SIZE",
    "HEADER_SIZE",
    "INUSE_CLOSED",
    "INUSE_MAGIC",
    "MAGIC_EXT",
    "MAGIC_OLD",
    "MAX_BAT_ENTRIES",
    "MAX_CLUSTER_SIZE",
    "SECTOR_SIZE",
    "Geometry",
    "ParallelsHeader",
    "bat_entry_offset",
    "decode_bat",
    "geometry_of",
    "min_data_offset",
    "new_header",
    "probe",
]
