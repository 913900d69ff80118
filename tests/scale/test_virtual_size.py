"""Serving cost follows the data and metadata touched, not the virtual size (issue 10).

Each test builds the same data at 1 GiB and at 16 TiB virtual size (sparse:
cheap to create) and compares what opening and mapping cost, as counts:
bytes read from the image, memory held (tracemalloc), block-status calls,
and the drivers' work counters.  A driver that read or held a table in
proportion to the virtual size, or walked a huge empty range entry by entry,
fails these by orders of magnitude; the margins only absorb what is inherent
and small (qcow2's L1 table, 8 bytes per 512 MiB; the FVD table region,
read once at open because nothing says which of its pages are used).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nbdserve.block.base import ChainExtent
from nbdserve.block.device import BlockDevice
from nbdserve.block.pagedtable import PAGE_BYTES
from tests.conftest import require_tools
from tests.scale.costs import (
    GiB,
    KiB,
    MiB,
    TiB,
    data_extents,
    make_fvd,
    make_parallels,
    make_qcow2,
    measure,
    opened,
    packed,
    spread,
)

pytestmark = pytest.mark.interop

SMALL, HUGE = 1 * GiB, 16 * TiB
PIECES = packed(8, 1 * MiB)  # the same 8 MiB of data, inside the first GiB


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tools("qemu-img", "qemu-io")


async def build(fmt: str, path: Path, size: int) -> Path:
    if fmt == "qcow2":
        return await make_qcow2(path, size, PIECES)
    if fmt == "parallels":
        return await make_parallels(path, size, PIECES)
    return await make_fvd(path, size, PIECES[0::2], PIECES[1::2])


@pytest.mark.parametrize("fmt", ["qcow2", "parallels", "fvd"])
async def test_same_data_costs_the_same_at_16_tib(tmp_path: Path, fmt: str) -> None:
    small = await measure(await build(fmt, tmp_path / f"small.{fmt}", SMALL))
    huge = await measure(await build(fmt, tmp_path / f"huge.{fmt}", HUGE))

    # both maps find exactly the data that was written
    assert data_extents(small.extents) == data_extents(huge.extents) == list(PIECES)
    # one request answers the whole disk, however large (unallocated = one extent)
    assert small.map_calls == huge.map_calls == 1
    assert len(huge.extents) <= len(small.extents) + 1
    # the map reads no more metadata at 16 TiB (qcow2: the same L2 tables)
    assert huge.map_bytes <= small.map_bytes + 64 * KiB
    # memory held after open and after the map: what the data needs, plus qcow2's
    # L1 table (256 KiB at 16 TiB) -- not a table per virtual cluster
    assert huge.open_memory <= small.open_memory + 512 * KiB, (huge.open_memory, small.open_memory)
    assert huge.map_memory <= small.map_memory + 512 * KiB, (huge.map_memory, small.map_memory)
    if fmt == "qcow2":
        assert huge.open_bytes <= small.open_bytes + 256 * KiB + 64 * KiB
        for key in ("l2_misses", "l2_tables_mapped", "l2_units_classified"):
            assert huge.work(key) <= small.work(key), key
    elif fmt == "parallels":
        assert huge.work("bat_pages_present") == small.work("bat_pages_present") == 1
        # entries are looked at in the pages holding data, not across 16M entries
        assert huge.work("bat_entries_scanned") <= small.work("bat_entries_scanned") + 3 * (
            PAGE_BYTES // 4
        )
    else:
        for key in ("bitmap_bytes_resident", "table_bytes_resident"):
            assert huge.work(key) == small.work(key), key
        assert huge.work("table_entries_scanned") <= small.work("table_entries_scanned") + 3 * (
            PAGE_BYTES // 4
        )


@pytest.mark.parametrize("fmt", ["qcow2", "parallels"])
async def test_scattered_data_costs_follow_the_pieces(tmp_path: Path, fmt: str) -> None:
    """Data spread over all 16 TiB: metadata touched grows with the pieces."""
    count, piece = 24, 1 * MiB
    pieces = spread(HUGE, count, piece)
    if fmt == "qcow2":
        path = await make_qcow2(tmp_path / "s.qcow2", HUGE, pieces)
    else:
        path = await make_parallels(tmp_path / "s.img", HUGE, pieces)
    costs = await measure(path)
    assert data_extents(costs.extents) == pieces
    assert costs.map_calls == 1
    # memory: one L2 table (qcow2) or one BAT page (parallels) per piece at most
    per_piece = 64 * KiB if fmt == "qcow2" else PAGE_BYTES
    assert costs.map_memory <= 512 * KiB + count * (per_piece + 4 * KiB)
    if fmt == "qcow2":
        assert costs.work("l2_misses") <= count
        assert costs.map_bytes <= count * 64 * KiB + 64 * KiB
    else:
        assert costs.work("bat_pages_present") <= count
        # each piece's BAT page is looked at a few times over, nothing else
        assert costs.work("bat_entries_scanned") <= count * 3 * (PAGE_BYTES // 4)


async def test_fvd_map_in_nbdinfo_steps_costs_what_one_request_does(tmp_path: Path) -> None:
    """nbdinfo --map asks 2^32 - 1 bytes at a time, so nearly every request of a
    16 TiB map starts inside a bitmap byte; such a start must not unpack a window
    of the bitmap per request (it made the map 1.4x slower over NBD)."""
    path = await build("fvd", tmp_path / "huge.fvd", HUGE)
    one = await measure(path)
    async with opened(path) as chain:
        device = BlockDevice(chain.top, read_only=True)
        step = (1 << 32) - 1
        stepped: list[ChainExtent] = []
        for start in range(0, device.size, step):
            stepped.extend(await device.block_status(start, min(step, device.size - start)))
        scanned = chain.top.statistics().extra["bitmap_entries_scanned"]
    assert data_extents(stepped) == data_extents(one.extents) == list(PIECES)
    # 4096 requests: at most a few bitmap pages' worth more than the one-request map
    # (scanning 512 bytes per unaligned request would be ~2M)
    assert scanned <= one.work("bitmap_entries_scanned") + 3 * PAGE_BYTES, scanned
