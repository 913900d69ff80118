"""RawDriver over a real FileBackend: data, zeroing, trim, block status, durability.

Durability is observed at the system call: ``os.fdatasync`` is wrapped with a
counter (the real call still runs), so a FUA write or flush that forgot to
sync fails here.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from nbdserve.block.base import Extent, Status
from nbdserve.block.device import BlockDevice
from nbdserve.block.file import FileBackend
from nbdserve.block.raw import RawDriver

KiB = 1024
MiB = 1024 * KiB
DATA = Status.ALLOCATED | Status.DATA
HOLE = Status.ALLOCATED | Status.ZERO


class SyncCounter:
    """Counts fdatasync calls on one file descriptor, passing them through."""

    def __init__(self, real: Callable[[int], None], fd: int) -> None:
        self.real = real
        self.fd = fd
        self.calls = 0

    def __call__(self, fd: int) -> None:
        if fd == self.fd:
            self.calls += 1
        self.real(fd)


def _sparse_file(path: Path, size: int, data_runs: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in data_runs:
            f.seek(offset)
            f.write(data)


@pytest.fixture
async def raw(tmp_path: Path) -> AsyncIterator[RawDriver]:
    """A 4 MiB raw disk: 0xAA in [1 MiB, 2 MiB), a hole everywhere else."""
    path = tmp_path / "disk.raw"
    _sparse_file(path, 4 * MiB, [(MiB, b"\xaa" * MiB)])
    driver = RawDriver(FileBackend.open(str(path), read_only=False), read_only=False)
    try:
        yield driver
    finally:
        await driver.aclose()


@pytest.fixture
def syncs(raw: RawDriver, monkeypatch: pytest.MonkeyPatch) -> SyncCounter:
    assert raw.file is not None
    counter = SyncCounter(os.fdatasync, raw.file.fd)
    monkeypatch.setattr(os, "fdatasync", counter)
    return counter


async def _read(driver: RawDriver, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await driver.readinto(offset, memoryview(buf))
    return bytes(buf)


def _allocated_bytes(driver: RawDriver) -> int:
    assert driver.file is not None
    return os.fstat(driver.file.fd).st_blocks * 512


async def test_read_returns_file_bytes_and_zeros_in_holes(raw: RawDriver) -> None:
    assert raw.size == 4 * MiB
    assert await _read(raw, MiB - 4, 8) == bytes(4) + b"\xaa" * 4
    assert await _read(raw, 3 * MiB, 64 * KiB) == bytes(64 * KiB)


async def test_write_lands_in_the_file(raw: RawDriver, tmp_path: Path) -> None:
    await raw.write(5, b"hello")
    await raw.write(3 * MiB, b"\x01" * (300 * KiB))  # above the inline limit: a thread
    assert await _read(raw, 0, 12) == bytes(5) + b"hello" + bytes(2)
    on_disk = (tmp_path / "disk.raw").read_bytes()
    assert on_disk[5:10] == b"hello"
    assert on_disk[3 * MiB : 3 * MiB + 300 * KiB] == b"\x01" * (300 * KiB)
    assert len(on_disk) == 4 * MiB


@pytest.mark.parametrize("may_unmap", [False, True])
async def test_write_zeroes(raw: RawDriver, may_unmap: bool) -> None:
    before = _allocated_bytes(raw)
    await raw.write_zeroes(MiB + 64 * KiB, 256 * KiB, may_unmap=may_unmap)
    assert await _read(raw, MiB, 512 * KiB) == (
        b"\xaa" * (64 * KiB) + bytes(256 * KiB) + b"\xaa" * (192 * KiB)
    )
    after = _allocated_bytes(raw)
    if may_unmap:
        # a hole was punched: the host space is given back, SEEK_DATA sees it
        assert after == before - 256 * KiB
        statuses = await raw.block_status(MiB, MiB)
        assert Extent(MiB + 64 * KiB, 256 * KiB, HOLE) in statuses
    else:
        # NO_HOLE: zeroed in place, the space stays allocated
        assert after == before


async def test_trim_punches_a_hole(raw: RawDriver) -> None:
    before = _allocated_bytes(raw)
    await raw.discard(MiB, 512 * KiB)
    assert _allocated_bytes(raw) == before - 512 * KiB
    assert await _read(raw, MiB, 512 * KiB) == bytes(512 * KiB)
    assert list(await raw.block_status(0, 4 * MiB)) == [
        Extent(0, MiB + 512 * KiB, HOLE),
        Extent(MiB + 512 * KiB, 512 * KiB, DATA),
        Extent(2 * MiB, 2 * MiB, HOLE),
    ]


async def test_block_status_follows_seek_data(raw: RawDriver) -> None:
    expected = [Extent(0, MiB, HOLE), Extent(MiB, MiB, DATA), Extent(2 * MiB, 2 * MiB, HOLE)]
    assert list(await raw.block_status(0, 4 * MiB)) == expected
    assert raw.try_block_status(0, 4 * MiB) == expected  # the inline answer agrees
    # a query starting inside an extent is cut at the query's edges
    assert list(await raw.block_status(MiB + 4 * KiB, 8 * KiB)) == [
        Extent(MiB + 4 * KiB, 8 * KiB, DATA)
    ]
    await raw.write(3 * MiB, b"\x02" * (64 * KiB))
    assert list(await raw.block_status(2 * MiB, 2 * MiB)) == [
        Extent(2 * MiB, MiB, HOLE),
        Extent(3 * MiB, 64 * KiB, DATA),
        Extent(3 * MiB + 64 * KiB, MiB - 64 * KiB, HOLE),
    ]


async def test_flush_syncs(raw: RawDriver, syncs: SyncCounter) -> None:
    await raw.write(0, b"x" * 4096)
    assert syncs.calls == 0  # a plain write is not made durable by itself
    await raw.flush()
    assert syncs.calls == 1


async def test_fua_write_syncs_before_returning(raw: RawDriver, syncs: SyncCounter) -> None:
    assert not raw.try_write(0, b"y" * 512, fua=True)  # FUA never takes the inline path
    await raw.write(0, b"y" * 512, fua=True)
    assert syncs.calls == 1
    await raw.write(4096, b"z" * 512)
    assert syncs.calls == 1


@pytest.mark.parametrize("may_unmap", [False, True])
async def test_fua_write_zeroes_syncs(raw: RawDriver, syncs: SyncCounter, may_unmap: bool) -> None:
    await raw.write_zeroes(MiB, 64 * KiB, may_unmap=may_unmap, fua=False)
    assert syncs.calls == 0
    await raw.write_zeroes(MiB, 64 * KiB, may_unmap=may_unmap, fua=True)
    assert syncs.calls == 1


async def test_window_maps_guest_offsets_into_the_file(tmp_path: Path) -> None:
    path = tmp_path / "w.raw"
    _sparse_file(path, 2 * MiB, [(MiB, b"\x07" * 4096)])
    file = FileBackend.open(str(path), read_only=False)
    driver = RawDriver(file, read_only=False, window_offset=MiB - 4096, window_size=MiB)
    try:
        assert driver.size == MiB
        assert await _read(driver, 4096, 4) == b"\x07" * 4
        assert list(await driver.block_status(0, 3 * 4096)) == [
            Extent(0, 4096, HOLE),
            Extent(4096, 4096, DATA),
            Extent(2 * 4096, 4096, HOLE),
        ]
    finally:
        await driver.aclose()


async def test_read_only_file_makes_a_read_only_driver(tmp_path: Path) -> None:
    path = tmp_path / "ro.raw"
    path.write_bytes(b"\x05" * 8192)
    driver = RawDriver(FileBackend.open(str(path), read_only=True), read_only=False)
    try:
        assert driver.read_only
        assert not driver.caps.writable
        assert not driver.caps.discard
        # writes never reach it: BlockDevice refuses them (the driver contract)
        assert await _read(driver, 0, 4) == b"\x05" * 4
    finally:
        await driver.aclose()


# ---- the server's inline write path ----------------------------------------

QCOW2_MAGIC = b"QFI\xfb"


async def test_inline_writer_lands_in_the_file_through_a_window(tmp_path: Path) -> None:
    path = tmp_path / "w.raw"
    _sparse_file(path, 2 * MiB, [])
    file = FileBackend.open(str(path), read_only=False)
    for base in (0, 64 * KiB):
        driver = RawDriver(file, read_only=False, window_offset=base, window_size=MiB)
        write = BlockDevice(driver).inline_writer(32 * MiB)
        assert write is not None
        assert write(4096, b"\x11" * 4096)
        with open(path, "rb") as f:
            f.seek(base + 4096)
            assert f.read(4096) == b"\x11" * 4096, base
    os.close(file.fd)


async def test_inline_writer_keeps_the_probed_header_guard(tmp_path: Path) -> None:
    """A raw image whose format was guessed must not be turned into a qcow2 by
    a guest's write, not even on the per-request inline path."""
    path = tmp_path / "probed.raw"
    _sparse_file(path, MiB, [])
    driver = RawDriver(FileBackend.open(str(path), read_only=False), read_only=False, probed=True)
    try:
        write = BlockDevice(driver).inline_writer(32 * MiB)
        assert write is not None
        assert not write(0, QCOW2_MAGIC + bytes(4092)), "declined: the async path checks it"
        assert path.read_bytes()[:4] == bytes(4)
        assert write(64 * KiB, b"\x22" * 4096), "past the probed header it writes inline"
        assert path.read_bytes()[64 * KiB : 68 * KiB] == b"\x22" * 4096
    finally:
        await driver.aclose()


async def test_no_inline_writer_where_writes_must_not_be_inline(tmp_path: Path) -> None:
    path = tmp_path / "ro.raw"
    _sparse_file(path, MiB, [])
    driver = RawDriver(FileBackend.open(str(path), read_only=False), read_only=False)
    try:
        assert BlockDevice(driver, read_only=True).inline_writer(4096) is None
        assert BlockDevice(driver).inline_writer(driver.limits.max_transfer + 1) is None
    finally:
        await driver.aclose()
