"""Byte-level surgery on qcow2 images, to make corrupt images for tests."""

from __future__ import annotations

import struct
from pathlib import Path


def u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int(struct.unpack(">Q", f.read(8))[0])


def u32(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int(struct.unpack(">I", f.read(4))[0])


def put_u64(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def put_u32(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">I", value))


def cluster_size(path: Path) -> int:
    return 1 << u32(path, 20)


def l1_offset(path: Path) -> int:
    return u64(path, 40)


def l1_entry_at(path: Path, index: int) -> int:
    """Byte offset of L1 entry ``index``."""
    return l1_offset(path) + 8 * index


def l2_entry_at(path: Path, guest_offset: int) -> int:
    """Byte offset of the (standard) L2 entry mapping ``guest_offset``."""
    cs = cluster_size(path)
    entries = cs // 8
    l1i, l2i = divmod(guest_offset // cs, entries)
    l2 = u64(path, l1_entry_at(path, l1i)) & 0x00FFFFFFFFFFFE00
    assert l2, "no L2 table there"
    return l2 + 8 * l2i


def refcount_entry_at(path: Path, cluster_index: int) -> int:
    """Byte offset of the 16-bit refcount of a cluster (refcount_order 4 images only)."""
    cs = cluster_size(path)
    per_block = cs // 2
    table = u64(path, 48)
    bi, idx = divmod(cluster_index, per_block)
    block = u64(path, table + 8 * bi)
    assert block, "no refcount block there"
    return block + 2 * idx


def put_u16(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">H", value))


def set_incompatible(path: Path, bits: int) -> None:
    put_u64(path, 72, u64(path, 72) | bits)
