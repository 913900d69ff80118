"""FvdDriver behaviour: COW, copy-on-read, compact storage, journal, recovery."""

from __future__ import annotations

import os
import random
import shutil
import stat
from pathlib import Path

import pytest
import trio

from nbdserve.block.base import Status
from nbdserve.block.fvd import FvdDriver
from nbdserve.block.fvd.check import check_fvd
from nbdserve.errors import NoSpaceError, NotSupportedError

from .helpers import KIB, MIB, crash, make_base, make_image, open_image

VARIANTS = [
    pytest.param({}, id="plain"),
    pytest.param({"compact": "on", "chunk_size": "256k"}, id="compact"),
    pytest.param({"data_file": "data.raw"}, id="data_file"),
    pytest.param(
        {"compact": "on", "data_file": "data.raw", "block_size": "4k"}, id="compact-data_file-4k"
    ),
]


def fvd(chain: object) -> FvdDriver:
    top = getattr(chain, "top")  # noqa: B009
    assert isinstance(top, FvdDriver)
    return top


@pytest.mark.parametrize("opts", VARIANTS)
@pytest.mark.parametrize("with_base", [True, False])
async def test_read_after_write_and_reopen(
    tmp_path: Path, opts: dict[str, str], with_base: bool
) -> None:
    size = 4 * MIB
    base = make_base(tmp_path / "base.raw", 3 * MIB) if with_base else b""
    model = bytearray(base) + bytearray(size - len(base))
    await make_image(
        tmp_path / "img.fvd", size, "base.raw" if with_base else None, copy_on_read="off", **opts
    )
    rng = random.Random(3)
    chain, dev = await open_image(tmp_path / "img.fvd")
    for _ in range(60):
        off = rng.randrange(0, size - 1)
        n = min(rng.randrange(1, 300 * KIB), size - off)
        data = rng.randbytes(n)
        await dev.write(off, data)
        model[off : off + n] = data
    assert await dev.read(0, size) == model
    await chain.aclose()
    chain, dev = await open_image(tmp_path / "img.fvd", read_only=True)
    assert await dev.read(0, size) == model
    await chain.aclose()


async def test_partial_write_copies_the_rest_of_the_block_from_the_base(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.raw", MIB)
    await make_image(tmp_path / "img.fvd", MIB, "base.raw", copy_on_read="off", block_size="64k")
    chain, dev = await open_image(tmp_path / "img.fvd")
    await dev.write(70 * KIB, b"x" * 512)
    top = fvd(chain)
    assert top._bitmap is not None
    assert top._bitmap.is_set(1)
    assert not top._bitmap.is_set(0)
    assert not top._bitmap.is_set(2)
    assert top.statistics().extra["cow_blocks"] == 1
    await chain.aclose()
    # the base may now change: block 1 no longer depends on it
    (tmp_path / "base.raw").write_bytes(bytes(MIB))
    chain, dev = await open_image(tmp_path / "img.fvd")
    got = await dev.read(64 * KIB, 64 * KIB)
    expect = bytearray(base[64 * KIB : 128 * KIB])
    expect[6 * KIB : 6 * KIB + 512] = b"x" * 512
    assert got == expect
    assert await dev.read(0, 64 * KIB) == bytes(64 * KIB)  # block 0 still reads the base
    await chain.aclose()


async def test_copy_on_read_saves_whole_blocks(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.raw", MIB)
    await make_image(tmp_path / "img.fvd", MIB, "base.raw", block_size="64k")
    chain, dev = await open_image(tmp_path / "img.fvd")
    assert await dev.read(10 * KIB, 200 * KIB) == base[10 * KIB : 210 * KIB]
    top = fvd(chain)
    assert top._bitmap is not None
    # blocks 1 and 2 are whole inside the read; 0 and 3 are not
    assert [top._bitmap.is_set(i) for i in range(5)] == [False, True, True, False, False]
    await chain.aclose()
    (tmp_path / "base.raw").write_bytes(bytes(MIB))
    chain, dev = await open_image(tmp_path / "img.fvd")
    assert await dev.read(64 * KIB, 128 * KIB) == base[64 * KIB : 192 * KIB]
    await chain.aclose()


async def test_copy_on_read_never_overwrites_a_concurrent_client_write(tmp_path: Path) -> None:
    make_base(tmp_path / "base.raw", 4 * MIB)
    await make_image(tmp_path / "img.fvd", 4 * MIB, "base.raw", block_size="4k")
    chain, dev = await open_image(tmp_path / "img.fvd")
    rng = random.Random(7)

    async def read(block: int) -> None:
        for _ in range(rng.randrange(3)):
            await trio.lowlevel.checkpoint()
        await dev.read(block * 4 * KIB, 4 * KIB)

    async def write(block: int, data: bytes) -> None:
        for _ in range(rng.randrange(3)):
            await trio.lowlevel.checkpoint()
        await dev.write(block * 4 * KIB, data)

    async with trio.open_nursery() as bg:
        await bg.start(chain.top.run_background)  # stores run in the background
        expected = {}
        for block in range(200):
            data = bytes([block % 251 + 1]) * 4 * KIB
            expected[block] = data
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, block)
                nursery.start_soon(write, block, data)
        await trio.testing.wait_all_tasks_blocked()
        for block, data in expected.items():
            assert await dev.read(block * 4 * KIB, 4 * KIB) == data, block
        bg.cancel_scope.cancel()
    await chain.aclose()


async def test_copy_on_read_pauses_above_max_outstanding(tmp_path: Path) -> None:
    make_base(tmp_path / "base.raw", 2 * MIB)
    await make_image(
        tmp_path / "img.fvd",
        2 * MIB,
        "base.raw",
        block_size="64k",
        max_outstanding_copy_on_read_data="128k",
    )
    chain, dev = await open_image(tmp_path / "img.fvd")
    async with trio.open_nursery() as bg:
        await bg.start(chain.top.run_background)
        await dev.read(0, MIB)
        stats = fvd(chain).statistics().extra
        assert stats["cor_outstanding"] <= 128 * KIB
        assert stats["cor_skipped"] == MIB - 128 * KIB
        await trio.testing.wait_all_tasks_blocked()
        assert fvd(chain).statistics().extra["cor_bytes"] == 128 * KIB
        bg.cancel_scope.cancel()
    await chain.aclose()


async def test_compact_storage_grows_by_the_grow_unit(tmp_path: Path) -> None:
    await make_image(
        tmp_path / "img.fvd",
        64 * MIB,
        compact="on",
        chunk_size="64k",
        storage_grow_unit="1M",
        journal_size="64k",
    )
    chain, dev = await open_image(tmp_path / "img.fvd")
    top = fvd(chain)
    start = top._store.size
    assert start == top.header.data_offset
    await dev.write(40 * MIB, b"a" * 512)
    assert top._store.size == start + MIB
    for i in range(16):
        await dev.write(i * MIB, b"b" * 512)
    assert top._store.size == start + 2 * MIB  # 17 chunks of 64 KiB
    assert top._table is not None
    assert top._table.allocated_count() == 17
    assert await dev.read(40 * MIB, 512) == b"a" * 512
    await chain.aclose()


def _grow_script(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "grow.sh"
    script.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/grow.log\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.mark.parametrize("allowed", [False, True])
async def test_add_storage_cmd_runs_only_when_the_export_allows_it(
    tmp_path: Path, allowed: bool
) -> None:
    script = _grow_script(tmp_path, 'truncate -s +"$1" "$2"')
    await make_image(
        tmp_path / "img.fvd",
        8 * MIB,
        compact="on",
        chunk_size="64k",
        storage_grow_unit="1M",
        add_storage_cmd=str(script),
    )
    chain, dev = await open_image(tmp_path / "img.fvd", allow_add_storage_cmd=allowed)
    await dev.write(0, b"a" * 4096)
    await chain.aclose()
    log = tmp_path / "grow.log"
    if allowed:
        assert log.read_text().split() == [str(MIB), str(tmp_path / "img.fvd")]
    else:
        assert not log.exists()


async def test_failing_add_storage_cmd_is_enospc(tmp_path: Path) -> None:
    script = _grow_script(tmp_path, "exit 1")
    await make_image(
        tmp_path / "img.fvd", 8 * MIB, compact="on", chunk_size="64k", add_storage_cmd=str(script)
    )
    chain, dev = await open_image(tmp_path / "img.fvd", allow_add_storage_cmd=True)
    with pytest.raises(NoSpaceError, match="failed"):
        await dev.write(0, b"a" * 4096)
    assert await dev.read(0, 4096) == bytes(4096)
    await chain.aclose()


async def test_block_status_per_layer(tmp_path: Path) -> None:
    make_base(tmp_path / "base.raw", MIB)
    await make_image(
        tmp_path / "img.fvd",
        2 * MIB,
        "base.raw",
        compact="on",
        chunk_size="256k",
        copy_on_read="off",
    )
    chain, dev = await open_image(tmp_path / "img.fvd")
    await dev.write(128 * KIB, b"d" * 64 * KIB)
    await dev.write_zeroes(512 * KIB, 256 * KIB)
    ext = await chain.top.block_status(0, 2 * MIB)
    spans = [(e.offset, e.length, e.status) for e in ext]
    assert spans[0] == (0, 128 * KIB, Status.NONE)
    assert spans[1] == (128 * KIB, 64 * KIB, Status.ALLOCATED | Status.DATA)
    assert (512 * KIB, 256 * KIB, Status.ALLOCATED | Status.ZERO) in spans
    assert spans[-1][2] & Status.ALLOCATED
    assert spans[-1][0] + spans[-1][1] == 2 * MIB
    chained = await dev.block_status(0, 2 * MIB)
    assert chained[0].depth == 2
    assert chained[1].depth == 1
    await chain.aclose()


async def test_write_zeroes_over_base_blocks_and_fast_zero(tmp_path: Path) -> None:
    make_base(tmp_path / "base.raw", MIB)
    await make_image(tmp_path / "img.fvd", MIB, "base.raw", copy_on_read="off")
    chain, dev = await open_image(tmp_path / "img.fvd")
    await dev.write_zeroes(64 * KIB, 128 * KIB, fast=True)
    assert await dev.read(64 * KIB, 128 * KIB) == bytes(128 * KIB)
    with pytest.raises(NotSupportedError):
        await dev.write_zeroes(300 * KIB, 4 * KIB, fast=True)
    await dev.write_zeroes(300 * KIB, 4 * KIB)
    assert await dev.read(300 * KIB, 4 * KIB) == bytes(4 * KIB)
    await chain.aclose()


async def test_discard_of_base_blocks_keeps_base_content(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.raw", MIB)
    await make_image(tmp_path / "img.fvd", MIB, "base.raw", copy_on_read="off")
    chain, dev = await open_image(tmp_path / "img.fvd")
    await dev.write(0, b"w" * 64 * KIB)
    await dev.discard(0, MIB)
    assert await dev.read(64 * KIB, MIB - 64 * KIB) == base[64 * KIB :]
    assert await dev.read(0, 64 * KIB) in (b"w" * 64 * KIB, bytes(64 * KIB))
    await chain.aclose()


@pytest.mark.parametrize("opts", VARIANTS)
async def test_recovery_after_crash_replays_the_journal(
    tmp_path: Path, opts: dict[str, str]
) -> None:
    base = make_base(tmp_path / "base.raw", 2 * MIB)
    await make_image(tmp_path / "img.fvd", 4 * MIB, "base.raw", **opts)
    model = bytearray(base) + bytearray(2 * MIB)
    chain, dev = await open_image(tmp_path / "img.fvd")
    rng = random.Random(11)
    for _ in range(40):
        off = rng.randrange(0, 4 * MIB - 1)
        n = min(rng.randrange(1, 100 * KIB), 4 * MIB - off)
        data = rng.randbytes(n)
        await dev.write(off, data)
        model[off : off + n] = data
    await dev.flush()
    await crash(chain)
    report = await check_fvd(str(tmp_path / "img.fvd"), None)
    assert report.corruptions == 0
    # read-only: recovered in memory, file untouched
    before = (tmp_path / "img.fvd").read_bytes()
    chain, dev = await open_image(tmp_path / "img.fvd", read_only=True)
    assert await dev.read(0, 4 * MIB) == model
    await chain.aclose()
    assert (tmp_path / "img.fvd").read_bytes() == before
    chain, dev = await open_image(tmp_path / "img.fvd")
    assert fvd(chain)._recovered_records > 0
    assert await dev.read(0, 4 * MIB) == model
    await chain.aclose()
    report = await check_fvd(str(tmp_path / "img.fvd"), None)
    assert report.exit_status() == 0, report.messages


async def test_full_journal_checkpoints_and_moves_the_epoch(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.raw", 4 * MIB)
    await make_image(
        tmp_path / "img.fvd",
        4 * MIB,
        "base.raw",
        compact="on",
        chunk_size="64k",
        block_size="4k",
        journal_size="1k",
        copy_on_read="off",
    )
    model = bytearray(base)
    chain, dev = await open_image(tmp_path / "img.fvd")
    rng = random.Random(2)
    for i in range(300):
        off = rng.randrange(0, 1024) * 4 * KIB
        data = rng.randbytes(4 * KIB)
        await dev.write(off, data)
        model[off : off + 4 * KIB] = data
        if i % 3 == 0:
            await dev.flush()
    top = fvd(chain)
    assert top.statistics().extra["checkpoints"] > 3
    assert top.header.stable_journal_epoch > 3
    await dev.flush()
    await crash(chain)
    chain, dev = await open_image(tmp_path / "img.fvd")
    assert await dev.read(0, 4 * MIB) == model
    await chain.aclose()


async def test_image_without_journal_writes_metadata_on_flush(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.raw", MIB)
    await make_image(
        tmp_path / "img.fvd",
        2 * MIB,
        "base.raw",
        compact="on",
        journal_size="0",
        copy_on_read="off",
    )
    chain, dev = await open_image(tmp_path / "img.fvd")
    await dev.write(100 * KIB, b"q" * 5000)
    await dev.write(1536 * KIB, b"r" * 5000)
    await dev.flush()
    await crash(chain)
    chain, dev = await open_image(tmp_path / "img.fvd")
    expect = bytearray(base) + bytearray(MIB)
    expect[100 * KIB : 100 * KIB + 5000] = b"q" * 5000
    expect[1536 * KIB : 1536 * KIB + 5000] = b"r" * 5000
    assert await dev.read(0, 2 * MIB) == expect
    await chain.aclose()


class PowerLoss:
    """Records each file's content at every sync, in order: the states a power cut leaves.

    Cutting at timeline position k restores every file to its last synced
    content at or before k.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from nbdserve.block.file import FileBackend

        self.timeline: list[tuple[str, bytes]] = []
        original = FileBackend.sync
        timeline = self.timeline

        async def sync(backend: FileBackend) -> None:
            await original(backend)
            with open(backend.path, "rb") as f:
                timeline.append((backend.path, f.read()))

        monkeypatch.setattr(FileBackend, "sync", sync)

    def cut(self, k: int, originals: dict[Path, bytes]) -> None:
        for p, content in originals.items():
            latest = content
            for path, snap in self.timeline[:k]:
                if path == str(p):
                    latest = snap
            p.write_bytes(latest)


@pytest.mark.parametrize("opts", VARIANTS)
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_power_loss_keeps_flushed_writes_and_never_shows_garbage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opts: dict[str, str], seed: int
) -> None:
    """The ordering rule: a record never reaches disk before its data.

    At cut points all along the run, files go back to their last synced
    state; every 4 KiB unit must then hold its value as of the last FLUSH that
    completed before the cut, or a value written after that FLUSH.
    """
    unit = 4 * KIB
    size = 2 * MIB
    base = make_base(tmp_path / "base.raw", size, seed=seed)
    await make_image(tmp_path / "img.fvd", size, "base.raw", journal_size="2k", **opts)
    files = [tmp_path / "img.fvd"] + ([tmp_path / "data.raw"] if "data_file" in opts else [])
    originals = {p: p.read_bytes() for p in files}
    power = PowerLoss(monkeypatch)
    rng = random.Random(seed)
    current = [base[i : i + unit] for i in range(0, size, unit)]
    # (timeline position when the flush completed, state then); writes with their position
    flushes: list[tuple[int, list[bytes]]] = [(0, list(current))]
    writes: list[tuple[int, int, bytes]] = []  # (position when issued, unit, data)
    chain, dev = await open_image(tmp_path / "img.fvd")
    for step in range(rng.randrange(30, 80)):
        op = rng.random()
        if op < 0.15:
            await dev.flush()
            flushes.append((len(power.timeline), list(current)))
        elif op < 0.25:
            await dev.read(rng.randrange(0, size // unit) * unit, unit * rng.randrange(1, 20))
        else:
            first = rng.randrange(0, size // unit)
            count = min(rng.randrange(1, 24), size // unit - first)
            issued = len(power.timeline)
            for u in range(first, first + count):
                data = bytes([step % 250 + 1]) * 8 + rng.randbytes(unit - 8)
                current[u] = data
                writes.append((issued, u, data))
            await dev.write(first * unit, b"".join(current[first : first + count]))
    await crash(chain)
    cuts = sorted(
        {
            0,
            len(power.timeline),
            *rng.sample(range(len(power.timeline) + 1), min(12, len(power.timeline))),
        }
    )
    for k in cuts:
        power.cut(k, originals)
        mark, durable = max((f for f in flushes if f[0] <= k), key=lambda f: f[0])
        later: list[set[bytes]] = [set() for _ in durable]
        for issued, u, data in writes:
            if issued >= mark:
                later[u].add(data)
        chain, dev = await open_image(tmp_path / "img.fvd", read_only=True)
        got = await dev.read(0, size)
        await chain.aclose()
        for u in range(size // unit):
            value = got[u * unit : (u + 1) * unit]
            assert value == durable[u] or value in later[u], f"cut {k}: unit {u} holds garbage"


async def test_prefetch_to_completion_in_process(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.raw", 3 * MIB + 512)
    await make_image(
        tmp_path / "img.fvd",
        4 * MIB,
        "base.raw",
        block_size="64k",
        bytes_per_prefetch="256k",
        prefetch_start_delay="0",
    )
    chain, dev = await open_image(tmp_path / "img.fvd")
    top = fvd(chain)
    async with trio.open_nursery() as bg:
        await bg.start(top.run_background)
        assert top.prefetcher is not None
        with trio.fail_after(30):
            await top.prefetcher.done.wait()
        bg.cancel_scope.cancel()
    assert top.prefetcher.state.value == "done"
    assert top.header.base_img_fully_prefetched == 1
    assert top.prefetch_progress() == (3 * MIB + 512, 3 * MIB + 512)
    await chain.aclose()
    os.unlink(tmp_path / "base.raw")
    chain, dev = await open_image(tmp_path / "img.fvd")
    assert len(chain.layers) == 1
    assert chain.top.backing_reference is None
    assert await dev.read(0, 4 * MIB) == base + bytes(4 * MIB - len(base))
    await chain.aclose()


async def test_images_copy_with_shutil_stay_valid(tmp_path: Path) -> None:
    """A closed image is self-contained: its journal is empty and the flag clean."""
    make_base(tmp_path / "base.raw", MIB)
    await make_image(tmp_path / "img.fvd", MIB, "base.raw")
    chain, dev = await open_image(tmp_path / "img.fvd")
    await dev.write(0, b"z" * 4096)
    await chain.aclose()
    shutil.copy(tmp_path / "img.fvd", tmp_path / "copy.fvd")
    report = await check_fvd(str(tmp_path / "copy.fvd"), None)
    assert report.exit_status() == 0


async def test_cache_copies_base_blocks_into_the_image(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.raw", MIB)
    await make_image(tmp_path / "img.fvd", MIB, "base.raw", copy_on_read="off")
    chain, dev = await open_image(tmp_path / "img.fvd")
    await dev.cache(100 * KIB, 200 * KIB)
    top = fvd(chain)
    assert top._bitmap is not None
    assert [top._bitmap.is_set(i) for i in range(6)] == [False, True, True, True, True, False]
    await chain.aclose()
    (tmp_path / "base.raw").write_bytes(bytes(MIB))
    chain, dev = await open_image(tmp_path / "img.fvd")
    assert await dev.read(64 * KIB, 256 * KIB) == base[64 * KIB : 320 * KIB]
    await chain.aclose()
