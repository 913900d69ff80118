"""qcow2 compress = true: compression format, L2 entries, allocation, the write path.

The image checker (nbdserve's qcow2 check, which counts references exactly as
qemu-img check does) is the oracle for refcounts here; the interop tests run
qemu-img itself.
"""

from __future__ import annotations

import random
import shutil
import zlib
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from nbdserve.block.chain import ChainOptions, open_chain
from nbdserve.block.device import BlockDevice
from nbdserve.block.qcow2 import Qcow2Driver, check_image, create_image
from nbdserve.block.qcow2.cluster import Geometry
from nbdserve.block.qcow2.compress import (
    CompressSettings,
    batches,
    compress_cluster,
    compressed_l2_entry,
    parse_settings,
    split_clusters,
)
from nbdserve.block.qcow2.structs import COMPRESSION_ZLIB, COMPRESSION_ZSTD
from nbdserve.errors import ConfigError

MiB = 1 << 20


def compressible(rng: random.Random, n: int) -> bytes:
    """Runs of one byte mixed with random runs: compresses to roughly 40-60 %."""
    out = bytearray()
    while len(out) < n:
        k = rng.randrange(64, 3000)
        out += rng.randbytes(k) if rng.random() < 0.45 else bytes([rng.randrange(256)]) * k
    return bytes(out[:n])


# ---- pure pieces -------------------------------------------------------------------


def test_zlib_clusters_are_raw_deflate_with_a_4k_window() -> None:
    cs = 65536
    data = compressible(random.Random(1), cs)
    out = compress_cluster(data, cs, COMPRESSION_ZLIB)
    assert out is not None
    assert len(out) <= cs - 1
    assert zlib.decompressobj(-12).decompress(out + b"trailing garbage", cs) == data
    with pytest.raises(zlib.error):
        zlib.decompress(out)  # no zlib header: a raw stream, as QEMU writes it


def test_zstd_clusters_are_one_frame() -> None:
    cs = 65536
    data = compressible(random.Random(2), cs)
    out = compress_cluster(data, cs, COMPRESSION_ZSTD)
    assert out is not None
    d = zstandard.ZstdDecompressor().decompressobj()
    assert d.decompress(out + bytes(700)) == data


def test_incompressible_clusters_are_refused() -> None:
    cs = 4096
    noise = random.Random(3).randbytes(cs)
    assert compress_cluster(noise, cs, COMPRESSION_ZLIB) is None
    assert compress_cluster(noise, cs, COMPRESSION_ZSTD) is None


def test_a_short_last_cluster_is_zero_padded() -> None:
    cs = 16384
    out = compress_cluster(b"\x07" * 1000, cs, COMPRESSION_ZLIB)
    assert out is not None
    assert zlib.decompressobj(-12).decompress(out, cs) == b"\x07" * 1000 + bytes(cs - 1000)


@given(
    cluster_bits=st.integers(9, 21),
    cluster=st.integers(1, 1 << 20),
    start=st.integers(0, (1 << 21) - 1),
    length=st.integers(1, (1 << 21) - 1),
)
def test_compressed_l2_entries_describe_exactly_the_extent(
    cluster_bits: int, cluster: int, start: int, length: int
) -> None:
    g = Geometry(cluster_bits, False, True)
    cs = g.cluster_size
    start %= cs
    length = length % (cs - 1) + 1  # what compress_cluster may return
    host = (cluster << cluster_bits) + start
    entry = compressed_l2_entry(g, host, length)
    offset, nbytes = g.compressed_extent(entry)
    assert offset == host
    assert nbytes >= length  # the reader gets every byte of the extent
    assert (offset + nbytes) % 512 == 0  # ...and stops at the end of its last sector
    assert nbytes < length + 512
    first, span = g.compressed_clusters(entry)
    # references are dropped from exactly the host clusters the extent touches
    assert first >> cluster_bits == host >> cluster_bits
    assert (first + span - 1) >> cluster_bits == (host + length - 1) >> cluster_bits


@given(
    cs_bits=st.integers(9, 16),
    guest=st.integers(0, 1 << 24),
    length=st.integers(1, 1 << 20),
    slack=st.integers(0, 1 << 16),
)
def test_split_clusters_covers_the_request_and_marks_whole_clusters(
    cs_bits: int, guest: int, length: int, slack: int
) -> None:
    cs = 1 << cs_bits
    disk = guest + length + slack
    pieces = split_clusters(guest, length, cs, disk)
    assert pieces[0][0] == guest
    assert pieces[-1][1] == guest + length
    for (lo, hi, whole), nxt in zip(pieces, [*pieces[1:], None], strict=True):
        assert lo // cs == (hi - 1) // cs
        assert whole == (lo % cs == 0 and (hi - lo == cs or hi == disk))
        if nxt is not None:
            assert nxt[0] == hi


@given(st.integers(0, 200), st.integers(1, 8))
def test_batches_split_evenly(count: int, workers: int) -> None:
    parts = batches(count, workers)
    assert [i for lo, hi in parts for i in range(lo, hi)] == list(range(count))
    assert len(parts) <= workers
    if parts:
        sizes = [hi - lo for lo, hi in parts]
        assert max(sizes) - min(sizes) <= 1


def test_settings() -> None:
    assert parse_settings({}) is None
    assert parse_settings({"compress": False}) is None
    assert parse_settings({"compress": "off"}) is None
    assert parse_settings({"compress": True}) == CompressSettings()
    assert parse_settings(
        {"compress": "on", "compress_cache_size": "0", "compress_threads": 3}
    ) == CompressSettings(cache_size=0, threads=3)
    with pytest.raises(ConfigError):
        parse_settings({"compress": "maybe"})
    with pytest.raises(ConfigError):
        parse_settings({"compress": True, "compress_threads": 0})
    with pytest.raises(ConfigError):
        parse_settings({"compress": True, "compress_cache_size": "lots"})


# ---- the driver ----------------------------------------------------------------------


async def _image(tmp_path: Path, size: int, name: str = "disk.qcow2", **opts: str) -> Path:
    path = tmp_path / name
    await create_image(str(path), size, dict(opts))
    return path


async def _open(path: Path, **settings: Any) -> tuple[BlockDevice, Any]:
    chain = await open_chain(
        str(path), ChainOptions(read_only=False, settings={"compress": True, **settings})
    )
    return BlockDevice(chain.top), chain


async def _read_back(path: Path, size: int) -> bytes:
    chain = await open_chain(str(path), ChainOptions(read_only=True))
    try:
        return await BlockDevice(chain.top).read(0, size)
    finally:
        await chain.aclose()


async def _assert_clean(path: Path) -> int:
    report = await check_image(str(path), None)
    assert report.corruptions == 0, report.messages
    assert report.leaks == 0, report.messages
    assert report.check_errors == 0, report.messages
    return report.compressed_clusters


CASES = {
    "zlib-64k": {"cluster_size": "64K"},
    "zstd-64k": {"cluster_size": "64K", "compression_type": "zstd"},
    "zlib-4k": {"cluster_size": "4K"},
    "zlib-512": {"cluster_size": "512"},
    "zstd-extl2": {"cluster_size": "64K", "extended_l2": "on", "compression_type": "zstd"},
    "v2": {"cluster_size": "16K", "compat": "0.10"},
    "refcount1": {"cluster_size": "16K", "refcount_bits": "1"},
    "refcount64": {"cluster_size": "16K", "refcount_bits": "64"},
}


@pytest.mark.parametrize("cache_size", [0, 1, 1 * MiB], ids=["nocache", "tiny", "1M"])
@pytest.mark.parametrize("case", sorted(CASES))
async def test_random_writes_keep_data_and_exact_refcounts(
    tmp_path: Path, case: str, cache_size: int
) -> None:
    opts = CASES[case]
    cs = int(opts["cluster_size"].replace("K", "")) * (1024 if "K" in opts["cluster_size"] else 1)
    size = 64 * cs + 1536  # a partial last cluster
    path = await _image(tmp_path, size, **opts)
    rng = random.Random(f"{case}-{cache_size}")
    model = bytearray(size)
    dev, chain = await _open(path, compress_cache_size=cache_size)
    try:
        for _ in range(50):
            roll = rng.random()
            off = rng.randrange(size)
            if rng.random() < 0.6:
                off -= off % cs
            n = rng.randint(1, min(size - off, 5 * cs))
            if roll < 0.7:
                data = compressible(rng, n) if rng.random() < 0.85 else rng.randbytes(n)
                await dev.write(off, data)
                model[off : off + n] = data
            elif roll < 0.8:
                await dev.write_zeroes(off, n, may_unmap=rng.random() < 0.5)
                model[off : off + n] = bytes(n)
            elif roll < 0.9:
                await dev.discard(off, n)
                model[off : off + n] = await dev.read(off, n)
            else:
                await dev.flush()
        assert await dev.read(0, size) == bytes(model)
    finally:
        await chain.aclose()
    compressed = await _assert_clean(path)
    if opts.get("refcount_bits") != "1":
        assert compressed > 0
    assert await _read_back(path, size) == bytes(model)


async def test_whole_clusters_are_compressed_and_partial_writes_decompress_them(
    tmp_path: Path,
) -> None:
    cs = 65536
    path = await _image(tmp_path, 16 * cs, cluster_size="64K")
    rng = random.Random(5)
    data = compressible(rng, 8 * cs)
    dev, chain = await _open(path)
    try:
        await dev.write(0, data)
        top = chain.top
        assert isinstance(top, Qcow2Driver)
        assert top.statistics().extra["compressed_clusters_written"] == 8
        await dev.flush()
        assert await _assert_clean_open(path) == 8
        # a partial write turns one compressed cluster into a normal one
        patch = b"\xee" * 1000
        await dev.write(3 * cs + 100, patch)
        expected = bytearray(data)
        expected[3 * cs + 100 : 3 * cs + 1100] = patch
        assert await dev.read(0, 8 * cs) == bytes(expected)
    finally:
        await chain.aclose()
    assert await _assert_clean(path) == 7
    assert await _read_back(path, 16 * cs) == bytes(expected) + bytes(8 * cs)
    # the same writes without compression take more room
    plain = await _image(tmp_path, 16 * cs, "plain.qcow2", cluster_size="64K")
    chain = await open_chain(str(plain), ChainOptions(read_only=False))
    try:
        await BlockDevice(chain.top).write(0, bytes(expected))
    finally:
        await chain.aclose()
    assert path.stat().st_size <= plain.stat().st_size - 2 * cs


async def _assert_clean_open(path: Path) -> int:
    """Check a copy of an image that is open (after a flush it must be clean)."""
    copy = path.with_suffix(".copy")
    shutil.copyfile(path, copy)
    try:
        return await _assert_clean(copy)
    finally:
        copy.unlink()


async def test_cached_extents_are_read_before_they_reach_the_file(tmp_path: Path) -> None:
    cs = 65536
    path = await _image(tmp_path, 16 * cs, cluster_size="64K")
    data = compressible(random.Random(6), cs)
    dev, chain = await _open(path)
    try:
        await dev.write(0, data)
        top = chain.top
        assert isinstance(top, Qcow2Driver)
        assert top.statistics().extra["compress_cache_writes"] == 0  # still in the cache
        assert await dev.read(0, cs) == data
        await dev.flush()
        assert top.statistics().extra["compress_cache_writes"] >= 1
    finally:
        await chain.aclose()
    assert (await _read_back(path, 16 * cs))[:cs] == data


async def test_an_l2_table_never_reaches_the_file_before_its_extents(tmp_path: Path) -> None:
    """A copy of the file between requests is a crash image.  Small extents stay in
    the open cache cluster for many requests while a two-table L2 cache evicts (writes)
    the tables pointing at them; every cluster the copy maps must read as a value that
    was written, never as garbage or a decompression error."""
    cs = 65536
    span = cs * cs // 8  # guest bytes per L2 table
    size = 8 * span
    path = await _image(tmp_path, size, cluster_size="64K")
    rng = random.Random(7)
    history: dict[int, set[bytes]] = {}
    dev, chain = await _open(path, l2_cache_size=2 * cs, compress_cache_size=MiB)
    try:
        for step in range(10):
            for _ in range(6):
                cluster = rng.randrange(8) * (span // cs) + rng.randrange(span // cs)
                data = bytes([rng.randrange(256)]) * (cs // 2) + compressible(rng, cs // 16)
                data += bytes(cs - len(data))
                await dev.write(cluster * cs, data)
                history.setdefault(cluster, {bytes(cs)}).add(data)
            copy = tmp_path / f"crash{step}.qcow2"
            shutil.copyfile(path, copy)
            report = await check_image(str(copy), None)
            assert report.corruptions == 0, report.messages
            crashed = await open_chain(str(copy), ChainOptions(read_only=True))
            try:
                for cluster, values in history.items():
                    got = await BlockDevice(crashed.top).read(cluster * cs, cs)
                    assert got in values, (step, cluster)
            finally:
                await crashed.aclose()
            copy.unlink()
        top = chain.top
        assert isinstance(top, Qcow2Driver)
        assert top.statistics().extra["l2_evictions"] > 0
    finally:
        await chain.aclose()
    await _assert_clean(path)


async def test_freed_cached_clusters_are_dropped_before_reuse(tmp_path: Path) -> None:
    """Discarding the only compressed cluster in a cached host cluster frees it; the
    next allocation may reuse that host cluster for normal data, which the cache must
    not overwrite later."""
    cs = 65536
    path = await _image(tmp_path, 32 * cs, cluster_size="64K")
    rng = random.Random(8)
    dev, chain = await _open(path)
    try:
        top = chain.top
        assert isinstance(top, Qcow2Driver)
        first = compressible(rng, cs)
        await dev.write(0, first)
        await dev.discard(0, cs)
        assert top.statistics().extra["compress_cache_clusters"] == 0
        noise = rng.randbytes(2 * cs)  # incompressible: normal clusters
        await dev.write(4 * cs, noise)
        second = compressible(rng, cs)
        await dev.write(8 * cs, second)
        await dev.flush()
        assert await dev.read(4 * cs, 2 * cs) == noise
        assert await dev.read(8 * cs, cs) == second
    finally:
        await chain.aclose()
    await _assert_clean(path)
    got = await _read_back(path, 32 * cs)
    assert got[4 * cs : 6 * cs] == noise
    assert got[8 * cs : 9 * cs] == second


async def test_concurrent_writers_respect_the_cache_bound(tmp_path: Path) -> None:
    cs = 16384
    size = 256 * cs
    path = await _image(tmp_path, size, cluster_size="16K")
    rng = random.Random(9)
    chunks = [compressible(rng, 8 * cs) for _ in range(32)]
    dev, chain = await _open(path, compress_cache_size=1)
    top = chain.top
    assert isinstance(top, Qcow2Driver)
    assert top._compress is not None
    cache = top._compress.cache
    assert cache is not None
    highest = 0
    original = cache.append

    def watched(host: int, data: bytes) -> None:
        nonlocal highest
        original(host, data)
        highest = max(highest, cache.active_count)

    cache.append = watched  # type: ignore[method-assign,assignment]
    try:
        async with trio.open_nursery() as nursery:
            for i, chunk in enumerate(chunks):
                nursery.start_soon(dev.write, i * 8 * cs, chunk)
        assert await dev.read(0, size) == b"".join(chunks)
        await dev.flush()
    finally:
        await chain.aclose()
    assert highest <= cache.max_active == 2
    assert cache.full_writes > 0
    await _assert_clean(path)
    assert await _read_back(path, size) == b"".join(chunks)


async def test_compression_runs_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each cluster's compression waits until a trio task, which can only run while the
    event loop is free, lets it go: inline compression would time out the wait.  The
    compressing thread is recorded too, and must not be the trio thread."""
    import threading

    from nbdserve.block.qcow2 import compress as compress_module

    cs = 256 * 1024
    path = await _image(tmp_path, 16 * cs, cluster_size="256K")
    data = compressible(random.Random(10), 4 * cs)
    trio_thread = threading.get_ident()
    started = threading.Event()
    release = threading.Event()
    threads: list[int] = []
    blocked_loop: list[int] = []
    real = compress_module.compress_cluster

    def observed(*args: Any, **kwargs: Any) -> bytes | None:
        threads.append(threading.get_ident())
        started.set()
        if not release.wait(timeout=2.0):  # nobody on the event loop could answer
            blocked_loop.append(len(threads))
        return real(*args, **kwargs)

    monkeypatch.setattr(compress_module, "compress_cluster", observed)
    dev, chain = await _open(path, compress_threads=1)
    ticks_while_compressing = 0
    try:
        async with trio.open_nursery() as nursery:

            async def releaser() -> None:
                nonlocal ticks_while_compressing
                while True:
                    if started.is_set():
                        ticks_while_compressing += 1
                        release.set()
                    await trio.sleep(0.001)

            nursery.start_soon(releaser)
            await dev.write(0, data)
            nursery.cancel_scope.cancel()
    finally:
        await chain.aclose()
    assert len(threads) == 4
    assert blocked_loop == [], "compression blocked the event loop"
    assert trio_thread not in threads
    assert ticks_while_compressing > 0
    assert await _read_back(path, 4 * cs) == data


async def test_external_data_files_refuse_compress(tmp_path: Path) -> None:
    path = await _image(tmp_path, MiB, data_file="disk.data")
    with pytest.raises(ConfigError):
        await _open(path)


async def test_cancelled_compressed_writes_leave_a_clean_image(tmp_path: Path) -> None:
    cs = 65536
    path = await _image(tmp_path, 64 * cs, cluster_size="64K")
    rng = random.Random(11)
    dev, chain = await _open(path, compress_cache_size=2 * cs)
    try:
        for i in range(20):
            with trio.move_on_after(0.0005 * i):
                await dev.write(rng.randrange(56) * cs, compressible(rng, 4 * cs))
    finally:
        await chain.aclose()
    await _assert_clean(path)


async def test_concurrent_unaligned_direct_appends_keep_every_byte(tmp_path: Path) -> None:
    """Uncached compressed extents are small unaligned appends; with O_DIRECT each one
    pads to the alignment and truncates back, which must never cut another's bytes,
    and reading the unaligned last block must work (FileBackend regression)."""
    from nbdserve.block.file import FileBackend
    from nbdserve.errors import NotSupportedError

    path = tmp_path / "appends"
    path.write_bytes(b"")
    try:
        file = FileBackend.open(str(path), read_only=False, direct=True)
    except NotSupportedError:
        pytest.skip("this file system refuses O_DIRECT")
    rng = random.Random(12)
    chunks = [bytes([i % 251 + 1]) * rng.randrange(300, 900) for i in range(64)]
    offsets = [sum(map(len, chunks[:i])) for i in range(len(chunks))]
    order = list(range(len(chunks)))
    rng.shuffle(order)
    try:
        async with trio.open_nursery() as nursery:
            for i in order:
                nursery.start_soon(file.pwrite, offsets[i], chunks[i])
        total = sum(map(len, chunks))
        assert file.size == total
        assert await file.pread(total - 100, 100) == chunks[-1][-100:]
    finally:
        await file.aclose()
    assert path.read_bytes() == b"".join(chunks)


@pytest.mark.parametrize("cache_size", [0, MiB], ids=["nocache", "cache"])
async def test_a_failed_extent_write_fails_the_request_and_leaks_nothing(
    tmp_path: Path, cache_size: int
) -> None:
    """One failing data write.  Without the cache it fails the request and the
    extents' space is released; with it the failed cluster write (at the request that
    filled the cluster, or at FLUSH) keeps the bytes cached and the next flush
    writes them."""
    from nbdserve.errors import HostIOError

    cs = 65536
    path = await _image(tmp_path, 16 * cs, cluster_size="64K")
    rng = random.Random(13)
    first, second = compressible(rng, 2 * cs), compressible(rng, 2 * cs)
    dev, chain = await _open(path, compress_cache_size=cache_size)
    top = chain.top
    assert isinstance(top, Qcow2Driver)
    real = top.data_file.pwrite
    failures: list[int] = []

    async def fail_once(offset: int, data: Any) -> None:
        if not failures:
            failures.append(offset)
            await trio.lowlevel.checkpoint()
            raise HostIOError("injected write error", 5)
        await real(offset, data)

    try:
        await dev.write(0, first)
        await dev.flush()
        top.data_file.pwrite = fail_once  # type: ignore[method-assign]
        if cache_size:
            try:
                await dev.write(4 * cs, second)
                await dev.flush()
            except HostIOError:
                pass
            await dev.flush()
        else:
            with pytest.raises(HostIOError):
                await dev.write(4 * cs, second)
            second = bytes(2 * cs)
        assert failures
        assert await dev.read(4 * cs, 2 * cs) == second
        await dev.flush()
    finally:
        top.data_file.pwrite = real  # type: ignore[method-assign]
        await chain.aclose()
    await _assert_clean(path)
    got = await _read_back(path, 16 * cs)
    assert got[: 2 * cs] == first
    assert got[4 * cs : 6 * cs] == second


async def test_concurrent_overlapping_writers_leave_a_serial_outcome(tmp_path: Path) -> None:
    """The driver contract's concurrency check with compress = true: whole-cluster
    writes (compressed) race with partial ones (decompress, merge, rewrite) over the
    same clusters, and the result is what some serial order gives."""
    cs = 16384
    path = await _image(tmp_path, 64 * cs, cluster_size="16K")
    whole: dict[int, set[int]] = {}
    partial: dict[int, set[int]] = {}
    dev, chain = await _open(path, compress_cache_size=2 * cs)
    try:
        async with trio.open_nursery() as nursery:
            for i in range(80):
                block = (i % 8) * 2 * cs
                value = i + 1
                if i % 3:
                    whole.setdefault(block, set()).add(value)
                    nursery.start_soon(dev.write, block, bytes([value]) * (2 * cs))
                else:
                    partial.setdefault(block, set()).add(value)
                    nursery.start_soon(dev.write, block + cs // 2, bytes([value]) * cs)
        for block, values in whole.items():
            got = await dev.read(block, 2 * cs)
            a, b, c = got[0], got[cs], got[-1]
            assert got == bytes([a]) * (cs // 2) + bytes([b]) * cs + bytes([c]) * (cs // 2)
            assert a == c, f"block {block}: the edges come from different writes"
            assert a in values
            assert b == a or b in partial.get(block, set())
    finally:
        await chain.aclose()
    await _assert_clean(path)


async def test_compressed_writes_checkpoint(tmp_path: Path) -> None:
    cs = 65536
    path = await _image(tmp_path, 16 * cs, cluster_size="64K")
    _dev, chain = await _open(path)
    top = chain.top
    try:
        with trio.testing.assert_checkpoints():
            await top.write(0, compressible(random.Random(15), cs))
        with trio.testing.assert_checkpoints():
            await top.readinto(0, memoryview(bytearray(4096)))
        with trio.testing.assert_checkpoints():
            await top.flush()
    finally:
        await chain.aclose()
