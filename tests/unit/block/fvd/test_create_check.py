"""create_image options and check_image findings and repairs."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from nbdserve.block.file import FileBackend
from nbdserve.block.fvd import read_header
from nbdserve.block.fvd.check import check_fvd
from nbdserve.block.fvd.structs import HEADER_FIELD_OFFSETS, FvdHeader
from nbdserve.errors import ConfigError

from .helpers import KIB, MIB, make_base, make_image, open_image


async def header(path: Path) -> FvdHeader:
    f = FileBackend.open(str(path), read_only=True)
    try:
        return await read_header(f)
    finally:
        await f.aclose()


async def test_creation_defaults(tmp_path: Path) -> None:
    make_base(tmp_path / "base.raw", 3 * MIB)
    await make_image(tmp_path / "img.fvd", 8 * MIB, "base.raw")
    h = await header(tmp_path / "img.fvd")
    assert (h.block_size, h.journal_size, h.storage_grow_unit) == (64 * KIB, 16 * MIB, 64 * MIB)
    assert h.copy_on_read == 1
    assert h.prefetch_start_delay == -1
    assert (h.num_prefetch_slots, h.bytes_per_prefetch, h.prefetch_throttle_time) == (2, MIB, 1000)
    assert h.prefetch_min_read_throughput == h.prefetch_min_write_throughput == 1024
    assert h.prefetch_max_read_throughput == h.prefetch_max_write_throughput == 0
    assert (
        h.prefetch_read_throughput_measure_time == h.prefetch_write_throughput_measure_time == 1000
    )
    assert h.base_img_size == 3 * MIB
    assert not h.compact
    assert h.clean_shutdown == 1
    await make_image(tmp_path / "plain.fvd", MIB, compact="on")
    p = await header(tmp_path / "plain.fvd")
    assert (p.chunk_size, p.copy_on_read, p.has_base) == (MIB, 0, False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bogus": "1"}, "unknown fvd option 'bogus'"),
        ({"block_size": "3000"}, "block_size 3000 must be a power of two"),
        ({"compact": "on", "chunk_size": "100k"}, "chunk_size .* multiple of 4096"),
        ({"compact": "maybe"}, "compact must be on or off"),
        ({"journal_size": "1000"}, "journal_size must be a multiple of 512"),
        ({"num_prefetch_slots": "x"}, "num_prefetch_slots must be an integer"),
    ],
)
async def test_bad_create_options(tmp_path: Path, options: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        await make_image(tmp_path / "img.fvd", MIB, **options)


async def test_virtual_size_rounds_up_and_base_is_clipped(tmp_path: Path) -> None:
    make_base(tmp_path / "base.raw", 2 * MIB)
    await make_image(tmp_path / "img.fvd", MIB + 1, "base.raw")
    h = await header(tmp_path / "img.fvd")
    assert h.virtual_disk_size == MIB + 512
    assert h.base_img_size == MIB + 512


async def test_check_clean_image(tmp_path: Path) -> None:
    make_base(tmp_path / "base.raw", MIB)
    await make_image(tmp_path / "img.fvd", 4 * MIB, "base.raw", compact="on", chunk_size="64k")
    chain, dev = await open_image(tmp_path / "img.fvd")
    await dev.write(2 * MIB, b"x" * 100 * KIB)
    await chain.aclose()
    report = await check_fvd(str(tmp_path / "img.fvd"), None)
    assert report.exit_status() == 0
    assert report.total_clusters == 64
    assert report.allocated_clusters == 2


async def write_table(path: Path, entries: list[int]) -> None:
    h = await header(path)
    with open(path, "r+b") as f:
        f.seek(h.table_offset)
        f.write(np.array(entries, dtype="<u4").tobytes())


async def test_check_finds_and_repairs_leaks(tmp_path: Path) -> None:
    await make_image(tmp_path / "img.fvd", 4 * MIB, compact="on", chunk_size="64k")
    chain, dev = await open_image(tmp_path / "img.fvd")
    for i in range(4):
        await dev.write(i * 64 * KIB, bytes([i + 1]) * 64 * KIB)
    await chain.aclose()
    await write_table(tmp_path / "img.fvd", [0xFFFFFFFF, 1, 0xFFFFFFFF, 3])
    report = await check_fvd(str(tmp_path / "img.fvd"), None)
    assert (report.leaks, report.corruptions, report.exit_status()) == (2, 0, 3)
    report = await check_fvd(str(tmp_path / "img.fvd"), "leaks")
    assert report.leaks_fixed == 2
    # leaked chunks are reused before the store grows
    chain, dev = await open_image(tmp_path / "img.fvd")
    size_before = chain.top.file.size if chain.top.file else 0
    await dev.write(10 * 64 * KIB, b"n" * 4096)
    await dev.write(11 * 64 * KIB, b"m" * 4096)
    assert (chain.top.file.size if chain.top.file else 0) == size_before
    assert await dev.read(64 * KIB, 64 * KIB) == bytes([2]) * 64 * KIB
    assert await dev.read(10 * 64 * KIB, 4096) == b"n" * 4096
    assert await dev.read(10 * 64 * KIB + 4096, 4096) == bytes(4096)  # reused chunk zeroed
    await chain.aclose()
    assert (await check_fvd(str(tmp_path / "img.fvd"), None)).exit_status() == 0


async def test_check_repairs_duplicates_by_copying(tmp_path: Path) -> None:
    await make_image(tmp_path / "img.fvd", 4 * MIB, compact="on", chunk_size="64k")
    chain, dev = await open_image(tmp_path / "img.fvd")
    await dev.write(0, b"a" * 64 * KIB)
    await dev.write(64 * KIB, b"b" * 64 * KIB)
    await chain.aclose()
    await write_table(tmp_path / "img.fvd", [0, 0])
    report = await check_fvd(str(tmp_path / "img.fvd"), None)
    assert report.corruptions == 1
    assert report.exit_status() == 2
    assert any("physical chunk 0 is mapped by chunks [0, 1]" in m for m in report.messages)
    report = await check_fvd(str(tmp_path / "img.fvd"), "all")
    assert report.corruptions_fixed == 1
    assert (await check_fvd(str(tmp_path / "img.fvd"), None)).exit_status() in (0, 3)
    chain, dev = await open_image(tmp_path / "img.fvd")
    assert await dev.read(0, 128 * KIB) == b"a" * 128 * KIB
    await dev.write(64 * KIB, b"c" * 512)  # the copies are independent now
    assert await dev.read(0, 512) == b"a" * 512
    await chain.aclose()


async def test_check_flags_false_fully_prefetched_and_stray_bits(tmp_path: Path) -> None:
    make_base(tmp_path / "base.raw", MIB - 64 * KIB)
    await make_image(tmp_path / "img.fvd", MIB, "base.raw")
    h = await header(tmp_path / "img.fvd")
    with open(tmp_path / "img.fvd", "r+b") as f:
        f.seek(HEADER_FIELD_OFFSETS["base_img_fully_prefetched"])
        f.write(struct.pack("<I", 1))
        f.seek(h.bitmap_offset + 1)
        f.write(b"\x80")  # block 15: past the 15 base blocks
    report = await check_fvd(str(tmp_path / "img.fvd"), None)
    assert report.corruptions == 2
    assert any("base_img_fully_prefetched is set" in m for m in report.messages)
    report = await check_fvd(str(tmp_path / "img.fvd"), "all")
    assert report.corruptions_fixed == 2
    assert (await check_fvd(str(tmp_path / "img.fvd"), None)).exit_status() == 0
    assert (await header(tmp_path / "img.fvd")).base_img_fully_prefetched == 0


async def test_check_reports_unclean_shutdown_and_repair_recovers(tmp_path: Path) -> None:
    from .helpers import crash

    make_base(tmp_path / "base.raw", MIB)
    await make_image(tmp_path / "img.fvd", MIB, "base.raw", copy_on_read="off")
    chain, dev = await open_image(tmp_path / "img.fvd")
    await dev.write(0, b"j" * 4096)
    await dev.flush()
    await crash(chain)
    report = await check_fvd(str(tmp_path / "img.fvd"), None)
    assert report.exit_status() == 0
    assert any("not closed cleanly" in m for m in report.messages)
    assert any("1 records applied" in m for m in report.messages)
    await check_fvd(str(tmp_path / "img.fvd"), "all")
    assert (await header(tmp_path / "img.fvd")).clean_shutdown == 1
    chain, dev = await open_image(tmp_path / "img.fvd", read_only=True)
    assert await dev.read(0, 4096) == b"j" * 4096
    await chain.aclose()
