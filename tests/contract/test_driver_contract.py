"""One contract, every driver (trio's check_*_stream idea).

Each format that can create images is run through the same checks, alone and
over a raw backing file: read-after-write, zeroing with every flag
combination, block status invariants, persistence across flush and reopen,
aclose semantics, concurrent writers, and checkpoints.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Protocol, cast

import pytest
import trio
import trio.testing

from nbdserve.block import formats
from nbdserve.block.base import Status
from nbdserve.block.chain import Chain, ChainOptions, open_chain
from nbdserve.block.device import BlockDevice
from nbdserve.errors import UnknownFormatError

MiB = 1024 * 1024
SIZE = 4 * MiB
FORMATS = ["raw", "qcow2", "parallels", "fvd"]


class _ImageCreator(Protocol):
    """A format module that can create images (``create_image`` is optional)."""

    def create_image(
        self,
        path: str,
        size: int,
        options: dict[str, str],
        backing: str | None = None,
        backing_fmt: str | None = None,
    ) -> Awaitable[None]: ...


def _available(fmt: str) -> bool:
    try:
        module = formats.load(fmt)
    except UnknownFormatError:
        return False
    return hasattr(module, "create_image")


def _base_pattern(size: int) -> bytes:
    rng = random.Random(99)
    return bytes(rng.getrandbits(8) for _ in range(size // 64)) * 64


# Known failures, tracked until fixed: remove the entry when it passes.
KNOWN_BROKEN: dict[tuple[str, str], str] = {}


@pytest.fixture(autouse=True)
def _known_broken(request: pytest.FixtureRequest) -> None:
    params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
    fmt, with_backing = params.get("image", ("", False))
    key = (f"{fmt}{'-over-raw' if with_backing else ''}", request.node.originalname)
    if key in KNOWN_BROKEN:
        request.node.add_marker(pytest.mark.xfail(reason=KNOWN_BROKEN[key], strict=False))


class Image:
    """An image under test and what its guest should see."""

    def __init__(self, path: Path, fmt: str, model: bytearray) -> None:
        self.path = path
        self.fmt = fmt
        self.model = model

    @asynccontextmanager
    async def open(self, *, read_only: bool = False) -> AsyncIterator[BlockDevice]:
        chain: Chain = await open_chain(
            str(self.path), ChainOptions(fmt=self.fmt, read_only=read_only)
        )
        try:
            yield BlockDevice(chain.top, read_only=read_only)
        finally:
            await chain.aclose()


@pytest.fixture(
    params=[(f, b) for f in FORMATS for b in (False, True)],
    ids=lambda p: f"{p[0]}{'-over-raw' if p[1] else ''}",
)
async def image(request: pytest.FixtureRequest, tmp_path: Path) -> Image:
    fmt, with_backing = request.param
    if not _available(fmt):
        pytest.skip(f"format {fmt} not available")
    module = cast(_ImageCreator, formats.load(fmt))
    path = tmp_path / f"disk.{fmt}"
    model = bytearray(SIZE)
    backing = None
    if with_backing:
        if fmt in ("raw", "parallels"):
            pytest.skip(f"{fmt} images carry no backing reference")
        base = tmp_path / "base.raw"
        data = _base_pattern(SIZE)
        base.write_bytes(data)
        model[:] = data
        backing = str(base)
    await module.create_image(str(path), SIZE, {}, backing, "raw" if backing else None)
    return Image(path, fmt, model)


async def test_fresh_image_reads_as_its_backing_or_zeros(image: Image) -> None:
    async with image.open() as dev:
        assert dev.size == SIZE
        assert await dev.read(0, SIZE) == image.model


async def test_read_after_write_unaligned(image: Image) -> None:
    rng = random.Random(1)
    async with image.open() as dev:
        for _ in range(40):
            off = rng.randrange(0, SIZE - 1)
            n = rng.randrange(1, min(200_000, SIZE - off) + 1)
            data = rng.randbytes(n)
            await dev.write(off, data)
            image.model[off : off + n] = data
            lo = max(0, off - 5000)
            hi = min(SIZE, off + n + 5000)
            assert await dev.read(lo, hi - lo) == image.model[lo:hi]
        assert await dev.read(0, SIZE) == image.model


@pytest.mark.parametrize("may_unmap", [False, True])
@pytest.mark.parametrize("fua", [False, True])
async def test_write_zeroes_reads_zeros(image: Image, may_unmap: bool, fua: bool) -> None:
    rng = random.Random(2)
    async with image.open() as dev:
        await dev.write(0, rng.randbytes(SIZE))
        image.model[:] = await dev.read(0, SIZE)
        for off, n in [(0, 65536), (100_000, 300_000), (MiB, MiB), (SIZE - 513, 513)]:
            await dev.write_zeroes(off, n, may_unmap=may_unmap, fua=fua)
            image.model[off : off + n] = bytes(n)
        assert await dev.read(0, SIZE) == image.model


async def test_block_status_invariants(image: Image) -> None:
    rng = random.Random(3)
    async with image.open() as dev:
        await dev.write(MiB, rng.randbytes(3 * 65536))
        await dev.write_zeroes(2 * MiB, MiB)
        top = dev.top
        for off, n in [(0, SIZE), (MiB + 1, 5), (SIZE - 1, 1), (12345, 2 * MiB)]:
            extents = await top.block_status(off, n)
            assert extents, "at least one extent"
            assert extents[0].offset == off
            for a, b in itertools.pairwise(extents):
                assert a.end == b.offset, "contiguous"
            for e in extents:
                assert e.length > 0
                assert e.end <= SIZE
        # the written range is this layer's data
        written = await top.block_status(MiB, 3 * 65536)
        assert all(e.status & Status.ALLOCATED for e in written)
        chained = await dev.block_status(0, SIZE)
        assert chained[0].offset == 0
        assert sum(e.length for e in chained) <= SIZE


async def test_flush_and_reopen_persist(image: Image) -> None:
    rng = random.Random(4)
    writes = [
        (rng.randrange(0, SIZE - 70_000), rng.randbytes(rng.randrange(1, 70_000)))
        for _ in range(20)
    ]
    async with image.open() as dev:
        for off, data in writes:
            await dev.write(off, data)
            image.model[off : off + len(data)] = data
        await dev.flush()
    async with image.open(read_only=True) as dev:
        assert await dev.read(0, SIZE) == image.model


async def test_aclose_is_idempotent_and_final(image: Image) -> None:
    chain = await open_chain(str(image.path), ChainOptions(fmt=image.fmt))
    top = chain.top
    await chain.aclose()
    await top.aclose()
    with pytest.raises((trio.ClosedResourceError, Exception)):
        await top.readinto(0, memoryview(bytearray(512)))


async def test_concurrent_writers_leave_a_serial_outcome(image: Image) -> None:
    block = 65536
    rng = random.Random(5)
    candidates: dict[int, list[bytes]] = {}
    async with image.open() as dev:

        async def writer(off: int, data: bytes) -> None:
            await dev.write(off, data)

        async with trio.open_nursery() as nursery:
            for i in range(48):
                off = (i % 12) * block + (SIZE // 2 if i % 2 else 0)
                data = bytes([rng.randrange(1, 256)]) * block
                candidates.setdefault(off, []).append(data)
                nursery.start_soon(writer, off, data)
        for off, options in candidates.items():
            got = await dev.read(off, block)
            assert got in options, f"block at {off} is a mix of concurrent writes"


async def test_async_methods_checkpoint(image: Image) -> None:
    async with image.open() as dev:
        top = dev.top
        buf = memoryview(bytearray(4096))
        with trio.testing.assert_checkpoints():
            await top.readinto(0, buf)
        with trio.testing.assert_checkpoints():
            await top.write(0, b"x" * 4096)
        with trio.testing.assert_checkpoints():
            await top.flush()
        with trio.testing.assert_checkpoints():
            await top.block_status(0, SIZE)
