"""A read over clusters that are contiguous in the file is one backend read.

The file backend's read calls are counted on the driver's own FileBackend
(the async path and the page-cache fast path), so a regression to one read
per cluster shows as a count, not only as a slowdown.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nbdserve.block.parallels import ParallelsDriver
from tests.unit.block.parallels.images import new_image, open_driver

CS = 64 * 1024


def count_calls(obj: object, name: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap ``obj.name``; the returned list collects the offset of every call."""
    calls: list[int] = []
    original: Callable[..., Any] = getattr(obj, name)

    def wrapper(offset: int, *args: Any, **kwargs: Any) -> Any:
        calls.append(offset)
        return original(offset, *args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


async def written_image(tmp_path: Path) -> ParallelsDriver:
    """Clusters 0-7 in one run (one allocation: contiguous), cluster 9 on its own."""
    path = await new_image(tmp_path / "disk.img", 4 * 1024 * 1024, CS)
    drv = await open_driver(path)
    await drv.write(0, bytes(range(256)) * (8 * CS // 256))
    await drv.write(9 * CS, b"\x07" * CS)
    await drv.aclose()
    return await open_driver(path, read_only=True)


async def test_contiguous_clusters_are_one_pread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drv = await written_image(tmp_path)
    try:
        file = drv.file
        assert file is not None
        calls = count_calls(file, "pread_into", monkeypatch)
        buf = bytearray(8 * CS - 1024)
        await drv.readinto(512, memoryview(buf))  # unaligned, over all 8 clusters
        assert len(calls) == 1, calls
        assert buf == (bytes(range(256)) * (8 * CS // 256))[512 : 512 + len(buf)]
        calls.clear()
        # over the hole at cluster 8 and the separate cluster 9: one read per run
        await drv.readinto(6 * CS, memoryview(bytearray(4 * CS)))
        assert len(calls) == 2, calls
    finally:
        await drv.aclose()


async def test_fast_path_reads_contiguous_clusters_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drv = await written_image(tmp_path)
    try:
        file = drv.file
        assert file is not None
        calls = count_calls(file, "try_pread_into", monkeypatch)
        buf = bytearray(8 * CS)
        if not drv.try_readinto(0, memoryview(buf)):
            pytest.skip("the file's pages are not in the page cache")
        assert len(calls) == 1, calls
        assert buf == bytes(range(256)) * (8 * CS // 256)
    finally:
        await drv.aclose()
