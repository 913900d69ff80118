from __future__ import annotations

from pathlib import Path

import trio

from nbdserve.block.check import EXIT_CLEAN, EXIT_CORRUPT, EXIT_LEAKS
from nbdserve.block.device import BlockDevice
from nbdserve.block.parallels import check_image
from nbdserve.block.parallels.structs import INUSE_MAGIC
from tests.conftest import require_tools
from tests.unit.block.parallels.images import (
    header_fields,
    new_image,
    open_driver,
    patch_bat,
    patch_header,
    read_bat,
)

CS = 64 * 1024
DATA_START = 64 * 1024


async def written_image(tmp_path: Path) -> Path:
    path = await new_image(tmp_path / "disk.img", 64 << 20, CS)
    drv = await open_driver(path)
    await drv.write(CS, b"1" * CS)  # cluster 1 first: host slot 0
    await drv.write(0, b"0" * CS)  # cluster 0: host slot 1 -> fragmented
    await drv.write(5 * CS, b"5" * CS)
    await drv.aclose()
    return path


async def qemu_check_status(path: Path) -> int:
    require_tools("qemu-img")
    result = await trio.run_process(
        ["qemu-img", "check", "-f", "parallels", str(path)], capture_stdout=True, check=False
    )
    return result.returncode


async def test_clean_image_statistics(tmp_path: Path) -> None:
    path = await written_image(tmp_path)
    report = await check_image(str(path), None)
    assert report.exit_status() == EXIT_CLEAN
    assert (report.total_clusters, report.allocated_clusters) == (1024, 3)
    assert report.fragmented_clusters == 1
    assert report.image_end_offset == DATA_START + 3 * CS == path.stat().st_size


async def test_fresh_image_has_no_leak(tmp_path: Path) -> None:
    path = await new_image(tmp_path / "fresh.img", 64 << 20, 4096)
    assert (await check_image(str(path), None)).exit_status() == EXIT_CLEAN


async def test_unclean_flag_repair(tmp_path: Path) -> None:
    path = await written_image(tmp_path)
    patch_header(path, inuse=INUSE_MAGIC)
    report = await check_image(str(path), None)
    assert report.exit_status() == EXIT_CORRUPT
    assert any("not closed correctly" in m for m in report.messages)
    assert await qemu_check_status(path) == EXIT_CORRUPT  # qemu agrees
    assert (await check_image(str(path), "leaks")).exit_status() == EXIT_CORRUPT
    report = await check_image(str(path), "all")
    assert report.corruptions_fixed == 1
    assert report.exit_status() == EXIT_CLEAN
    assert header_fields(path)["inuse"] == 0
    assert await qemu_check_status(path) == EXIT_CLEAN
    drv = await open_driver(path)  # writable again
    await drv.aclose()


async def test_entry_outside_image_repair(tmp_path: Path) -> None:
    path = await written_image(tmp_path)
    patch_bat(path, 7, 5000)
    report = await check_image(str(path), None)
    assert report.exit_status() == EXIT_CORRUPT
    assert "ERROR cluster 7 is outside image" in report.messages
    assert await qemu_check_status(path) == EXIT_CORRUPT
    report = await check_image(str(path), "all")
    assert report.exit_status() == EXIT_CLEAN
    assert read_bat(path, 7) == 0
    assert read_bat(path, 5) != 0
    assert await qemu_check_status(path) == EXIT_CLEAN


async def test_entry_inside_metadata_repair(tmp_path: Path) -> None:
    path = await new_image(tmp_path / "small.img", 64 << 20, 4096)  # data starts at cluster 17
    drv = await open_driver(path)
    await drv.write(0, b"d" * 4096)
    await drv.aclose()
    patch_bat(path, 2, 3)  # host cluster 3 lies inside the BAT
    ro = await open_driver(path, read_only=True)  # served read-only
    await ro.aclose()
    report = await check_image(str(path), None)
    assert report.exit_status() == EXIT_CORRUPT
    assert "ERROR cluster 2 is inside the header/BAT" in report.messages
    assert (await check_image(str(path), "all")).exit_status() == EXIT_CLEAN
    assert read_bat(path, 2) == 0
    assert read_bat(path, 0) == 17


async def test_leak_repair(tmp_path: Path) -> None:
    path = await written_image(tmp_path)
    with path.open("ab") as f:
        f.write(b"junk" * 40_000)
    report = await check_image(str(path), None)
    assert report.exit_status() == EXIT_LEAKS
    assert report.leaks == -(-160_000 // CS)
    assert await qemu_check_status(path) == EXIT_LEAKS
    report = await check_image(str(path), "leaks")
    assert report.leaks_fixed == 3
    assert report.exit_status() == EXIT_CLEAN
    assert path.stat().st_size == DATA_START + 3 * CS


async def test_duplicate_repair_copies_the_cluster(tmp_path: Path) -> None:
    path = await written_image(tmp_path)
    patch_bat(path, 9, read_bat(path, 5))
    report = await check_image(str(path), None)
    assert report.exit_status() == EXIT_CORRUPT
    assert "ERROR duplicate offset in BAT entry 9" in report.messages
    report = await check_image(str(path), "all")
    assert report.exit_status() == EXIT_CLEAN
    assert read_bat(path, 9) not in (0, read_bat(path, 5))
    drv = await open_driver(path)
    dev = BlockDevice(drv)
    await dev.write(5 * CS, b"x" * 10)
    assert await dev.read(9 * CS, CS) == b"5" * CS
    await dev.aclose()
    assert await qemu_check_status(path) == EXIT_CLEAN
