"""Block status bounds its work per call (a shorter answer is legal): the map
composed from capped answers must equal the uncapped one, for every format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import nbdserve.block.fvd as fvd
import nbdserve.block.parallels.bat as bat
import nbdserve.block.qcow2 as qcow2
from nbdserve.block.device import BlockDevice
from nbdserve.block.extents import merge_chain_extents
from tests.conftest import require_tools
from tests.scale.costs import GiB, KiB, MiB, make_image, map_all, opened, spread

pytestmark = pytest.mark.interop


async def whole_map(path: Path) -> tuple[int, list[tuple[int, int, bool, bool, int]]]:
    """The composed map, and how many times the top layer was asked."""
    async with opened(path) as chain:
        top = chain.top
        asked = 0
        inline, waiting = top.try_block_status, top.block_status

        def counted(offset: int, length: int) -> Any:
            nonlocal asked
            asked += 1
            return inline(offset, length)

        async def counted_async(offset: int, length: int) -> Any:
            nonlocal asked
            asked += 1
            return await waiting(offset, length)

        top.try_block_status = counted  # type: ignore[method-assign]
        top.block_status = counted_async  # type: ignore[method-assign]
        _, extents = await map_all(BlockDevice(top, read_only=True))
    return asked, [(e.offset, e.length, e.zero, e.data, e.depth) for e in extents]


@pytest.mark.parametrize("fmt", ["qcow2", "parallels", "fvd"])
async def test_capped_block_status_composes_to_the_same_map(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_tools("qemu-img", "qemu-io")
    piece = 64 * KiB if fmt == "qcow2" else 1 * MiB
    path = await make_image(fmt, tmp_path / f"c.{fmt}", 64 * GiB, spread(64 * GiB, 40, piece))
    calls, full = await whole_map(path)
    monkeypatch.setattr(qcow2, "STATUS_MAX_TABLES", 2)
    monkeypatch.setattr(bat, "MAX_STATUS_RUNS", 3)
    monkeypatch.setattr(fvd, "_STATUS_MAX_SEGMENTS", 3)
    capped_calls, capped = await whole_map(path)
    assert capped == full
    assert capped_calls > calls  # the caps did bite


@pytest.mark.parametrize("fmt", ["qcow2", "parallels", "fvd"])
async def test_one_extent_at_a_time_costs_about_one_map(tmp_path: Path, fmt: str) -> None:
    """QEMU's NBD client asks for one extent (REQ_ONE) from its position to the end
    of the disk, again and again: walking the disk that way must cost about one
    whole map, not one whole map per extent."""
    require_tools("qemu-img", "qemu-io")
    piece = 64 * KiB if fmt == "qcow2" else 1 * MiB
    path = await make_image(fmt, tmp_path / f"w.{fmt}", 64 * GiB, spread(64 * GiB, 40, piece))
    async with opened(path) as chain:
        device = BlockDevice(chain.top, read_only=True)
        _, full = await map_all(device)
        work_full = [dict(layer.statistics().extra) for layer in chain.layers]
        walked = []
        pos = 0
        while pos < device.size:
            length = min(device.size - pos, 4 * GiB)
            (first,) = await device.block_status(pos, length, max_extents=1)
            walked.append(first)
            pos = first.end
        work_walk = [dict(layer.statistics().extra) for layer in chain.layers]
    assert walked == merge_chain_extents(full)
    key = {"qcow2": "l2_units_classified", "parallels": "bat_entries_scanned"}.get(
        fmt, "table_entries_scanned"
    )
    spent_full = sum(w.get(key, 0) for w in work_full)
    spent_walk = sum(w.get(key, 0) for w in work_walk) - spent_full
    assert spent_walk <= 4 * spent_full + 4096, (spent_walk, spent_full)
