"""CompressedWriteCache: whole-cluster aligned writes, the bound, reads, drops."""

from __future__ import annotations

import trio
import trio.testing

from nbdserve.block.qcow2.compress_cache import CompressedWriteCache

CS = 16384


class FakeFile:
    """A file in memory that records writes; ``gate`` (when set) holds each write."""

    direct_alignment = 4096

    def __init__(self, size: int = 8 * CS) -> None:
        self.data = bytearray(size)
        self.writes: list[tuple[int, int]] = []
        self.gate: trio.Event | None = None
        self.writing = 0

    async def pwrite(self, offset: int, data: bytes) -> None:
        self.writing += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            await trio.lowlevel.checkpoint()
            self.data[offset : offset + len(data)] = data
            self.writes.append((offset, len(data)))
        finally:
            self.writing -= 1

    async def pread_into(self, offset: int, view: memoryview) -> None:
        await trio.lowlevel.checkpoint()
        view[:] = self.data[offset : offset + len(view)]


def _cache(file: FakeFile, clusters: int = 4) -> CompressedWriteCache:
    return CompressedWriteCache(file, CS, clusters * CS)  # type: ignore[arg-type]


def _bytes(seed: int, n: int) -> bytes:
    return bytes((seed * 7 + i) % 251 for i in range(n))


async def test_a_closed_cluster_is_written_whole_in_one_aligned_write() -> None:
    file = FakeFile()
    cache = _cache(file)
    a, b = _bytes(1, 5000), _bytes(2, CS - 5000 - 100)
    cache.append(CS, a)
    cache.append(CS + 5000, b)
    assert file.writes == []
    cache.close(CS)
    await cache.write_closed()
    # the data ends 100 bytes before the cluster end: padded to one full cluster
    assert file.writes == [(CS, CS)]
    assert bytes(file.data[CS : CS + 5000]) == a
    assert bytes(file.data[CS + 5000 : 2 * CS - 100]) == b
    assert len(cache) == 0


async def test_an_extent_over_a_cluster_boundary_is_split_between_clusters() -> None:
    file = FakeFile()
    cache = _cache(file)
    head = _bytes(3, CS - 1000)
    cross = _bytes(4, 3000)
    cache.append(2 * CS, head)
    cache.append(3 * CS - 1000, cross)
    cache.close(2 * CS)
    assert cache.active_count == 2
    await cache.write_closed()
    assert file.writes == [(2 * CS, CS)]
    got = await cache.read(3 * CS - 1000, 3000)
    assert got == cross  # first 1000 bytes from the file, the rest from the buffer
    await cache.flush()
    assert file.writes[-1] == (3 * CS, 4096)  # the open cluster, padded to 4 KiB
    assert bytes(file.data[3 * CS - 1000 : 3 * CS + 2000]) == cross


async def test_clusters_that_follow_each_other_are_written_as_one() -> None:
    file = FakeFile()
    cache = _cache(file, clusters=8)
    extents = [_bytes(i, 6000) for i in range(8)]  # 48000 bytes over clusters 1..3
    for i, e in enumerate(extents):
        cache.append(CS + 6000 * i, e)
    cache.close(CS)
    cache.close(2 * CS)
    await cache.write_closed()
    assert file.writes == [(CS, 2 * CS)]
    await cache.flush()
    assert file.writes[-1] == (3 * CS, 16384)  # 15232 bytes in cluster 3, padded to 4K
    assert bytes(file.data[CS : CS + 48000]) == b"".join(extents)
    assert cache.writes == 2


async def test_reads_see_cached_bytes_before_they_reach_the_file() -> None:
    file = FakeFile()
    cache = _cache(file)
    extent = _bytes(5, 3000)
    cache.append(4 * CS + 0, extent)
    assert cache.covers_any(4 * CS + 100, 10)
    assert not cache.covers_any(5 * CS, 10)
    # a read runs to the end of the extent's last sector: bytes past it read as zeros
    got = await cache.read(4 * CS, 3072)
    assert got == extent + bytes(72)
    assert bytes(file.data[4 * CS : 4 * CS + 3000]) == bytes(3000)


async def test_partial_flushes_rewrite_from_the_aligned_block_before_new_data() -> None:
    file = FakeFile()
    cache = _cache(file)
    first = _bytes(6, 5000)
    cache.append(0, first)
    await cache.flush()
    assert file.writes == [(0, 8192)]
    second = _bytes(7, 2000)
    cache.append(5000, second)
    await cache.flush()
    # 5000 lies in the second 4 KiB block: rewrite from 4096, not from 0
    assert file.writes[-1] == (4096, 4096)
    assert bytes(file.data[:7000]) == first + second
    await cache.flush()  # nothing new: no write
    assert len(file.writes) == 2


async def test_the_bound_is_kept_by_writing_closed_then_open_clusters() -> None:
    file = FakeFile()
    cache = _cache(file, clusters=2)
    assert cache.max_active == 2
    cache.append(0, _bytes(1, 1000))
    cache.close(0)
    cache.append(CS, _bytes(2, 1000))
    assert not cache.has_room(1)
    await cache.make_room(1)
    assert file.writes == [(0, CS)]  # the closed cluster went first, whole
    assert cache.has_room(1)
    await cache.make_room(2)
    assert file.writes[-1] == (CS, 4096)  # then the open one, partially
    assert cache.active_count == 0
    assert len(cache) == 1  # the open cluster stays cached for later appends


async def test_a_full_cache_waits_for_clusters_being_written() -> None:
    file = FakeFile()
    cache = _cache(file, clusters=2)
    cache.append(0, _bytes(1, 1000))
    cache.close(0)
    cache.append(CS, _bytes(2, 1000))
    file.gate = trio.Event()
    done: list[str] = []

    async def make_room(name: str) -> None:
        await cache.make_room(1)
        done.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(make_room, "first")  # writes the closed cluster
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(make_room, "second")  # writes the open one
        await trio.testing.wait_all_tasks_blocked()
        assert file.writing == 2
        nursery.start_soon(make_room, "third")  # nothing left to write: waits
        await trio.testing.wait_all_tasks_blocked()
        assert done == []
        assert cache.room_waits == 1
        file.gate.set()
    assert sorted(done) == ["first", "second", "third"]
    assert cache.active_count == 0


async def test_a_dropped_cluster_is_never_written_and_waits_for_a_write_in_flight() -> None:
    file = FakeFile()
    cache = _cache(file)
    cache.append(0, _bytes(1, 1000))
    cache.append(CS, _bytes(2, 1000))
    await cache.drop(CS)
    await cache.flush()
    assert file.writes == [(0, 4096)]
    assert not cache.covers_any(CS, 10)
    # a drop during a write of the cluster returns only after the write finished
    cache.append(0 + 1000, _bytes(3, 500))
    file.gate = trio.Event()
    order: list[str] = []

    async def flusher() -> None:
        await cache.flush()
        order.append("flushed")

    async def dropper() -> None:
        await cache.drop(0)
        order.append("dropped")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(dropper)
        await trio.testing.wait_all_tasks_blocked()
        assert order == []
        file.gate.set()
    assert order == ["flushed", "dropped"]
    assert len(cache) == 0


async def test_two_writes_of_one_cluster_land_in_order() -> None:
    """A partial write in flight and a later one of the same cluster: the later one
    must not be overwritten by the earlier one's zero padding."""
    file = FakeFile()
    cache = _cache(file)
    a = _bytes(1, 1000)
    cache.append(0, a)
    file.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.flush)
        await trio.testing.wait_all_tasks_blocked()
        b = _bytes(2, 1000)
        cache.append(1000, b)
        nursery.start_soon(cache.flush)
        await trio.testing.wait_all_tasks_blocked()
        file.gate.set()
    assert bytes(file.data[:2000]) == a + b
