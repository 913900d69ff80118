"""Backing chains of the default depth limit (16): cost follows the depth that holds data.

A layer is only asked about the ranges the layers above leave unallocated,
and a layer without an L2 table for a range answers with one L1 lookup: the
counters show that empty layers never load an L2 table, and that layers
below the one holding the data are not consulted for it at all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from nbdserve.block.base import BlockDriver
from nbdserve.block.device import BlockDevice
from tests.conftest import require_tools
from tests.scale.costs import MiB, TiB, make_qcow2, map_all, opened

pytestmark = pytest.mark.interop

DEPTH = 16
SIZE = 1 * TiB
BOTTOM = [(i * (SIZE // 4), 1 * MiB) for i in range(4)]  # data only in the base
MIDDLE_LAYER = 12  # chain.layers index (0 = top): depth 13
MIDDLE = [(SIZE // 2 + 64 * MiB, 1 * MiB)]


def count_calls(layers: Sequence[BlockDriver], calls: Counter[tuple[int, str]]) -> None:
    """Count each layer's block status and read calls (instance attributes
    shadow the class's methods)."""
    for i, layer in enumerate(layers):
        for name in ("block_status", "try_block_status", "readinto", "try_readinto"):
            method = getattr(layer, name)

            def counted(*args: object, _m: Any = method, _k: tuple[int, str] = (i, name)) -> Any:
                calls[_k] += 1
                return _m(*args)

            setattr(layer, name, counted)


async def test_chain_of_16_asks_only_the_layers_it_must(tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    path = await make_qcow2(tmp_path / "l0.qcow2", SIZE, BOTTOM)
    for d in range(1, DEPTH):
        pieces = MIDDLE if d == DEPTH - 1 - MIDDLE_LAYER else []
        path = await make_qcow2(tmp_path / f"l{d}.qcow2", SIZE, pieces, backing=path)
    async with opened(path) as chain:
        assert len(chain.layers) == DEPTH
        device = BlockDevice(chain.top, read_only=True)
        calls: Counter[tuple[int, str]] = Counter()
        count_calls(chain.layers, calls)

        _, extents = await map_all(device)
        data = [(e.offset, e.length, e.depth) for e in extents if e.data]
        assert data == sorted(
            [(o, n, DEPTH) for o, n in BOTTOM] + [(o, n, MIDDLE_LAYER + 1) for o, n in MIDDLE]
        )
        stats = [layer.statistics().extra for layer in chain.layers]
        for i, s in enumerate(stats):
            holds_data = i in (MIDDLE_LAYER, DEPTH - 1)
            if not holds_data:  # an empty layer: L1 lookups only, never an L2 table
                assert s["l2_misses"] == 0, (i, s)
                assert s["l2_tables_mapped"] == 0, (i, s)
            # each layer is asked once per stretch the layers above leave open
            asked = calls[(i, "try_block_status")] + calls[(i, "block_status")]
            assert asked <= 2 * (len(MIDDLE) + 1) + 1, (i, asked)

        # a read of data at depth 13 consults layers 0..12 and nothing below
        calls.clear()
        offset, _ = MIDDLE[0]
        got = await device.read(offset, 4096)
        assert got == bytes([1]) * 4096
        for i in range(MIDDLE_LAYER + 1, DEPTH):
            assert not any(calls[(i, n)] for n in ("readinto", "try_readinto")), i
        # the layers above it each looked once (inline) or twice (inline, then async)
        for i in range(MIDDLE_LAYER + 1):
            assert 1 <= calls[(i, "readinto")] + calls[(i, "try_readinto")] <= 2, i
