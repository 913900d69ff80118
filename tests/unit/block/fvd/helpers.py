"""Shared helpers for FVD tests: bases, images, opening a chain."""

from __future__ import annotations

import random
from pathlib import Path

from nbdserve.block.chain import Chain, ChainOptions, open_chain
from nbdserve.block.device import BlockDevice
from nbdserve.block.fvd import create_image

KIB = 1024
MIB = 1024 * 1024


def make_base(
    path: Path, size: int, seed: int = 1, zero_ranges: tuple[tuple[int, int], ...] = ()
) -> bytes:
    """A raw base with random content and some all-zero ranges."""
    data = bytearray(random.Random(seed).randbytes(size))
    for lo, hi in zero_ranges:
        data[lo:hi] = bytes(hi - lo)
    path.write_bytes(data)
    return bytes(data)


async def make_image(
    path: Path,
    size: int | None,
    base: Path | str | None = None,
    *,
    base_fmt: str | None = "raw",
    **options: str,
) -> None:
    if size is None:
        assert base is not None
        size = Path(base).stat().st_size if not str(base).startswith("nbd") else 0
    await create_image(
        str(path),
        size,
        dict(options),
        None if base is None else str(base),
        base_fmt if base is not None else None,
    )


async def open_image(
    path: Path, *, read_only: bool = False, **settings: object
) -> tuple[Chain, BlockDevice]:
    chain = await open_chain(str(path), ChainOptions(read_only=read_only, settings=dict(settings)))
    return chain, BlockDevice(chain.top, read_only=read_only)


async def crash(chain: Chain) -> None:
    """Drop every layer as a killed process would: no flush, no clean close.

    Data already written with pwrite stays (it is in the page cache); only
    what the driver held in memory is lost.
    """
    from nbdserve.block.fvd import FvdDriver

    for layer in chain.layers:
        layer._closed = True
        if isinstance(layer, FvdDriver) and layer._store is not layer.file:
            await layer._store.aclose()
        if layer.file is not None:
            await layer.file.aclose()
