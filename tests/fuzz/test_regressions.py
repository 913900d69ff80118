"""Regression tests for fuzz findings that a corpus entry alone does not pin down.

The image-level findings are corpus entries (tests/fuzz/corpus/*/regress-*.json,
replayed by test_corpus.py with their expected outcome); this file holds the
FileBackend contract they exposed and effects an outcome cannot show (how
far a file grows).
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from nbdserve.block.file import FileBackend
from nbdserve.block.parallels import check_image as parallels_check
from nbdserve.errors import HostIOError, InvalidImageError
from tests.fuzz.layouts import fvd_layout, parallels_layout
from tests.unit.block.fvd.helpers import make_image, open_image
from tests.unit.block.parallels.images import new_image, open_driver

HUGE = [1 << 63, (1 << 64) - 512, (1 << 63) - 256]  # the last: offset fits, end does not


@pytest.mark.parametrize("offset", HUGE)
async def test_read_at_an_offset_no_file_can_have_is_a_block_error(
    tmp_path: Path, offset: int
) -> None:
    """An image table entry of 2**63 or more used to reach os.preadv: OverflowError."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    f = FileBackend.open(str(path), read_only=True)
    try:
        with pytest.raises(HostIOError) as info:
            await f.pread(offset, 512)
        assert info.value.host_errno == errno.EINVAL
        with pytest.raises(HostIOError):
            f.try_pread_into(offset, memoryview(bytearray(512)))
        assert f.all_data(offset, 512) is False
        assert await f.pread(0, 4) == b"xxxx"  # the file still works
    finally:
        await f.aclose()


@pytest.mark.parametrize("offset", HUGE)
async def test_write_at_an_offset_no_file_can_have_is_a_block_error(
    tmp_path: Path, offset: int
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"")
    f = FileBackend.open(str(path), read_only=False)
    try:
        with pytest.raises(HostIOError):
            await f.pwrite(offset, b"y" * 512)  # inline (small) path
        with pytest.raises(HostIOError):
            await f.pwrite(offset, bytes(1 << 20))  # threaded (large) path
        assert f.size == 0
    finally:
        await f.aclose()


async def test_truncate_to_a_size_no_file_can_have_is_a_block_error(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"z" * 100)
    f = FileBackend.open(str(path), read_only=False)
    try:
        for size in (1 << 63, -1):
            with pytest.raises(HostIOError):
                await f.truncate(size)
        assert path.stat().st_size == 100
    finally:
        await f.aclose()


async def test_fvd_storage_grow_unit_from_the_image_does_not_size_the_file(tmp_path: Path) -> None:
    """atheris finding: storage_grow_unit ~2**64 reached ftruncate (OverflowError); one of
    2**40 grew the file to a sparse TiB.  Growth now stops at the largest store the
    table can address."""
    path = tmp_path / "c.fvd"
    size, chunk = 1 << 20, 64 * 1024
    await make_image(path, size, compact="on", chunk_size="64k", journal_size="4k")
    field = fvd_layout(path.read_bytes()).fields["storage_grow_unit"]
    for grow_unit in (1 << 40, (1 << 64) - (1 << 20)):
        with path.open("r+b") as f:
            f.seek(field.offset)
            f.write(grow_unit.to_bytes(8, "little"))
        chain, dev = await open_image(path)
        try:
            await dev.write(3 * chunk, b"\x42" * 4096)
            await dev.flush()
        finally:
            await chain.aclose()
        assert path.stat().st_size <= 4 * 1024 * 1024 + size, grow_unit  # metadata + store
        chain, dev = await open_image(path, read_only=True)
        try:
            assert await dev.read(3 * chunk, 4096) == b"\x42" * 4096
        finally:
            await chain.aclose()


async def test_parallels_extension_cluster_outside_the_file_is_refused_then_repaired(
    tmp_path: Path,
) -> None:
    """Fuzz finding: with ext_off far past the end of the file, the first allocating
    write fallocated up to it (74 TB: the disk filled).  Read-write opens now refuse
    it, check reports it and --repair all forgets it; then writes keep the file small."""
    path = await new_image(tmp_path / "p.img", 1 << 20)
    field = parallels_layout(path.read_bytes()).fields["ext_off"]
    with path.open("r+b") as f:
        f.seek(field.offset)
        f.write((144_941_906_321).to_bytes(8, "little"))
    with pytest.raises(InvalidImageError, match="extension cluster"):
        await open_driver(path)
    report = await parallels_check(str(path), None)
    assert report.corruptions == 1
    report = await parallels_check(str(path), "all")
    assert report.corruptions == 0
    assert report.corruptions_fixed == 1
    driver = await open_driver(path)
    try:
        await driver.write(0, b"\x17" * 4096)
        await driver.flush()
    finally:
        await driver.aclose()
    assert path.stat().st_size < 1 << 20
    assert (await parallels_check(str(path), None)).corruptions == 0
