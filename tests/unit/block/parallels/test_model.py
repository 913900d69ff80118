"""Hypothesis model test: the driver against a bytearray, across flush and reopen."""

from __future__ import annotations

import random
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from hypothesis import given
from hypothesis import strategies as st

from nbdserve.block.chain import ChainOptions, open_chain
from nbdserve.block.check import EXIT_CLEAN
from nbdserve.block.device import BlockDevice
from nbdserve.block.parallels import check_image
from tests.unit.block.parallels.images import header_fields, new_image, open_driver

CS = 4096
CLUSTERS = 24
SIZE = CLUSTERS * CS - 1024  # a short last cluster


def offsets() -> st.SearchStrategy[int]:
    near_boundary = st.builds(
        lambda c, d: min(max(c * CS + d, 0), SIZE - 1),
        st.integers(0, CLUSTERS),
        st.integers(-3, 3),
    )
    return st.one_of(near_boundary, st.integers(0, SIZE - 1))


@st.composite
def operation(draw: st.DrawFn) -> tuple[str, int, int, int]:
    kind = draw(st.sampled_from(["write", "write", "write", "zero", "discard", "flush", "reopen"]))
    offset = draw(offsets())
    length = draw(st.integers(1, min(3 * CS + 17, SIZE - offset)))
    return kind, offset, length, draw(st.integers(1, 255))


def whole_clusters(offset: int, end: int) -> tuple[int, int]:
    first = -(-offset // CS)
    stop = end // CS if end < SIZE else -(-end // CS)
    return first * CS, min(max(stop, first) * CS, SIZE)


async def open_device(
    path: Path, settings: dict[str, object]
) -> tuple[BlockDevice, Callable[[], Awaitable[None]]]:
    """The device and what closes it (the whole chain, backing included)."""
    if "backing" not in settings:
        dev = BlockDevice(await open_driver(path, settings=settings))
        return dev, dev.aclose
    chain = await open_chain(str(path), ChainOptions(fmt="parallels", settings=settings))
    return BlockDevice(chain.top), chain.aclose


@given(
    st.lists(operation(), min_size=1, max_size=25),
    st.sampled_from(["falloc", "truncate", "off"]),
    st.booleans(),
)
async def test_driver_matches_model(
    ops: list[tuple[str, int, int, int]], mode: str, with_backing: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = await new_image(Path(tmp) / "m.img", SIZE, CS)
        settings: dict[str, object] = {"prealloc_mode": mode, "prealloc_size": 3 * CS}
        model = bytearray(SIZE)
        if with_backing:
            base = random.Random(len(ops)).randbytes(SIZE - 3000)  # shorter than the overlay
            (Path(tmp) / "base.raw").write_bytes(base)
            model[: len(base)] = base
            settings.update(backing="base.raw", backing_format="raw")
        dev, close = await open_device(path, settings)
        try:
            for kind, offset, length, byte in ops:
                end = offset + length
                if kind == "write":
                    await dev.write(offset, bytes([byte]) * length)
                    model[offset:end] = bytes([byte]) * length
                elif kind == "zero":
                    await dev.write_zeroes(offset, length, may_unmap=byte % 2 == 0)
                    model[offset:end] = bytes(length)
                elif kind == "discard":
                    await dev.discard(offset, length)
                    if not with_backing:  # with one, discard does nothing (as QEMU)
                        lo, hi = whole_clusters(offset, end)
                        model[lo:hi] = bytes(max(0, hi - lo))  # whole clusters dropped
                elif kind == "flush":
                    await dev.flush()
                else:
                    await close()
                    assert header_fields(path)["inuse"] == 0
                    report = await check_image(str(path), None)
                    assert report.exit_status() == EXIT_CLEAN, report.messages
                    dev, close = await open_device(path, settings)
                assert await dev.read(offset, length) == model[offset:end]
            assert await dev.read(0, SIZE) == model
        finally:
            await close()
        report = await check_image(str(path), None)
        assert report.exit_status() == EXIT_CLEAN, report.messages
        dev = BlockDevice(await open_driver(path, read_only=True))
        if not with_backing:
            assert await dev.read(0, SIZE) == model
        await dev.aclose()
        await trio.lowlevel.checkpoint()
