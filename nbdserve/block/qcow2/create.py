"""qcow2 image creation (QEMU ``qcow2_co_create`` and ``qemu-img create -o``).

Layout, as QEMU lays it out: the header cluster, the refcount table, the
refcount blocks describing every metadata cluster, then the L1 table.  The
numbers of table and block clusters depend on each other, so they are found by
iterating to a fixed point.  ``preallocation=metadata`` (and raw external data
files, which need every cluster mapped) is done afterwards by the driver's own
allocator, so there is one allocation code path.
"""

from __future__ import annotations

import os
import re

import numpy as np

from nbdserve.block.qcow2.structs import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    EXT_BACKING_FORMAT,
    EXT_DATA_FILE,
    INCOMPAT_COMPRESSION,
    INCOMPAT_DATA_FILE,
    INCOMPAT_EXTL2,
    QCOW_MAX_L1_SIZE,
    QCOW_MAX_VIRTUAL_SIZE,
    QEMU_FEATURE_TABLE,
    V2_HEADER_SIZE,
    V3_HEADER_SIZE_WITH_COMPRESSION,
    Qcow2Header,
    encode_extension,
    encode_feature_table,
    encode_refcounts,
    l1_entries_needed,
)
from nbdserve.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*$")
_BOOL = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False}


def _size(text: str) -> int:
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"invalid size {text!r}")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def _flag(options: dict[str, str], key: str) -> bool:
    value = options.pop(key, "off").lower()
    if value not in _BOOL:
        raise ConfigError(f"{key} must be on or off, not {value!r}")
    return _BOOL[value]


def build_header(
    size: int, options: dict[str, str], backing: str | None, backing_fmt: str | None
) -> tuple[bytes, Qcow2Header, dict[str, object]]:
    """Validate ``-o`` options; return (header cluster, header, post-create actions)."""
    opts = dict(options)
    cluster_size = _size(opts.pop("cluster_size", "64K"))
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 * 1024 * 1024:
        raise ConfigError("cluster_size must be a power of two between 512 and 2M")
    cluster_bits = cluster_size.bit_length() - 1
    compat = opts.pop("compat", "1.1")
    if compat in ("0.10", "v2"):
        version = 2
    elif compat in ("1.1", "v3"):
        version = 3
    else:
        raise ConfigError(f"compat must be 0.10 or 1.1, not {compat!r}")
    extended = _flag(opts, "extended_l2")
    lazy = _flag(opts, "lazy_refcounts")
    compression = opts.pop("compression_type", "zlib")
    if compression not in ("zlib", "zstd"):
        raise ConfigError(f"compression_type must be zlib or zstd, not {compression!r}")
    refcount_bits = int(opts.pop("refcount_bits", "16"))
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise ConfigError("refcount_bits must be a power of two up to 64")
    prealloc = opts.pop("preallocation", "off")
    if prealloc not in ("off", "metadata"):
        raise ConfigError("preallocation must be off or metadata")
    data_file = opts.pop("data_file", None)
    data_file_raw = _flag(opts, "data_file_raw")
    if opts:
        raise ConfigError(f"unknown qcow2 options: {', '.join(sorted(opts))}")
    if version == 2 and (
        extended or lazy or compression != "zlib" or refcount_bits != 16 or data_file
    ):
        raise ConfigError(
            "compat=0.10 images cannot have extended_l2, lazy_refcounts, zstd, "
            "refcount_bits other than 16 or a data file"
        )
    if extended and cluster_size < 16384:
        raise ConfigError("extended_l2 needs a cluster size of at least 16K")
    if data_file_raw and not data_file:
        raise ConfigError("data_file_raw needs data_file")
    if size < 0 or size > QCOW_MAX_VIRTUAL_SIZE or size % 512:
        raise ConfigError("qcow2 virtual size must be a multiple of 512 below 2^56")
    if backing_fmt and not backing:
        raise ConfigError("a backing format needs a backing file")
    _check_backing_compatible(backing, prealloc, extended, data_file_raw)

    l2_bits = cluster_bits - (4 if extended else 3)
    l1_size = l1_entries_needed(size, cluster_bits, l2_bits)
    if l1_size * 8 > QCOW_MAX_L1_SIZE:
        raise ConfigError("virtual size too large for this cluster size")
    refcount_order = refcount_bits.bit_length() - 1
    header_length = V2_HEADER_SIZE if version == 2 else V3_HEADER_SIZE_WITH_COMPRESSION
    incompat = (INCOMPAT_EXTL2 if extended else 0) | (INCOMPAT_DATA_FILE if data_file else 0)
    compression_type = COMPRESSION_ZSTD if compression == "zstd" else COMPRESSION_ZLIB
    if compression_type != COMPRESSION_ZLIB:
        incompat |= INCOMPAT_COMPRESSION
    reftable_clusters, blocks, l1_clusters = _layout(cluster_bits, refcount_order, l1_size)
    header = Qcow2Header(
        version=version,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=(1 + reftable_clusters + blocks) * cluster_size,
        refcount_table_offset=cluster_size,
        refcount_table_clusters=reftable_clusters,
        nb_snapshots=0,
        snapshots_offset=0,
        incompatible_features=incompat if version == 3 else 0,
        compatible_features=COMPAT_LAZY_REFCOUNTS if lazy else 0,
        autoclear_features=AUTOCLEAR_DATA_FILE_RAW if data_file_raw else 0,
        refcount_order=refcount_order,
        header_length=header_length,
        compression_type=compression_type,
    )
    exts = b""
    if backing_fmt:
        exts += encode_extension(EXT_BACKING_FORMAT, backing_fmt.encode())
    if data_file:
        exts += encode_extension(EXT_DATA_FILE, data_file.encode())
    backing_raw = backing.encode() if backing else b""
    end_marker = bytes(8)
    if version == 3:
        table = encode_feature_table(QEMU_FEATURE_TABLE)
        if header_length + len(exts) + len(table) + 8 + len(backing_raw) <= cluster_size:
            exts += table
    exts += end_marker
    if backing:
        header = header.with_fields(
            backing_file_offset=header_length + len(exts), backing_file_size=len(backing_raw)
        )
    cluster0 = header.to_bytes() + exts + backing_raw
    if len(cluster0) > cluster_size:
        raise ConfigError("backing file name and extensions do not fit in the header cluster")
    actions: dict[str, object] = {
        "preallocate": prealloc == "metadata" or data_file_raw,
        "data_file": data_file,
        "blocks": blocks,
        "l1_clusters": l1_clusters,
    }
    return cluster0 + bytes(cluster_size - len(cluster0)), header, actions


def _check_backing_compatible(
    backing: str | None, prealloc: str, extended: bool, data_file_raw: bool
) -> None:
    """QEMU's qcow2_co_create refusals: a mapped cluster without subclusters hides the
    backing file, so preallocation needs extended L2 entries (whose empty bitmaps let
    it show through); a raw data file holds every guest byte, so nothing shows through."""
    if not backing:
        return
    if prealloc != "off" and not extended:
        raise ConfigError(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on"
        )
    if data_file_raw:
        raise ConfigError("Backing file and data-file-raw cannot be used at the same time")


def _layout(cluster_bits: int, refcount_order: int, l1_size: int) -> tuple[int, int, int]:
    """(refcount table clusters, refcount blocks, L1 clusters) of a new image."""
    cluster_size = 1 << cluster_bits
    per_block = (cluster_size * 8) >> refcount_order
    l1_clusters = -(-l1_size * 8 // cluster_size)
    reftable, blocks = 1, 1
    while True:
        total = 1 + reftable + blocks + l1_clusters
        need_blocks = -(-total // per_block)
        need_reftable = max(1, -(-need_blocks * 8 // cluster_size))
        if (need_blocks, need_reftable) == (blocks, reftable):
            return reftable, blocks, l1_clusters
        blocks, reftable = need_blocks, need_reftable


async def create(
    path: str,
    size: int,
    options: dict[str, str],
    backing: str | None,
    backing_fmt: str | None,
) -> None:
    from nbdserve.block.file import FileBackend

    cluster0, header, actions = build_header(size, options, backing, backing_fmt)
    cs = header.cluster_size
    blocks = int(str(actions["blocks"]))
    l1_clusters = int(str(actions["l1_clusters"]))
    total = 1 + header.refcount_table_clusters + blocks + l1_clusters
    per_block = (cs * 8) >> header.refcount_order
    reftable = np.zeros(header.refcount_table_clusters * cs // 8, dtype=">u8")
    first_block = 1 + header.refcount_table_clusters
    for i in range(blocks):
        reftable[i] = np.uint64((first_block + i) * cs)
    data_file = actions["data_file"]
    if isinstance(data_file, str):
        await _create_data_file(path, data_file, size, raw=header.data_file_raw)
    file = FileBackend.open(path, read_only=False, create=True)
    try:
        await file.truncate(0)
        await file.pwrite(0, cluster0)
        await file.pwrite(cs, reftable.tobytes())
        for i in range(blocks):
            counts = np.zeros(per_block, dtype=np.uint64)
            lo, hi = i * per_block, min(total, (i + 1) * per_block)
            if hi > lo:
                counts[: hi - lo] = 1
            await file.pwrite(
                (first_block + i) * cs, encode_refcounts(counts, header.refcount_order)
            )
        await file.truncate(total * cs)  # the L1 table: zeros
        await file.sync()
    finally:
        await file.aclose()
    if actions["preallocate"]:
        await _preallocate_metadata(path)


async def _create_data_file(image: str, name: str, size: int, *, raw: bool) -> None:
    from nbdserve.block.file import FileBackend

    path = (
        name if os.path.isabs(name) else os.path.join(os.path.dirname(os.path.abspath(image)), name)
    )
    file = FileBackend.open(path, read_only=False, create=True)
    try:
        await file.truncate(0)
        if raw:
            await file.truncate(size)
    finally:
        await file.aclose()


async def _preallocate_metadata(path: str) -> None:
    from nbdserve.block.file import FileBackend
    from nbdserve.block.formats import OpenOptions
    from nbdserve.block.qcow2 import open_image
    from nbdserve.block.qcow2.write import preallocate_metadata

    file = FileBackend.open(path, read_only=False)
    driver = await open_image(file, OpenOptions(read_only=False))
    try:
        await preallocate_metadata(driver)
    finally:
        await driver.aclose()
