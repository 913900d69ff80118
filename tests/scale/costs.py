"""Build sparse images of any virtual size and measure what serving them costs.

Costs are counted, not timed: bytes read from image files, traced memory
(tracemalloc sees numpy arrays), block-status calls, and the drivers' own work
counters (``statistics().extra``).  Tests compare them at two virtual sizes;
``tests/bench/scale.py`` uses the same builders for its timed cost curve.

Images are made the way users make them: ``qemu-img create`` + ``qemu-io``
writes for qcow2 and parallels, ``nbdserve img create -f fvd -o compact=on``
over a qcow2 base for FVD (with some data written into the overlay through
the driver, so its table and bitmap are not empty).
"""

from __future__ import annotations

import contextlib
import gc
import sys
import tracemalloc
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from nbdserve.block.base import ChainExtent
from nbdserve.block.chain import Chain, ChainOptions, open_chain
from nbdserve.block.device import BlockDevice
from nbdserve.block.file import FileBackend

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

Pieces = Sequence[tuple[int, int]]  # (guest offset, length) of written data


def spread(size: int, count: int, piece: int) -> list[tuple[int, int]]:
    """``count`` pieces of ``piece`` bytes spread evenly over ``[0, size)``,
    piece-aligned, with a little deterministic jitter."""
    step = size // count
    out = []
    for i in range(count):
        jitter = (i * 7919) % max(1, step // piece // 2) * piece
        out.append(((i * step + jitter) // piece * piece, piece))
    return out


def packed(count: int, piece: int, stride: int = 8 * MiB) -> list[tuple[int, int]]:
    """``count`` pieces within the first GiB: the same data at any virtual size."""
    return [(i * stride, piece) for i in range(count)]


async def run_tool(*argv: str | Path, stdin: bytes = b"") -> None:
    result = await trio.run_process(
        [str(a) for a in argv], stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
    )
    if result.returncode:
        raise AssertionError(f"{argv[0]} failed: {result.stderr.decode(errors='replace')}")


async def qemu_io_write(path: Path, fmt: str, pieces: Pieces) -> None:
    """Write each piece with a distinct pattern byte (one qemu-io process)."""
    cmds = "".join(f"write -q -P {i % 250 + 1} {off} {n}\n" for i, (off, n) in enumerate(pieces))
    await run_tool("qemu-io", "-f", fmt, path, stdin=cmds.encode())


async def make_qcow2(path: Path, size: int, pieces: Pieces, *, backing: Path | None = None) -> Path:
    args: list[str | Path] = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", backing.name, "-F", "qcow2"]
    await run_tool(*args, path, str(size))
    if pieces:
        await qemu_io_write(path, "qcow2", pieces)
    return path


async def make_parallels(path: Path, size: int, pieces: Pieces) -> Path:
    await run_tool(
        "qemu-img", "create", "-q", "-f", "parallels", "-o", "cluster_size=1M", path, str(size)
    )
    if pieces:
        await qemu_io_write(path, "parallels", pieces)
    return path


async def make_fvd(path: Path, size: int, base_pieces: Pieces, overlay_pieces: Pieces) -> Path:
    """A compact FVD over a qcow2 base of the same size."""
    base = await make_qcow2(path.with_name(path.stem + "-base.qcow2"), size, base_pieces)
    await run_tool(
        sys.executable, "-m", "nbdserve", "img", "create", "-q", "-f", "fvd",
        "-o", "compact=on", "-b", base.name, "-F", "qcow2", path,
    )  # fmt: skip
    if overlay_pieces:
        chain = await open_chain(str(path), ChainOptions())
        try:
            dev = BlockDevice(chain.top)
            for i, (off, n) in enumerate(overlay_pieces):
                await dev.write(off, bytes([i % 250 + 1]) * n)
            await dev.flush()
        finally:
            await chain.aclose()
    return path


async def make_image(fmt: str, path: Path, size: int, pieces: Pieces) -> Path:
    """The benchmark's images: all data in the image itself (FVD: half in the base)."""
    if fmt == "qcow2":
        return await make_qcow2(path, size, pieces)
    if fmt == "parallels":
        return await make_parallels(path, size, pieces)
    if fmt == "fvd":
        return await make_fvd(path, size, pieces[0::2], pieces[1::2])
    raise ValueError(fmt)


# ---- counting -------------------------------------------------------------------------


@dataclass
class ReadCounter:
    bytes: int = 0
    calls: int = 0


@contextlib.contextmanager
def counting_reads() -> Iterator[ReadCounter]:
    """Count bytes read through FileBackend's async path (metadata and data that
    missed the inline path) while the block is active."""
    counter = ReadCounter()
    original = FileBackend.pread_into

    async def pread_into(self: FileBackend, offset: int, buf: memoryview) -> None:
        counter.bytes += len(buf)
        counter.calls += 1
        await original(self, offset, buf)

    FileBackend.pread_into = pread_into  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        FileBackend.pread_into = original  # type: ignore[method-assign]


def traced_now() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


@contextlib.contextmanager
def tracing() -> Iterator[None]:
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        yield
    finally:
        if started:
            tracemalloc.stop()


@dataclass
class Costs:
    """What opening an image and mapping all of it cost."""

    open_bytes: int = 0  # bytes read from image files by open
    open_memory: int = 0  # traced bytes still held after open
    map_calls: int = 0  # BlockDevice.block_status calls to cover the disk
    map_bytes: int = 0  # bytes read while mapping (metadata loads)
    map_memory: int = 0  # traced bytes held after the map (bounded caches)
    extents: list[ChainExtent] = field(default_factory=list)
    layers: list[dict[str, int]] = field(default_factory=list)  # statistics().extra per layer

    def work(self, key: str) -> int:
        """A driver counter summed over the chain's layers."""
        return sum(layer.get(key, 0) for layer in self.layers)


@contextlib.asynccontextmanager
async def opened(path: Path, *, read_only: bool = True) -> AsyncIterator[Chain]:
    chain = await open_chain(str(path), ChainOptions(read_only=read_only))
    try:
        yield chain
    finally:
        await chain.aclose()


async def map_all(device: BlockDevice) -> tuple[int, list[ChainExtent]]:
    """Whole-disk block status with requests as long as the device allows."""
    calls, pos, out = 0, 0, []
    while pos < device.size:
        got = await device.block_status(pos, device.size - pos)
        calls += 1
        out.extend(got)
        pos = got[-1].end
    return calls, out


async def measure(path: Path) -> Costs:
    """Open ``path`` read-only, map the whole disk, and count what it cost."""
    costs = Costs()
    with tracing():
        before = traced_now()
        with counting_reads() as reads:
            chain = await open_chain(str(path), ChainOptions(read_only=True))
        try:
            costs.open_bytes = reads.bytes
            costs.open_memory = traced_now() - before
            device = BlockDevice(chain.top, read_only=True)
            with counting_reads() as reads:
                costs.map_calls, costs.extents = await map_all(device)
            costs.map_bytes = reads.bytes
            costs.map_memory = traced_now() - before
            costs.layers = [dict(layer.statistics().extra) for layer in chain.layers]
        finally:
            await chain.aclose()
    return costs


def data_extents(extents: Sequence[ChainExtent]) -> list[tuple[int, int]]:
    """(offset, length) of the extents holding data, merged."""
    out: list[tuple[int, int]] = []
    for e in extents:
        if not e.data or e.zero:
            continue
        if out and out[-1][0] + out[-1][1] == e.offset:
            out[-1] = (out[-1][0], out[-1][1] + e.length)
        else:
            out.append((e.offset, e.length))
    return out
