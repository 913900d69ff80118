"""Regression tests for fuzz findings that are not tied to one seed image.

The image-level findings are corpus entries (tests/fuzz/corpus/*/regress-*.json,
replayed by test_corpus.py with their expected outcome); this file holds the
FileBackend contract that one of them exposed.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from nbdserve.block.file import FileBackend
from nbdserve.errors import HostIOError

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
