"""``nbdserve img create -f parallels``: the image qemu-img creates.

reference: qemu block/parallels.c parallels_co_create — ext magic, the BAT
zeroed up to a cluster-aligned data offset, the file ending there.
"""

from __future__ import annotations

import re

from nbdserve.block.file import FileBackend
from nbdserve.block.parallels.structs import (
    DEFAULT_CLUSTER_SIZE,
    MAX_BAT_ENTRIES,
    MAX_CLUSTER_SIZE,
    SECTOR_SIZE,
    new_header,
)
from nbdserve.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*$")
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


def parse_cluster_size(text: str) -> int:
    """``4k``, ``1M``, ``65536`` -> bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"invalid parallels cluster_size {text!r}")
    return int(m.group(1)) << _SHIFT[m.group(2).lower()]


def creation_layout(size: int, options: dict[str, str]) -> tuple[int, int]:
    """(virtual size, cluster size) after qemu-img's silent rounding and checks."""
    opts = dict(options)
    text = opts.pop("cluster_size", None)
    if opts:
        raise ConfigError(f"unknown parallels options: {', '.join(sorted(opts))}")
    cluster_size = DEFAULT_CLUSTER_SIZE if text is None else parse_cluster_size(text)
    cluster_size = -(-cluster_size // SECTOR_SIZE) * SECTOR_SIZE
    size = -(-size // SECTOR_SIZE) * SECTOR_SIZE
    if cluster_size == 0:
        raise ConfigError("parallels cluster_size must be at least 512")
    if cluster_size > MAX_CLUSTER_SIZE:
        raise ConfigError(f"parallels cluster_size must be at most {MAX_CLUSTER_SIZE}")
    if size >= (1 << 32) * cluster_size:
        raise ConfigError("image size is too large for this cluster size")
    if -(-size // cluster_size) > MAX_BAT_ENTRIES:
        raise ConfigError(
            f"image size needs more than {MAX_BAT_ENTRIES} clusters; use a larger cluster_size"
        )
    return size, cluster_size


async def create(
    path: str,
    size: int,
    options: dict[str, str],
    backing: str | None = None,
    backing_fmt: str | None = None,
) -> None:
    if backing is not None or backing_fmt is not None:
        raise ConfigError(
            "parallels images cannot name a backing file; give it in the export "
            "settings (backing, backing_format) instead"
        )
    size, cluster_size = creation_layout(size, options)
    header = new_header(size, cluster_size)
    file = FileBackend.open(path, read_only=False, create=True)
    try:
        await file.truncate(0)
        await file.pwrite(0, header.to_bytes())
        await file.truncate(header.data_off * SECTOR_SIZE)
        await file.sync()
    finally:
        await file.aclose()
