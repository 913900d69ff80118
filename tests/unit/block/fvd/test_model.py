"""Hypothesis model test: random operations against an FVD image over a base.

After every step the whole guest-visible disk is compared with an in-memory
model (a bytearray plus a mask of bytes left unspecified by discard).
Variations: compact on/off, data_file, copy-on-read on/off, prefetch running
concurrently, block sizes 4 KiB and 64 KiB; ``reopen`` closes the image
gracefully and opens it again.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdserve.block.chain import Chain
from nbdserve.block.device import BlockDevice

from .helpers import KIB, make_base, make_image, open_image

DISK = 1024 * KIB
BASE = 768 * KIB + 512

VARIANTS = {
    "plain-64k-cor": {"block_size": "64k", "copy_on_read": "on"},
    "compact-4k": {"compact": "on", "chunk_size": "64k", "block_size": "4k", "copy_on_read": "off"},
    "compact-data_file-64k-cor-prefetch": {
        "compact": "on",
        "chunk_size": "128k",
        "block_size": "64k",
        "data_file": "data.raw",
        "prefetch_start_delay": "0",
        "bytes_per_prefetch": "128k",
    },
    "data_file-4k-prefetch": {
        "block_size": "4k",
        "data_file": "data.raw",
        "copy_on_read": "off",
        "prefetch_start_delay": "0",
        "bytes_per_prefetch": "64k",
    },
    "compact-64k-cor-small-journal": {
        "compact": "on",
        "chunk_size": "64k",
        "block_size": "64k",
        "journal_size": "1k",
    },
}


def offsets() -> st.SearchStrategy[int]:
    aligned = st.integers(0, DISK // 4096 - 1).map(lambda i: i * 4096)
    near = st.tuples(st.integers(1, DISK // 4096 - 1), st.integers(-600, 600)).map(
        lambda t: max(0, min(DISK - 1, t[0] * 4096 + t[1]))
    )
    anywhere = st.integers(0, DISK - 1)
    return st.one_of(aligned, near, anywhere)


def ops() -> st.SearchStrategy[tuple[object, ...]]:
    length = st.one_of(st.integers(1, 9000), st.integers(1, 200 * KIB))
    write = st.tuples(st.just("write"), offsets(), length, st.integers(0, 255))
    zero = st.tuples(st.just("zero"), offsets(), length, st.booleans())
    discard = st.tuples(st.just("discard"), offsets(), length)
    read = st.tuples(st.just("read"), offsets(), length)
    return st.one_of(
        write, write, write, zero, discard, read, st.just(("flush",)), st.just(("reopen",))
    )


class Model:
    def __init__(self, base: bytes) -> None:
        self.data = bytearray(base) + bytearray(DISK - len(base))
        self.known = np.ones(DISK, dtype=np.bool_)

    def write(self, off: int, data: bytes) -> None:
        self.data[off : off + len(data)] = data
        self.known[off : off + len(data)] = True

    def discard(self, off: int, n: int) -> None:
        self.known[off : off + n] = False

    def check(self, got: bytes) -> None:
        a = np.frombuffer(got, dtype=np.uint8)
        b = np.frombuffer(bytes(self.data), dtype=np.uint8)
        bad = np.flatnonzero((a != b) & self.known)
        assert bad.size == 0, f"first difference at {int(bad[0])}"


@contextlib.asynccontextmanager
async def opened(img: Path) -> AsyncIterator[tuple[Chain, BlockDevice]]:
    chain, dev = await open_image(img)
    try:
        async with trio.open_nursery() as bg:
            await bg.start(chain.top.run_background)
            yield chain, dev
            bg.cancel_scope.cancel()
    finally:
        await chain.aclose()


async def run_ops(variant: dict[str, str], steps: list[tuple[object, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        base = make_base(d / "base.raw", BASE, seed=len(steps))
        await make_image(d / "img.fvd", DISK, "base.raw", **variant)
        model = Model(base)
        img = d / "img.fvd"
        stack = contextlib.AsyncExitStack()
        async with stack:
            chain, dev = await stack.enter_async_context(opened(img))
            for step in steps:
                kind = step[0]
                if kind == "reopen":
                    await stack.aclose()
                    chain, dev = await stack.enter_async_context(opened(img))
                elif kind == "flush":
                    await dev.flush()
                else:
                    off = int(step[1])  # type: ignore[call-overload]
                    n = min(int(step[2]), DISK - off)  # type: ignore[call-overload]
                    if kind == "write":
                        data = bytes([int(step[3]) or 1]) * n  # type: ignore[call-overload]
                        await dev.write(off, data)
                        model.write(off, data)
                    elif kind == "zero":
                        await dev.write_zeroes(off, n, may_unmap=bool(step[3]))
                        model.write(off, bytes(n))
                    elif kind == "discard":
                        await dev.discard(off, n)
                        model.discard(off, n)
                    else:
                        got = await dev.read(off, n)
                        expect = Model.__new__(Model)
                        expect.data = model.data[off : off + n]
                        expect.known = model.known[off : off + n]
                        expect.check(got)
                # let background copies interleave with the next step
                await trio.lowlevel.checkpoint()
                model.check(await dev.read(0, DISK))
        # the closed image is consistent and still reads the same
        from nbdserve.block.fvd.check import check_fvd

        report = await check_fvd(str(img), None)
        assert report.exit_status() == 0, report.messages
        chain, dev = await open_image(img, read_only=True)
        try:
            model.check(await dev.read(0, DISK))
        finally:
            await chain.aclose()


@pytest.mark.parametrize("name", list(VARIANTS))
@settings(max_examples=12)
@given(steps=st.lists(ops(), min_size=1, max_size=25))
async def test_fvd_matches_model(name: str, steps: list[tuple[object, ...]]) -> None:
    await run_ops(VARIANTS[name], steps)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
@settings(max_examples=300)
@given(steps=st.lists(ops(), min_size=1, max_size=60))
async def test_fvd_matches_model_soak(name: str, steps: list[tuple[object, ...]]) -> None:
    await run_ops(VARIANTS[name], steps)
