from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from nbdserve.block.base import Status
from nbdserve.block.chain import ChainOptions, open_chain
from nbdserve.block.device import BlockDevice
from nbdserve.block.parallels import ParallelsDriver
from nbdserve.block.parallels.structs import INUSE_MAGIC
from nbdserve.errors import ConfigError, CorruptImageError, InvalidImageError, NotSupportedError
from tests.conftest import require_tools
from tests.helpers.server import run
from tests.unit.block.parallels.images import (
    build_old_magic_image,
    header_fields,
    new_image,
    open_driver,
    patch_bat,
    patch_header,
    read_bat,
)

CS = 64 * 1024
MIB = 1 << 20
DATA_START = 64 * 1024  # 64 MiB / 64 KiB clusters: 1024 entries -> one cluster of metadata


async def image(tmp_path: Path, size: int = 64 * MIB, cs: int = CS) -> Path:
    return await new_image(tmp_path / "disk.img", size, cs)


async def test_write_read_reopen_and_clean_close(tmp_path: Path) -> None:
    path = await image(tmp_path)
    drv = await open_driver(path)
    assert header_fields(path)["inuse"] == INUSE_MAGIC  # set (and synced) on open
    dev = BlockDevice(drv)
    await dev.write(1000, b"a" * 200_000)  # partial first and last cluster
    await dev.write(10 * MIB + 5, b"b" * 7)
    await dev.write(1000 + 3000, b"c" * 10)  # overwrite inside an allocated cluster
    expect = bytearray(2 * MIB)
    expect[1000:201_000] = b"a" * 200_000
    expect[4000:4010] = b"c" * 10
    assert await dev.read(0, 2 * MIB) == expect
    await dev.aclose()
    await dev.aclose()  # idempotent
    assert header_fields(path)["inuse"] == 0
    # 4 clusters for the first write, 1 for the second; the file ends at the data end
    assert path.stat().st_size == DATA_START + 5 * CS
    drv = await open_driver(path, read_only=True)
    dev = BlockDevice(drv)
    assert await dev.read(0, 2 * MIB) == expect
    assert await dev.read(10 * MIB, 16) == b"\0" * 5 + b"b" * 7 + b"\0" * 4
    await dev.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await drv.readinto(0, memoryview(bytearray(10)))


async def test_flush_writes_bat_after_data(tmp_path: Path) -> None:
    path = await image(tmp_path)
    drv = await open_driver(path)
    await drv.write(0, b"x" * CS)
    assert read_bat(path, 0) == 0  # BAT updates wait for a flush
    await drv.flush()
    assert read_bat(path, 0) == DATA_START // CS
    assert drv.statistics().extra["bat_writes"] == 1
    await drv.flush()  # nothing dirty: no BAT write
    assert drv.statistics().extra["bat_writes"] == 1
    await drv.aclose()


@pytest.mark.parametrize("mode", ["falloc", "truncate", "off"])
async def test_run_allocation_and_prealloc_modes(tmp_path: Path, mode: str) -> None:
    path = await image(tmp_path)
    settings = {"prealloc_mode": mode, "prealloc_size": 4 * MIB}
    drv = await open_driver(path, settings=settings)
    await drv.write(0, b"z" * MIB)  # 16 absent clusters: one allocation
    stats = drv.statistics().extra
    assert (stats["allocations"], stats["clusters_allocated"]) == (1, 16)
    assert [read_bat_mem(drv, i) for i in (0, 15)] == [DATA_START, DATA_START + 15 * CS]
    size = os.stat(path).st_size
    if mode == "off":
        assert size == DATA_START + MIB
    else:
        assert size == DATA_START + MIB + 4 * MIB
    blocks = os.stat(path).st_blocks * 512
    if mode == "falloc":
        assert blocks >= 5 * MIB  # reserved, not sparse
    await drv.write(2 * MIB, b"y" * MIB)
    assert drv.statistics().extra["file_grows"] == (2 if mode == "off" else 1)
    await drv.aclose()
    assert os.stat(path).st_size == DATA_START + 2 * MIB  # trimmed to the real data end


def read_bat_mem(drv: ParallelsDriver, index: int) -> int:
    return drv._bat.host_offset(index)


async def test_one_cluster_at_a_time_when_limited(tmp_path: Path) -> None:
    path = await image(tmp_path)
    drv = await open_driver(path, settings={"max_alloc_clusters": 1})
    await drv.write(0, b"z" * MIB)
    assert drv.statistics().extra["allocations"] == 16
    assert await BlockDevice(drv).read(0, MIB) == b"z" * MIB
    await drv.aclose()


async def test_concurrent_writes_to_one_absent_cluster_allocate_once(tmp_path: Path) -> None:
    path = await image(tmp_path)
    drv = await open_driver(path)
    pieces = [(i * 4096 + (i % 3) * 100, bytes([i + 1]) * 1000) for i in range(4 * CS // 4096)]

    async with trio.open_nursery() as nursery:
        for off, data in pieces:
            nursery.start_soon(drv.write, off, data)
    assert drv.statistics().extra["clusters_allocated"] == 4
    expect = bytearray(4 * CS)
    for off, data in pieces:
        expect[off : off + len(data)] = data
    assert await BlockDevice(drv).read(0, 4 * CS) == expect
    await drv.aclose()
    drv = await open_driver(path, read_only=True)
    assert await BlockDevice(drv).read(0, 4 * CS) == expect
    assert drv._bat.allocated_count() == 4
    await drv.aclose()


async def test_block_status_coalesces_and_defers_unallocated(tmp_path: Path) -> None:
    path = await image(tmp_path)
    drv = await open_driver(path)
    await drv.write(CS, b"1" * (3 * CS))
    await drv.write(10 * CS + 7, b"2")
    got = await drv.block_status(100, 20 * CS)
    data = Status.ALLOCATED | Status.DATA
    assert [(e.offset, e.length, e.status) for e in got] == [
        (100, CS - 100, Status.NONE),
        (CS, 3 * CS, data),
        (4 * CS, 6 * CS, Status.NONE),
        (10 * CS, CS, data),
        (11 * CS, 10 * CS, Status.NONE),  # soft cap: runs to the cluster end
    ]
    await drv.aclose()


async def test_partial_writes_fill_from_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    pattern = bytes(range(256)) * (4 * MIB // 256)
    base.write_bytes(pattern[: 2 * MIB])  # shorter than the overlay: zeros after
    path = await image(tmp_path, 4 * MIB)
    settings: dict[str, object] = {"backing": "base.raw", "backing_format": "raw"}
    chain = await open_chain(str(path), ChainOptions(fmt="parallels", settings=settings))
    dev = BlockDevice(chain.top)
    assert await dev.read(0, 4 * MIB) == pattern[: 2 * MIB] + bytes(2 * MIB)
    await dev.write(CS + 1000, b"W" * 100)
    await dev.write(2 * MIB - 10, b"V" * 20)  # straddles the backing's end
    expect = bytearray(pattern[: 2 * MIB] + bytes(2 * MIB))
    expect[CS + 1000 : CS + 1100] = b"W" * 100
    expect[2 * MIB - 10 : 2 * MIB + 10] = b"V" * 20
    assert await dev.read(0, 4 * MIB) == expect
    await dev.discard(0, 4 * MIB)  # with a backing file: nothing happens
    assert await dev.read(0, 4 * MIB) == expect
    await chain.aclose()
    # the filled clusters hold the backing bytes themselves
    drv = await open_driver(path, read_only=True)
    alone = await BlockDevice(drv).read(CS, CS)
    assert alone == expect[CS : 2 * CS]
    await drv.aclose()


async def test_discard_frees_whole_clusters(tmp_path: Path) -> None:
    path = await image(tmp_path)
    drv = await open_driver(path)
    dev = BlockDevice(drv)
    await dev.write(0, b"q" * (3 * CS))
    await dev.discard(CS // 2, 2 * CS)  # covers only cluster 1 entirely
    assert [read_bat_mem(drv, i) != 0 for i in range(3)] == [True, False, True]
    assert await dev.read(CS, CS) == bytes(CS)
    assert await dev.read(0, CS) == b"q" * CS
    await dev.discard(2 * CS, CS)  # the last allocated cluster
    await dev.aclose()
    # the file is trimmed to the highest cluster still in use
    assert path.stat().st_size == DATA_START + CS


async def test_write_zeroes_drops_whole_clusters(tmp_path: Path) -> None:
    path = await image(tmp_path)
    drv = await open_driver(path)
    dev = BlockDevice(drv)
    await dev.write(0, b"q" * (4 * CS))
    await dev.write_zeroes(100, 3 * CS, may_unmap=True)
    assert await dev.read(0, 4 * CS) == b"q" * 100 + bytes(3 * CS) + b"q" * (CS - 100)
    assert [read_bat_mem(drv, i) != 0 for i in range(4)] == [True, False, False, True]
    with pytest.raises(NotSupportedError):
        await dev.write_zeroes(100, CS, may_unmap=True, fast=True)
    await dev.write_zeroes(8 * CS, 2 * CS, may_unmap=True, fast=True)  # absent already
    allocated = drv.statistics().extra["clusters_allocated"]
    await dev.write_zeroes(20 * CS, CS, may_unmap=False)  # NO_HOLE on an absent cluster
    assert drv.statistics().extra["clusters_allocated"] == allocated
    await dev.write(30 * CS, b"r" * CS)
    await dev.write_zeroes(30 * CS, CS, may_unmap=False)  # NO_HOLE keeps the cluster
    assert read_bat_mem(drv, 30) != 0
    assert await dev.read(30 * CS, CS) == bytes(CS)
    await dev.aclose()


async def test_unclean_image_is_refused_read_write(tmp_path: Path) -> None:
    path = await image(tmp_path)
    drv = await open_driver(path)
    await drv.write(0, b"k" * 100)
    await drv.flush()
    patch_header(path, inuse=INUSE_MAGIC)
    with pytest.raises(
        InvalidImageError, match=r"not closed cleanly.*nbdserve img check --repair all"
    ):
        await open_driver(path)
    ro = await open_driver(path, read_only=True)
    assert await BlockDevice(ro).read(0, 100) == b"k" * 100
    assert ro.describe()["dirty-flag"] is True
    await ro.aclose()
    assert header_fields(path)["inuse"] == INUSE_MAGIC  # read-only leaves it alone
    await drv.aclose()


async def test_bat_entry_past_eof_gives_eio_on_that_cluster(tmp_path: Path) -> None:
    path = await image(tmp_path)
    drv = await open_driver(path)
    await drv.write(0, b"a" * (2 * CS))
    await drv.aclose()
    patch_bat(path, 5, 10_000)  # far past the end of the file
    with pytest.raises(InvalidImageError, match=r"outside the file.*--repair all"):
        await open_driver(path)
    ro = await open_driver(path, read_only=True)
    dev = BlockDevice(ro)
    with pytest.raises(CorruptImageError, match="BAT entry 5 points past the end"):
        await dev.read(4 * CS, 3 * CS)
    assert not ro.try_readinto(5 * CS, memoryview(bytearray(10)))
    assert await dev.read(0, 2 * CS) == b"a" * (2 * CS)
    await dev.aclose()


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"tracks": 0}, "zero sectors per track"),
        ({"bat_entries": 0xFFFFFFFF}, "BAT of 4294967295 entries"),
        ({"bat_entries": 200_000}, "past the end of the file"),
        ({"version": 3}, "version"),
    ],
)
async def test_corrupt_headers_are_clear_errors(
    tmp_path: Path, fields: dict[str, int], match: str
) -> None:
    path = await image(tmp_path)
    if "version" in fields:
        raw = bytearray(path.read_bytes())
        raw[16:20] = fields["version"].to_bytes(4, "little")
        path.write_bytes(bytes(raw))
    else:
        patch_header(path, **fields)
    for read_only in (True, False):
        with pytest.raises(InvalidImageError, match=match):
            await open_driver(path, read_only=read_only)


async def test_bad_settings(tmp_path: Path) -> None:
    path = await image(tmp_path)
    with pytest.raises(ConfigError, match="prealloc_mode"):
        await open_driver(path, settings={"prealloc_mode": "fast"})
    with pytest.raises(ConfigError, match="prealloc_size"):
        await open_driver(path, settings={"prealloc_size": "lots"})


async def test_old_magic_image_reads_and_writes(tmp_path: Path) -> None:
    path = tmp_path / "old.img"
    expect = bytearray(build_old_magic_image(path))
    cs = 63 * 512
    drv = await open_driver(path, read_only=True)
    assert drv.cluster_size == cs
    assert drv.size == len(expect)
    dev = BlockDevice(drv)
    assert await dev.read(0, len(expect)) == expect
    buf = bytearray(3 * cs)
    assert drv.try_readinto(cs + 5, memoryview(buf)) or True  # may decline, never garbles
    status = await drv.block_status(0, drv.size)
    for e in status:
        allocated = bool(e.status & Status.ALLOCATED)
        assert allocated == any(expect[e.offset : e.end])
    await dev.aclose()
    drv = await open_driver(path)
    dev = BlockDevice(drv)
    await dev.write(7, b"N" * (2 * cs))
    expect[7 : 7 + 2 * cs] = b"N" * (2 * cs)
    await dev.aclose()
    drv = await open_driver(path, read_only=True)
    assert drv.header.magic == b"WithoutFreeSpace"
    assert await BlockDevice(drv).read(0, len(expect)) == expect
    await drv.aclose()


async def test_allocation_rechecks_the_run_after_waiting_for_the_lock(tmp_path: Path) -> None:
    path = await image(tmp_path)
    drv = await open_driver(path)
    async with trio.open_nursery() as nursery:
        await drv._alloc_lock.acquire()
        nursery.start_soon(drv.write, 0, b"A" * (16 * CS))
        await trio.testing.wait_all_tasks_blocked()
        # meanwhile another request allocated cluster 5 (as if it had the lock first)
        other = drv._data_end
        drv._data_end += CS
        await drv._file.pwrite(other, b"B" * CS)
        drv._bat.set_run(5, 1, other)
        drv._alloc_lock.release()
    assert read_bat_mem(drv, 5) == other  # not re-allocated over
    assert await BlockDevice(drv).read(0, 16 * CS) == b"A" * (16 * CS)
    hosts = {read_bat_mem(drv, i) for i in range(16)}
    assert len(hosts) == 16
    await drv.aclose()


async def test_cancelled_write_leaves_a_clean_image(tmp_path: Path) -> None:
    require_tools("qemu-img")
    path = await image(tmp_path)
    drv = await open_driver(path)
    await drv.write(0, b"k" * CS)
    file = drv._file
    real_pwrite = file.pwrite

    async def stuck_pwrite(offset: int, data: object) -> None:
        await trio.sleep_forever()

    file.pwrite = stuck_pwrite  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drv.write, 4 * CS, b"c" * (8 * CS))
        await trio.testing.wait_all_tasks_blocked()  # space reserved, data in flight
        assert drv._pending
        nursery.cancel_scope.cancel()
    file.pwrite = real_pwrite  # type: ignore[method-assign]
    assert not drv._pending
    assert read_bat_mem(drv, 4) == 0  # never published
    await drv.write(20 * CS, b"w" * 100)  # the driver goes on working
    await drv.aclose()
    await run("qemu-img", "check", "-f", "parallels", path)
    drv = await open_driver(path, read_only=True)
    dev = BlockDevice(drv)
    assert await dev.read(0, CS) == b"k" * CS
    assert await dev.read(20 * CS, 100) == b"w" * 100
    assert set(await dev.read(4 * CS, 8 * CS)) <= {0, ord("c")}
    await dev.aclose()


async def test_fast_reader_agrees_with_readinto(tmp_path: Path) -> None:
    """The server's inline read path (one lookup for a read inside one cluster)
    returns what readinto returns, and declines only what it cannot answer now."""
    path = await image(tmp_path)
    drv = await open_driver(path)
    try:
        await drv.write(0, bytes(range(256)) * (3 * CS // 256))  # clusters 0-2
        await drv.write(5 * CS + 100, b"\x77" * 5000)  # inside cluster 5
        read = drv.fast_reader()
        cases = [
            (0, 4096),  # inside an allocated cluster
            (CS - 2048, 4096),  # across two allocated clusters: the general path
            (2 * CS + 60_000, 5536),  # the last bytes of cluster 2
            (5 * CS, 8192),  # allocated by a partial write
            (7 * CS, 4096),  # never written: zeros
            (2 * CS + 64_000, 4096),  # allocated into unallocated
        ]
        for offset, length in cases:
            fast = bytearray(length)
            assert read(offset, memoryview(fast)), (offset, length)
            slow = bytearray(length)
            await drv.readinto(offset, memoryview(slow))
            assert fast == slow, (offset, length)
        reads = drv.statistics().reads
        assert read(0, memoryview(bytearray(512)))
        assert drv.statistics().reads == reads + 1, "inline reads are counted"
    finally:
        await drv.aclose()
    assert not read(0, memoryview(bytearray(512))), "a closed image answers nothing inline"


async def test_zero_copy_region_is_the_host_stretches_readinto_reads(tmp_path: Path) -> None:
    """Large reads go out with sendfile from the pieces this returns: together they
    must hold exactly the guest's bytes, one piece per run of clusters that follow
    each other in the file; unallocated clusters are refused."""
    path = await image(tmp_path)
    drv = await open_driver(path)
    try:
        await drv.write(0, bytes(range(256)) * (4 * CS // 256))  # clusters 0-3, in order
        await drv.write(9 * CS, b"\x09" * CS)  # cluster 9 lands after cluster 3 ...
        await drv.write(8 * CS, b"\x08" * CS)  # ... and cluster 8 after it: not in order
        await drv.flush()
        with open(path, "rb") as f:
            f.read()  # into the page cache
        cases = [
            (0, 4 * CS, 1),
            (1000, 2 * CS, 1),
            (9 * CS, CS, 1),
            (8 * CS + 5, 100, 1),
            (8 * CS + 5, CS, 2),  # cluster 9 lies before cluster 8 in the file
        ]
        for offset, length, stretches in cases:
            region = drv.zero_copy_region(offset, length)
            assert region is not None, (offset, length)
            fd, pieces = region
            assert len(pieces) == stretches, pieces
            want = bytearray(length)
            await drv.readinto(offset, memoryview(want))
            got = b"".join(os.pread(fd, n, host) for host, n in pieces)
            assert got == want, (offset, length)
        assert drv.zero_copy_region(3 * CS, 2 * CS) is None, "cluster 4 is not allocated"
        assert drv.zero_copy_region(20 * CS, CS) is None, "unallocated"
    finally:
        await drv.aclose()
    assert drv.zero_copy_region(0, CS) is None, "closed"
