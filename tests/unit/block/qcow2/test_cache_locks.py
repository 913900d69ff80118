"""TableCache (LRU, write-back, ordering hook) and RangeLock."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trio
import trio.testing

from nbdserve.block.file import FileBackend
from nbdserve.block.qcow2.cache import TableCache
from nbdserve.block.qcow2.locks import RangeLock


def _cache(tmp_path: Path, capacity: int) -> tuple[TableCache, FileBackend]:
    path = tmp_path / "t"
    path.write_bytes(bytes(16 * 64))
    file = FileBackend.open(str(path), read_only=False)
    cache = TableCache(
        file,
        64,
        capacity,
        lambda raw: np.frombuffer(raw, dtype=">u8").copy(),
        lambda t: t.tobytes(),
        "t",
    )
    return cache, file


async def test_eviction_writes_dirty_tables_after_the_hook(tmp_path: Path) -> None:
    cache, file = _cache(tmp_path, 2)
    events: list[str] = []

    async def hook() -> None:
        events.append("hook")
        await trio.lowlevel.checkpoint()

    cache.before_write = hook
    try:
        t0 = await cache.get(0)
        t0[0] = 7
        cache.mark_dirty(0, t0)
        await cache.get(64)
        await cache.get(128)  # evicts table 0, which is dirty
        assert events == ["hook"]
        assert cache.peek(0) is None
        assert (await file.pread(0, 8)) == (7).to_bytes(8, "big")
        assert cache.misses == 3
        assert cache.evictions == 1
    finally:
        await file.aclose()


async def test_mark_dirty_after_eviction_keeps_the_update(tmp_path: Path) -> None:
    cache, file = _cache(tmp_path, 2)
    try:
        t0 = await cache.get(0)
        await cache.get(64)
        await cache.get(128)  # table 0 evicted while we still hold it
        t0[1] = 9
        cache.mark_dirty(0, t0)
        await cache.flush()
        assert (await file.pread(8, 8)) == (9).to_bytes(8, "big")
        assert cache.dirty_count == 0
    finally:
        await file.aclose()


async def test_range_lock_serialises_overlaps_only(autojump_clock: trio.abc.Clock) -> None:
    lock = RangeLock()
    order: list[str] = []

    async def hold(name: str, start: int, end: int) -> None:
        async with lock.hold(start, end):
            order.append(f"+{name}")
            await trio.sleep(1)
            order.append(f"-{name}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, "a", 0, 4)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(hold, "b", 3, 5)  # overlaps a: waits
        nursery.start_soon(hold, "c", 4, 8)  # disjoint from a: runs now
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["+a", "+c"]
        assert not lock.is_free(3, 4)
        assert lock.is_free(8, 9)
    assert order.index("+b") > order.index("-a")
    assert lock.is_free(0, 100)


async def test_range_lock_release_on_cancel(autojump_clock: trio.abc.Clock) -> None:
    lock = RangeLock()
    with trio.move_on_after(0.5):
        async with lock.hold(0, 10):
            await trio.sleep(10)
    assert lock.is_free(0, 10)
