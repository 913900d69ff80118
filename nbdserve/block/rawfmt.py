"""Registry glue for the raw format (the driver lives in ``raw.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from nbdserve.block.raw import RawDriver

if TYPE_CHECKING:
    from nbdserve.block.file import FileBackend
    from nbdserve.block.formats import OpenOptions


def probe(header: bytes) -> bool:
    return False  # raw has no magic; it is the fallback


async def open_image(file: FileBackend, options: OpenOptions) -> RawDriver:
    await trio.lowlevel.checkpoint()
    offset = int(str(options.settings.get("offset", 0)))
    size = options.settings.get("size")
    return RawDriver(
        file,
        read_only=options.read_only,
        window_offset=offset,
        window_size=None if size is None else int(str(size)),
        probed=options.probed,
    )


async def create_image(
    path: str,
    size: int,
    options: dict[str, str],
    backing: str | None = None,
    backing_fmt: str | None = None,
) -> None:
    """A raw image: a file of ``size`` bytes (sparse unless preallocated)."""
    from nbdserve.block.file import FileBackend
    from nbdserve.errors import ConfigError

    if backing is not None:
        raise ConfigError("raw images cannot have a backing file")
    prealloc = options.pop("preallocation", "off")
    if options:
        raise ConfigError(f"unknown raw options: {', '.join(sorted(options))}")
    if prealloc not in ("off", "falloc", "full"):
        raise ConfigError(f"preallocation must be off, falloc or full, not {prealloc!r}")
    file = FileBackend.open(path, read_only=False, create=True)
    try:
        await file.truncate(0)
        await file.truncate(size)
        if prealloc == "falloc" and size:
            await file.preallocate(0, size)
        elif prealloc == "full":
            chunk = memoryview(bytes(1 << 20))
            for pos in range(0, size, len(chunk)):
                await file.pwrite(pos, chunk[: min(len(chunk), size - pos)])
        await file.sync()
    finally:
        await file.aclose()
