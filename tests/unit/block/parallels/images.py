"""Test helpers for parallels images: open a driver, build images by hand."""

from __future__ import annotations

import random
import struct
from collections.abc import Mapping
from pathlib import Path

from construct import Bytes, Const, Int32ul, Int64ul, Struct

from nbdserve.block.file import FileBackend
from nbdserve.block.formats import OpenOptions
from nbdserve.block.parallels import ParallelsDriver, create_image, open_image

HEADER = Struct(
    "magic" / Bytes(16),
    "version" / Const(2, Int32ul),
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


async def new_image(path: Path, size: int, cluster_size: int = 64 * 1024) -> Path:
    await create_image(str(path), size, {"cluster_size": str(cluster_size)})
    return path


async def open_driver(
    path: Path, *, read_only: bool = False, settings: Mapping[str, object] | None = None
) -> ParallelsDriver:
    file = FileBackend.open(str(path), read_only=read_only)
    try:
        return await open_image(file, OpenOptions(read_only, dict(settings or {})))
    except BaseException:
        await file.aclose()
        raise


def header_fields(path: Path) -> dict[str, int]:
    c = HEADER.parse(path.read_bytes()[:64])
    return {k: v for k, v in c.items() if not k.startswith("_") and k != "magic"}


def patch_header(path: Path, **fields: int) -> None:
    raw = path.read_bytes()
    c = HEADER.parse(raw[:64])
    for k, v in fields.items():
        c[k] = v
    with path.open("r+b") as f:
        f.write(HEADER.build(c))


def patch_bat(path: Path, index: int, value: int) -> None:
    with path.open("r+b") as f:
        f.seek(64 + 4 * index)
        f.write(struct.pack("<I", value))


def read_bat(path: Path, index: int) -> int:
    with path.open("rb") as f:
        f.seek(64 + 4 * index)
        return int(struct.unpack("<I", f.read(4))[0])


def build_old_magic_image(
    path: Path,
    *,
    tracks: int = 63,
    clusters: int = 40,
    allocated: int = 12,
    seed: int = 7,
    data_off_zero: bool = True,
) -> bytes:
    """A "WithoutFreeSpace" image (BAT in sectors), clusters shuffled on the host.

    Returns the guest content the image must read as.
    """
    rng = random.Random(seed)
    cs = tracks * 512
    size = clusters * cs
    bat_end = 64 + 4 * clusters
    data_start = -(-bat_end // 512) * 512
    chosen = rng.sample(range(clusters), allocated)
    host_order = list(chosen)
    rng.shuffle(host_order)
    bat = [0] * clusters
    guest = bytearray(size)
    body = bytearray()
    for slot, index in enumerate(host_order):
        data = rng.randbytes(cs)
        bat[index] = (data_start + slot * cs) // 512
        guest[index * cs : (index + 1) * cs] = data
        body += data
    header = HEADER.build(
        {
            "magic": b"WithoutFreeSpace",
            "heads": 16,
            "cylinders": size // 512 // 16 // 32,
            "tracks": tracks,
            "bat_entries": clusters,
            # the high half must be ignored for the old magic
            "nb_sectors": (size // 512) | (0xDEAD << 32),
            "inuse": 0,
            "data_off": 0 if data_off_zero else data_start // 512,
            "flags": 0,
            "ext_off": 0,
        }
    )
    table = struct.pack(f"<{clusters}I", *bat)
    pad = bytes(data_start - bat_end)
    path.write_bytes(header + table + pad + bytes(body))
    return bytes(guest)
