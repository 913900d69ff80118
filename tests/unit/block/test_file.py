"""FileBackend's hole knowledge: all_data() must agree with the file system.

all_data() decides whether a read may go out with sendfile; it skips the
SEEK_HOLE system call for files that had no hole at open and were given none
since.  Every operation that can make a hole is checked here against
SEEK_HOLE itself, so forgetting one of them fails.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from nbdserve.block.file import INLINE_WRITE_MAX, FileBackend

KiB = 1024
MiB = 1024 * KiB


def _seek_hole_says_data(fd: int, offset: int, length: int) -> bool:
    """The oracle: no hole in [offset, offset + length) according to the kernel."""
    return os.lseek(fd, offset, os.SEEK_HOLE) >= offset + length


def _assert_agrees(file: FileBackend, ranges: list[tuple[int, int]]) -> None:
    for offset, length in ranges:
        assert file.all_data(offset, length) == _seek_hole_says_data(file.fd, offset, length), (
            offset,
            length,
        )


@pytest.fixture
def full_file(tmp_path: Path) -> Iterator[FileBackend]:
    """A 2 MiB file written end to end: no hole anywhere."""
    path = tmp_path / "full.img"
    path.write_bytes(b"\x5a" * (2 * MiB))
    file = FileBackend.open(str(path), read_only=False)
    try:
        yield file
    finally:
        os.close(file.fd)


RANGES = [(0, 64 * KiB), (MiB - 4 * KiB, 8 * KiB), (MiB, MiB), (0, 2 * MiB), (2 * MiB - KiB, KiB)]


def test_a_file_without_holes_is_answered_without_seek_hole(
    full_file: FileBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int, int]] = []
    real_lseek = os.lseek

    def counting_lseek(fd: int, pos: int, how: int) -> int:
        calls.append((fd, pos, how))
        return real_lseek(fd, pos, how)

    monkeypatch.setattr(os, "lseek", counting_lseek)
    assert all(full_file.all_data(o, n) for o, n in RANGES)
    assert not full_file.all_data(2 * MiB - KiB, 2 * KiB), "past the end of file is a hole"
    assert calls == []


def test_a_sparse_file_asks_the_file_system(tmp_path: Path) -> None:
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"\x01" * MiB)
    file = FileBackend.open(str(path), read_only=True)
    try:
        assert file.all_data(MiB, MiB)
        assert not file.all_data(0, 64 * KiB)
        assert not file.all_data(MiB, MiB + 4 * KiB)
        _assert_agrees(file, [(0, MiB), (MiB, MiB), (2 * MiB, MiB), (MiB - KiB, 2 * KiB)])
    finally:
        os.close(file.fd)


async def test_punching_a_hole_is_seen(full_file: FileBackend) -> None:
    await full_file.punch_hole(MiB, 256 * KiB)
    assert not full_file.all_data(MiB, 64 * KiB)
    _assert_agrees(full_file, RANGES)


async def test_zero_range_is_seen(full_file: FileBackend) -> None:
    await full_file.zero_range(512 * KiB, 128 * KiB)  # unwritten extents: holes to SEEK_HOLE
    _assert_agrees(full_file, [*RANGES, (512 * KiB, 128 * KiB)])


async def test_a_write_past_the_end_leaves_a_gap_that_is_seen(full_file: FileBackend) -> None:
    await full_file.pwrite(3 * MiB, b"\x02" * (64 * KiB))
    assert not full_file.all_data(2 * MiB, 64 * KiB)
    assert full_file.all_data(3 * MiB, 64 * KiB)
    _assert_agrees(full_file, [*RANGES, (2 * MiB, MiB), (3 * MiB, 64 * KiB)])


async def test_an_append_right_at_the_end_makes_no_hole(full_file: FileBackend) -> None:
    await full_file.pwrite(2 * MiB, b"\x03" * (64 * KiB))
    assert full_file.all_data(0, 2 * MiB + 64 * KiB)
    _assert_agrees(full_file, [*RANGES, (0, 2 * MiB + 64 * KiB)])


async def test_growing_by_truncate_is_seen(full_file: FileBackend) -> None:
    await full_file.truncate(4 * MiB)
    assert not full_file.all_data(2 * MiB, MiB)
    _assert_agrees(full_file, [*RANGES, (2 * MiB, 2 * MiB), (MiB, 2 * MiB)])


async def test_preallocation_is_seen(full_file: FileBackend) -> None:
    await full_file.preallocate(2 * MiB, MiB)
    _assert_agrees(full_file, [*RANGES, (2 * MiB, MiB), (MiB, 2 * MiB)])


def test_a_size_changed_by_someone_else_is_seen(full_file: FileBackend) -> None:
    os.ftruncate(full_file.fd, 3 * MiB)  # another writer (locking off) grew the file
    full_file.refresh_size()
    assert not full_file.all_data(2 * MiB, MiB)
    _assert_agrees(full_file, [*RANGES, (2 * MiB, MiB)])


def test_is_cached_answers_each_range(tmp_path: Path) -> None:
    """The cachestat arguments are filled in place: each call must see its own range."""
    path = tmp_path / "half.img"
    with open(path, "wb") as f:
        f.write(b"\x07" * (64 * KiB))  # written: in the page cache
        f.truncate(2 * MiB)  # the rest never touched: no page of it is cached
    file = FileBackend.open(str(path), read_only=True)
    try:
        if not file.is_cached(0, 64 * KiB):
            pytest.skip("cachestat(2) is not available on this kernel")
        for _ in range(2):
            assert not file.is_cached(MiB, 64 * KiB)
            assert file.is_cached(4 * KiB, 8 * KiB)
            assert not file.is_cached(0, 128 * KiB), "half of it is not cached"
            assert file.is_cached(60 * KiB, 4 * KiB)
    finally:
        os.close(file.fd)


# ---- inline writes and their circuit breaker ------------------------------------


def test_writes_up_to_the_inline_limit_go_straight_to_the_page_cache(
    full_file: FileBackend,
) -> None:
    data = bytes(range(256)) * (MiB // 256)  # fio's and many clients' request size
    assert full_file.try_pwrite(4096, data)
    assert os.pread(full_file.fd, len(data), 4096) == data
    over = b"\x09" * (INLINE_WRITE_MAX + 1)
    assert not full_file.try_pwrite(0, over)  # over the limit: a thread's job


async def test_a_slow_inline_write_sends_writes_to_threads_for_a_while(
    full_file: FileBackend,
) -> None:
    """Any inline write counts as slow here (threshold 0): the one that was
    slow is done, the next ones go through pwrite's thread until the pause
    ends, and every byte lands either way."""
    full_file.slow_inline_write = 0.0
    full_file.inline_pause = 0.2
    first, second, third = b"\x01" * 4096, b"\x02" * 4096, b"\x03" * 4096
    assert full_file.try_pwrite(0, first)
    assert not full_file.try_pwrite(4096, second)
    await full_file.pwrite(4096, second)  # the async path still writes it
    assert os.pread(full_file.fd, 8192, 0) == first + second
    await trio.sleep(0.25)
    assert full_file.try_pwrite(8192, third)
    assert os.pread(full_file.fd, 4096, 8192) == third


async def test_a_pause_is_logged_once_a_minute(
    full_file: FileBackend, caplog: pytest.LogCaptureFixture
) -> None:
    full_file.slow_inline_write = 0.0
    full_file.inline_pause = 0.0
    with caplog.at_level(logging.INFO, logger="nbdserve.block.file"):
        for i in range(3):
            assert full_file.try_pwrite(i * 4096, b"\x05" * 4096)
    paused = [r for r in caplog.records if "event=inline-writes-paused" in r.getMessage()]
    assert len(paused) == 1
    assert paused[0].levelno == logging.INFO


def test_fast_inline_writes_never_pause(full_file: FileBackend) -> None:
    full_file.slow_inline_write = 10.0
    for i in range(64):
        assert full_file.try_pwrite(i * 4096, b"\x07" * 4096)
