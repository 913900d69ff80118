"""The backing chain depth limit: ``max_chain_depth`` counts the images of a chain,
the export's own included (README), so the default 16 means an overlay and 15
backing files."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbdserve.block.chain import DEFAULT_MAX_DEPTH, ChainOptions, open_chain
from nbdserve.block.qcow2 import create_image
from nbdserve.config import ExportConfig
from nbdserve.errors import BackingChainError, ConfigError
from nbdserve.server.exports import open_export

SIZE = 1 << 20


async def _make_chain(d: Path, images: int) -> Path:
    """A raw base under ``images - 1`` qcow2 overlays; returns the top."""
    (d / "l0.raw").write_bytes(b"B" * SIZE)
    prev, fmt = "l0.raw", "raw"
    for i in range(1, images):
        await create_image(str(d / f"l{i}.qcow2"), SIZE, {}, prev, fmt)
        prev, fmt = f"l{i}.qcow2", "qcow2"
    return d / prev


async def _layers(top: Path, **kw: object) -> int:
    chain = await open_chain(str(top), ChainOptions(read_only=True, **kw))  # type: ignore[arg-type]
    try:
        return len(chain.layers)
    finally:
        await chain.aclose()


async def test_default_limit_is_sixteen_images(tmp_path: Path) -> None:
    assert DEFAULT_MAX_DEPTH == ExportConfig(name="", path="x").max_chain_depth == 16
    top = await _make_chain(tmp_path, 16)
    assert await _layers(top) == 16
    over = tmp_path / "l16.qcow2"
    await create_image(str(over), SIZE, {}, top.name, "qcow2")
    with pytest.raises(BackingChainError, match=r"deeper than 16 \(max_chain_depth"):
        await _layers(over)


async def test_export_config_limit_counts_the_export_image(tmp_path: Path) -> None:
    top = await _make_chain(tmp_path, 3)
    ok = await open_export(ExportConfig(name="d", path=str(top), max_chain_depth=3))
    try:
        assert len(ok.chain.layers) == 3
    finally:
        await ok.chain.aclose()
    with pytest.raises(ConfigError, match=r"deeper than 2 \(max_chain_depth"):
        await open_export(ExportConfig(name="d", path=str(top), max_chain_depth=2))


async def test_limit_one_allows_no_backing_file(tmp_path: Path) -> None:
    alone = tmp_path / "alone.qcow2"
    await create_image(str(alone), SIZE, {})
    assert await _layers(alone, max_depth=1) == 1
    top = await _make_chain(tmp_path, 2)
    with pytest.raises(BackingChainError, match=r"deeper than 1 \(max_chain_depth"):
        await _layers(top, max_depth=1)
    assert await _layers(top, max_depth=1, follow_backing=False) == 1
